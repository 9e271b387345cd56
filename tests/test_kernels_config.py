"""check_config: clear errors for tile configurations that cannot compile; tile picking."""

import jax.numpy as jnp
import pytest

from sparsescale.kernels import BlockTiles, NMTiles, auto_impl, check_config
from sparsescale.kernels.tiles import pick_block_tiles, pick_nm_tiles


@pytest.mark.parametrize(
    "kind,shape,dtype,tiles,backend,structure,message",
    [
        ("nm", (1024, 512), jnp.bfloat16, NMTiles(128, 64, 1024), "tpu", dict(n=2, m=4), "tn=64"),
        # 1:4 packs 4 groups per byte: tk=1024 gives 64-row planes, under the 128 lanes.
        ("nm", (2048, 512), jnp.float32, NMTiles(128, 128, 1024), "tpu", dict(n=1, m=4), "128"),
        ("nm", (1024, 512), jnp.bfloat16, NMTiles(8, 128, 1024), "tpu", dict(n=2, m=4), "16"),
        ("nm", (1024, 500), jnp.bfloat16, NMTiles(16, 128, 1024), "tpu", dict(n=2, m=4), "divide"),
        ("nm", (8192, 4096), jnp.float32, NMTiles(1024, 2048, 8192), "tpu", dict(n=2, m=4), "VMEM"),
        ("nm", (1024, 512), jnp.bfloat16, NMTiles(24, 64, 256), "gpu", dict(n=2, m=4), "power"),
        ("nm", (1024, 512), jnp.bfloat16, NMTiles(128, 128, 512), "cuda", dict(n=2, m=4), "shared"),
        ("block", (512, 512), jnp.bfloat16, BlockTiles(128), "tpu", dict(block=(64, 128)), "128"),
        ("block", (480, 512), jnp.bfloat16, BlockTiles(128), "gpu", dict(block=(48, 64)), "power"),
        ("block", (512, 500), jnp.bfloat16, BlockTiles(64), "gpu", dict(block=(64, 64)), "divide"),
    ],
)
def test_check_config_rejects_with_reason(kind, shape, dtype, tiles, backend, structure, message):
    with pytest.raises(ValueError, match=message) as err:
        check_config(kind, shape, dtype, tiles, backend, **structure)
    # The message names the kernel shape and the tiles it came from.
    assert str(tuple(shape)) in str(err.value) and repr(tiles) in str(err.value)


def test_check_config_accepts_standard_tiles_and_rejects_bad_arguments():
    check_config("nm", (4096, 4096), jnp.bfloat16, NMTiles(128, 256, 1024), "tpu", n=2, m=4)
    check_config("nm", (4096, 4096), jnp.bfloat16, NMTiles(64, 128, 256), "gpu", n=2, m=4)
    check_config("block", (4096, 4096), jnp.bfloat16, BlockTiles(128), "tpu", block=(128, 128))
    with pytest.raises(ValueError, match="kind must be 'nm' or 'block'"):
        check_config("dense", (8, 8), jnp.float32, NMTiles(), "tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        check_config("nm", (8, 8), jnp.float32, NMTiles(), "metal", n=2, m=4)
    with pytest.raises(ValueError, match="tiles must be BlockTiles"):
        check_config("block", (8, 8), jnp.float32, NMTiles(), "tpu", block=(8, 8))


def test_picked_tiles_pass_check_config():
    for backend in ("tpu", "gpu"):
        for rows in (16, 64, 4096):
            tiles = pick_nm_tiles((4096, 1024), rows, jnp.bfloat16, backend, False, 2, 4)
            check_config("nm", (4096, 1024), jnp.bfloat16, tiles, backend, n=2, m=4)
            assert rows > tiles.tm or tiles.tm <= max(16, 2 * rows)  # small M gets a small tile
            bt = pick_block_tiles((4096, 1024), rows, jnp.bfloat16, backend, False, (128, 128))
            check_config("block", (4096, 1024), jnp.bfloat16, bt, backend, block=(128, 128))
    # No compiled config exists for a 100-wide kernel on TPU: a clear error, not a silent pick.
    with pytest.raises(ValueError, match="cannot compile for tpu"):
        pick_nm_tiles((1024, 100), 64, jnp.bfloat16, "tpu", False, 2, 4)


def test_auto_impl_per_backend():
    assert auto_impl("nm", "cpu") == "masked"
    assert auto_impl("nm", "tpu") == "nm"
    assert auto_impl("block", "gpu") == "block"
    assert auto_impl("unstructured", "tpu") == "masked"
