"""SparseLinear against dense nnx.Linear, sparsify() on a user model, and mask sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsescale import layers
from sparsescale import sharding as shard_lib
from sparsescale import sparsity as sp


def test_sparse_linear_equals_dense_linear_with_premasked_kernel():
    sparse = layers.SparseLinear(16, 8, rngs=nnx.Rngs(0))
    sparse.bias[...] = jnp.arange(8.0)
    mask = sp.NM(2, 4).mask(jnp.abs(sparse.kernel[...]))
    sparse.mask[...] = mask
    dense = nnx.Linear(16, 8, rngs=nnx.Rngs(1))
    dense.kernel[...] = jnp.where(mask, sparse.kernel[...], 0.0)
    dense.bias[...] = sparse.bias[...]
    x = jax.random.normal(jax.random.key(2), (3, 5, 16))
    np.testing.assert_allclose(sparse(x), dense(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sparse.to_dense(), dense.kernel[...])

    # Gradients w.r.t. the kernel are the dense gradients masked; masks get none.
    def loss(m, x):
        return jnp.sum(m(x) ** 2)

    g_sparse = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(sparse, x)
    g_dense = nnx.grad(loss)(dense, x)
    np.testing.assert_allclose(
        g_sparse.kernel[...], jnp.where(mask, g_dense.kernel[...], 0), rtol=1e-5, atol=1e-5
    )
    assert "mask" not in g_sparse


def test_dense_grad_is_straight_through():
    layer = layers.SparseLinear(8, 4, use_bias=False, dense_grad=True, rngs=nnx.Rngs(0))
    layer.mask[...] = sp.Unstructured(0.5).mask(jnp.abs(layer.kernel[...]))
    x = jax.random.normal(jax.random.key(1), (5, 8))
    y = layer(x)
    np.testing.assert_allclose(y, x @ layer.to_dense(), rtol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(x)), argnums=nnx.DiffState(0, nnx.Param))(layer)
    # d/dW sum(x @ W) = x^T @ 1, dense (no zeros at pruned entries).
    np.testing.assert_allclose(grads.kernel[...], x.T @ jnp.ones((5, 4)), rtol=1e-5)


def test_mask_is_not_a_param():
    layer = layers.SparseLinear(4, 4, rngs=nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    assert set(params) == {"kernel", "bias"}
    assert set(nnx.state(layer, layers.Mask)) == {"mask"}


class UserModel(nnx.Module):
    """A model written by a user, with a nested list of Linears and a norm."""

    def __init__(self, rngs):
        self.encoder = nnx.Linear(16, 32, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(32, 32, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.head = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.encoder(x))
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.head(self.norm(x))


def test_sparsify_user_model_in_place_keeps_weights():
    model = UserModel(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16))
    before = {p: np.asarray(m.kernel[...]) for p, m in [("encoder", model.encoder)]}
    y_dense = model(x)

    converted = layers.sparsify(model, exclude=("head",))
    assert converted == ["encoder", "layers/0", "layers/1"]
    assert isinstance(model.layers[1], layers.SparseLinear)
    assert isinstance(model.head, nnx.Linear)
    np.testing.assert_array_equal(model.encoder.kernel[...], before["encoder"])
    np.testing.assert_allclose(model(x), y_dense, rtol=1e-6)  # all-ones masks: same function

    model2 = UserModel(nnx.Rngs(0))
    layers.sparsify(model2, sp.NM(2, 4), exclude=("head",))
    for layer in [model2.encoder, *model2.layers]:
        per_group = np.asarray(layer.mask[...]).reshape(-1, 4, layer.out_features).sum(1)
        assert (per_group == 2).all()
        assert (np.asarray(layer.kernel[...])[~np.asarray(layer.mask[...])] == 0).all()
    assert sorted(layers.sparse_layers(model2)) == ["encoder", "layers/0", "layers/1"]


def test_sparsify_errors():
    with pytest.raises(ValueError, match="no layer matches"):
        layers.sparsify(UserModel(nnx.Rngs(0)), include=("nothing_here",))
    with pytest.raises(ValueError, match="divisible by m=3"):
        layers.sparsify(UserModel(nnx.Rngs(0)), sp.NM(1, 3))


class TwoLayers(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(16, 30, rngs=rngs)
        self.second = nnx.Linear(30, 8, rngs=rngs)  # 30 inputs: not divisible into groups of 4


def test_sparsify_validates_every_layer_before_converting_any():
    model = TwoLayers(nnx.Rngs(0))
    kernel = np.asarray(model.first.kernel[...])
    with pytest.raises(ValueError, match="second"):
        layers.sparsify(model, sp.NM(2, 4), exclude=())
    assert type(model.first) is nnx.Linear and type(model.second) is nnx.Linear
    np.testing.assert_array_equal(model.first.kernel[...], kernel)  # untouched, not pruned
    assert layers.sparse_layers(model) == {}


def test_import_has_no_global_flax_side_effect():
    """`import sparsescale` flips no flax flag; the modules build outside a mesh context whatever
    `flax_always_shard_variable` is (their variables carry logical axis names only)."""
    import subprocess
    import sys

    code = (
        "import flax; before = flax.config.flax_always_shard_variable; "
        "import sparsescale, sparsescale.layers, sparsescale.model, sparsescale.masking; "
        "assert flax.config.flax_always_shard_variable == before, before"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    from flax import config as flax_config

    from sparsescale import model as model_lib

    with flax_config.temp_flip_flag("always_shard_variable", True):
        layer = layers.SparseLinear(8, 16, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
        assert layer.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
        cfg = model_lib.preset("cpu_6k", moe=_tiny_moe())
        model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
        layers.sparsify(TwoLayers(nnx.Rngs(0)), exclude=("second",))


def _tiny_moe():
    from sparsescale import moe

    return moe.MoEConfig(num_experts=2, top_k=1, every=2)


def test_mask_sharded_like_kernel_on_4_device_mesh():
    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(data=1, fsdp=2, tensor=2))
    layer = layers.SparseLinear(8, 16, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    state = nnx.state(layer)
    shardings = shard_lib.state_shardings(state, mesh, shard_lib.DEFAULT_RULES)
    assert shardings["kernel"] == shardings["mask"]
    assert shardings["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    placed = jax.device_put(nnx.to_pure_dict(state), shardings)
    assert placed["mask"].sharding.is_equivalent_to(placed["kernel"].sharding, 2)
    assert len(placed["mask"].addressable_shards) == 4
    for k_shard, m_shard in zip(
        placed["kernel"].addressable_shards, placed["mask"].addressable_shards, strict=True
    ):
        assert k_shard.index == m_shard.index and k_shard.device == m_shard.device


def test_bad_mesh_is_rejected():
    with pytest.raises(ValueError, match="needs 8 devices"):
        shard_lib.MeshConfig(data=4, tensor=2).shape(4)
    with pytest.raises(ValueError, match="not divisible"):
        shard_lib.MeshConfig(data=-1, tensor=3).shape(4)


@pytest.mark.parametrize(
    "impl, lowering, structure",
    [
        ("nm", "pallas", sp.NM(2, 4)),
        ("block", "pallas", sp.Block(0.5, (8, 8))),
        ("block", "xla", sp.Block(0.75, (8, 8))),
    ],
)
def test_compressed_impls_match_masked_forward_and_grads(impl, lowering, structure):
    kwargs = dict(use_bias=True, kernel_axes=("embed", "mlp"))
    masked = layers.SparseLinear(32, 16, rngs=nnx.Rngs(0), **kwargs)
    fast = layers.SparseLinear(
        32, 16, impl=impl, lowering=lowering, structure=structure, rngs=nnx.Rngs(1), **kwargs
    )
    assert (fast.impl, fast.lowering) == (impl, lowering)
    mask = structure.mask(jnp.abs(masked.kernel[...]))
    for layer in (masked, fast):
        layer.kernel[...] = masked.kernel[...]
        layer.mask[...] = mask
        layer.bias[...] = jnp.linspace(-1, 1, 16)
    x = jax.random.normal(jax.random.key(3), (2, 8, 32))
    np.testing.assert_allclose(fast(x), masked(x), rtol=1e-5, atol=1e-5)

    def loss(m):
        return jnp.sum(jnp.sin(m(x)))

    grad = lambda m: nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(m)
    g_fast, g_masked = grad(fast), grad(masked)
    np.testing.assert_allclose(g_fast.kernel[...], g_masked.kernel[...], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_fast.bias[...], g_masked.bias[...], rtol=1e-4, atol=1e-5)


def test_impl_errors_and_auto():
    with pytest.raises(ValueError, match="needs an NM structure"):
        layers.SparseLinear(8, 8, impl="nm", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a Block structure"):
        layers.SparseLinear(8, 8, impl="block", structure=sp.NM(2, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl must be one of"):
        layers.SparseLinear(8, 8, impl="cusparse", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lowering must be one of"):
        layers.SparseLinear(8, 8, impl="block", lowering="cuda", rngs=nnx.Rngs(0))
    auto = layers.SparseLinear(8, 8, impl="auto", structure=sp.NM(2, 4), rngs=nnx.Rngs(0))
    assert auto.impl == ("masked" if jax.default_backend() == "cpu" else "nm")
    # The config vocabulary ("masked" | "block") is a subset of the layer's.
    assert set(sp.IMPLS) <= set(layers.IMPLS)
    with pytest.warns(DeprecationWarning, match="lowering='xla'"):
        old = layers.SparseLinear(
            16, 16, impl="xla_block", structure=sp.Block(0.5, (8, 8)), rngs=nnx.Rngs(0)
        )
    assert (old.impl, old.lowering) == ("block", "xla")


def test_compressed_views_round_trip():
    from sparsescale import kernels

    layer = layers.SparseLinear(32, 16, rngs=nnx.Rngs(0))
    layer.mask[...] = sp.NM(2, 4).mask(jnp.abs(layer.kernel[...]))
    packed = layer.to_nm(2, 4)
    assert packed.values.shape == (16, 16)  # K·n/m rows: only kept weights are stored
    np.testing.assert_array_equal(kernels.unpack_nm(packed), layer.to_dense())
    layer.mask[...] = sp.Block(0.75, (8, 8)).mask(jnp.abs(layer.kernel[...]))
    packed = layer.to_block((8, 8))
    np.testing.assert_array_equal(kernels.unpack_block(packed), layer.to_dense())
