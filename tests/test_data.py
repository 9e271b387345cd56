"""Tests for sparsescale.data against the raw files, hand-computed splits and empirical counts."""

import concurrent.futures
import dataclasses
import glob
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader as tfds_downloader

from sparsescale import data

SEQ_LEN = 16
BATCH = 8


def _make_corpus(root: pathlib.Path) -> None:
    """~60 files in nested dirs with distinct random contents (one not UTF-8, one empty)."""
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz  \n.,()=:", dtype=np.uint8)
    for i in range(60):
        path = root / f"pkg{i % 3}" / ("sub" if i % 2 else "") / f"mod_{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.choice(alphabet, size=int(rng.integers(50, 400))).tobytes())
    (root / "pkg0" / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1"))
    (root / "pkg0" / "empty.txt").write_bytes(b"")
    (root / "pkg0" / "ignored.bin").write_bytes(b"not matched by the glob")


def _is_validation(relative_path: str) -> bool:  # the documented split rule, recomputed here
    return int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16) % 10000 < 500


def _expected_streams(root: pathlib.Path, pattern: str = "**/*.txt") -> dict[str, bytes]:
    """Split streams built directly from the files: sorted relative paths, joined by b"\\0"."""
    files = sorted(root.glob(pattern), key=lambda p: p.relative_to(root).as_posix())
    split = {"train": [], "validation": []}
    for f in files:
        rel = f.relative_to(root).as_posix()
        split["validation" if _is_validation(rel) else "train"].append(f.read_bytes())
    return {name: b"\0".join(docs) for name, docs in split.items()}


def _windows(stream: bytes, seq_len: int) -> list[bytes]:
    n = (len(stream) - 1) // seq_len
    return [stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]


def _rows(batch: np.ndarray) -> list[bytes]:
    assert batch.dtype == np.int32 and batch.min() >= 0 and batch.max() < 256
    return [row.astype(np.uint8).tobytes() for row in batch]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("corpus")
    _make_corpus(root)
    return root


@pytest.fixture(scope="module")
def cfg(corpus, tmp_path_factory) -> data.DataConfig:
    cfg = data.DataConfig(
        name="local_text",
        text_glob=str(corpus / "**" / "*.txt"),
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        seed=3,
    )
    data.prepare(cfg)
    return cfg


def _take(it, n: int) -> list[np.ndarray]:
    return [next(it) for _ in range(n)]


def test_windows_are_file_bytes_and_one_epoch_is_a_permutation(cfg, corpus):
    expected = _expected_streams(corpus)
    assert expected["train"] and expected["validation"], "corpus must exercise both splits"
    prepared = data.prepare(cfg)
    assert prepared.split_num_bytes == {k: len(v) for k, v in expected.items()}
    assert data.num_bytes(cfg, "validation") == len(expected["validation"])

    train_windows = _windows(expected["train"], SEQ_LEN)
    num_batches = math.ceil(len(train_windows) / BATCH) + 1
    rows = [r for b in _take(data.train_iterator(cfg), num_batches) for r in _rows(b)]
    assert sorted(rows[: len(train_windows)]) == sorted(train_windows)  # epoch 1: each once
    assert set(rows) <= set(train_windows)  # epoch 2 continues from the same windows

    val_windows = _windows(expected["validation"], SEQ_LEN)
    eval_rows = [r for b in data.eval_batches(cfg, 1) for r in _rows(b)]
    assert len(eval_rows) == BATCH and set(eval_rows) <= set(val_windows)


def test_split_is_by_file_disjoint_and_deterministic(cfg, corpus, tmp_path):
    prepared = data.prepare(cfg)
    builder = tfds.builder_from_directory(prepared.builder_dir)
    paths = {
        split: [r["path"].decode() for r in builder.as_data_source(split=split)]
        for split in ("train", "validation")
    }
    all_paths = sorted(p.relative_to(corpus).as_posix() for p in corpus.glob("**/*.txt"))
    assert not set(paths["train"]) & set(paths["validation"])
    assert sorted(paths["train"] + paths["validation"]) == all_paths
    assert paths["train"] == sorted(paths["train"])  # stored in sorted path order
    assert all(_is_validation(p) for p in paths["validation"])

    # Rebuilt from scratch in another data_dir: same fingerprint, same bytes.
    other = data.prepare(dataclasses.replace(cfg, data_dir=str(tmp_path)))
    assert other.fingerprint == prepared.fingerprint
    for split in ("train", "validation"):
        a = np.load(prepared.stream_path(split))
        np.testing.assert_array_equal(a, np.load(other.stream_path(split)))


def test_same_seed_same_batches_different_seed_different_order(cfg):
    a = _take(data.train_iterator(cfg), 5)
    b = _take(data.train_iterator(cfg), 5)
    c = _take(data.train_iterator(dataclasses.replace(cfg, seed=4)), 5)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))
    # Different seeds see the same eval bytes.
    e1 = data.eval_batches(cfg, 3)
    e2 = data.eval_batches(dataclasses.replace(cfg, seed=4), 3)
    np.testing.assert_array_equal(np.stack(e1), np.stack(e2))


def test_eval_batch_size_gives_every_train_batch_the_same_windows(cfg, corpus):
    val_windows = _windows(_expected_streams(corpus)["validation"], SEQ_LEN)
    total = 6
    assert total < len(val_windows)  # evenly spaced, not cycled: index i * len // total
    expected = [val_windows[i * len(val_windows) // total] for i in range(total)]
    for batch_size in (1, 2, 5):
        c = dataclasses.replace(cfg, batch_size=batch_size, eval_batch_size=total)
        (batch,) = data.eval_batches(c, 1)
        assert _rows(batch) == expected, batch_size
    # unset, the rows per eval batch follow batch_size (the layout every earlier run used)
    (a, b) = data.eval_batches(dataclasses.replace(cfg, batch_size=3), 2)
    assert len(_rows(a)) == len(_rows(b)) == 3
    with pytest.raises(ValueError, match="eval_batch_size"):
        data.validate(dataclasses.replace(cfg, eval_batch_size=0))


def test_get_state_resume_matches_uninterrupted_run_across_epochs(cfg):
    per_epoch = (data.num_bytes(cfg, "train") - 1) // SEQ_LEN // BATCH
    k = per_epoch + 2  # resume after an epoch boundary
    reference = _take(data.train_iterator(cfg), k + 4)
    it = data.train_iterator(cfg)
    _take(it, k)
    state = it.get_state()
    _take(it, 2)  # the interrupted run moves on; the state must not
    resumed = data.train_iterator(cfg)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 4)), np.stack(reference[k:]))


def test_orbax_checkpoint_resume(cfg, tmp_path):
    reference = _take(data.train_iterator(cfg), 7)
    it = data.train_iterator(cfg)
    _take(it, 3)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    resumed = data.train_iterator(cfg)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        restore = grain.checkpoint.CheckpointRestore(resumed)
        manager.restore(3, args=ocp.args.Composite(data=restore))
    np.testing.assert_array_equal(np.stack(_take(resumed, 4)), np.stack(reference[3:]))


def test_process_shards_partition_the_global_batch(cfg):
    shards = [grain.sharding.ShardOptions(shard_index=i, shard_count=2) for i in range(2)]
    full = _take(data.train_iterator(cfg, grain.sharding.NoSharding()), 4)
    parts = [_take(data.train_iterator(cfg, s), 4) for s in shards]
    for step in range(4):
        assert parts[0][step].shape == (BATCH // 2, SEQ_LEN + 1)
        np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), full[step])
        rows0, rows1 = set(_rows(parts[0][step])), set(_rows(parts[1][step]))
        assert not rows0 & rows1
    full_eval = data.eval_batches(cfg, 2, grain.sharding.NoSharding())
    eval_parts = [data.eval_batches(cfg, 2, s) for s in shards]
    for step in range(2):
        np.testing.assert_array_equal(
            np.concatenate([eval_parts[0][step], eval_parts[1][step]]), full_eval[step]
        )


def test_fingerprint_tracks_file_contents_and_prepare_rebuilds(corpus, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(corpus, root)
    cfg = data.DataConfig(
        name="local_text", text_glob=str(root / "**" / "*.txt"), data_dir=str(tmp_path / "d")
    )
    before = data.fingerprint(cfg)
    assert len(before) == 64 and int(before, 16) >= 0
    target = root / "pkg1" / "sub" / "mod_001.txt"
    original = target.read_bytes()
    target.write_bytes(b"X" + original[1:])
    changed = data.fingerprint(cfg)
    assert changed != before
    stream = np.load(data.prepare(cfg).stream_path("train")).tobytes()
    assert stream == _expected_streams(root)["train"] and b"X" + original[1:] in stream
    target.write_bytes(original)
    assert data.fingerprint(cfg) == before
    (root / "pkg2" / "new.txt").write_bytes(b"new file")
    assert data.fingerprint(cfg) not in (before, changed)
    # The corpus's location does not matter, only its relative paths and bytes.
    (root / "pkg2" / "new.txt").unlink()
    moved = data.DataConfig(name="local_text", text_glob=str(corpus / "**" / "*.txt"))
    assert data.fingerprint(moved) == before


def test_damaged_stream_is_rebuilt_and_damaged_records_are_one_clear_error(corpus, tmp_path):
    """A half-copied byte stream (shared file systems) is moved aside and rebuilt to the same
    bytes; damaged ArrayRecord shards, with nothing to rebuild from, name the fix."""
    cfg = data.DataConfig(
        name="local_text", text_glob=str(corpus / "**" / "*.txt"), data_dir=str(tmp_path)
    )
    path = data.prepare(cfg).stream_path("train")
    whole = np.load(path).tobytes()
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)  # np.load: "mmap length is greater than file size"
    assert np.load(data.prepare(cfg).stream_path("train")).tobytes() == whole
    assert len(glob.glob(f"{path}.damaged-*")) == 1
    os.remove(path)
    for shard in glob.glob(str(tmp_path / "**" / "*.array_record*"), recursive=True):
        with open(shard, "r+b") as f:
            f.truncate(16)
    with pytest.raises(ValueError, match="do not read .*delete that directory to rebuild"):
        data.prepare(cfg)


def test_concurrent_prepare_builds_once(corpus, tmp_path):
    cfg = data.DataConfig(
        name="local_text", text_glob=str(corpus / "**" / "*.txt"), data_dir=str(tmp_path)
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(data.prepare, [cfg, cfg]))
    assert results[0] == results[1]
    assert results[0].split_num_bytes["train"] == len(_expected_streams(corpus)["train"])


def _empirical_conditional_entropy(stream: np.ndarray, order: int, vocab: int) -> float:
    """Plug-in H(X_t | X_{t-order..t-1}) in nats with the Miller-Madow bias correction, over
    positions whose context and target lie inside one document (no separator byte)."""
    symbols = stream.astype(np.int64) - 1  # bytes 1..vocab -> 0..vocab-1; separator -> -1
    n = len(symbols) - order
    grams = np.stack([symbols[i : i + n] for i in range(order + 1)], axis=1)
    grams = grams[(grams >= 0).all(axis=1)]
    context = np.zeros(len(grams), dtype=np.int64)
    for i in range(order):
        context = context * vocab + grams[:, i]
    joint = np.bincount(context * vocab + grams[:, order], minlength=vocab ** (order + 1))
    joint = joint.reshape(-1, vocab).astype(np.float64)
    per_context = joint.sum(axis=1, keepdims=True)
    p_joint = joint / joint.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(p_joint * np.log(joint / per_context))
    occupied_cells = (joint > 0).sum() - (per_context > 0).sum()
    return h + occupied_cells / (2 * joint.sum())


@pytest.mark.parametrize("entropy", [0.5, 1.7])
def test_synthetic_entropy_rate_matches_empirical_estimate(entropy, tmp_path):
    cfg = data.DataConfig(
        name="synthetic",
        data_dir=str(tmp_path),
        synthetic_entropy=entropy,
        synthetic_vocab=16,
        synthetic_order=2,
        synthetic_train_bytes=2**19,
        synthetic_validation_bytes=2**14,
    )
    prepared = data.prepare(cfg)
    assert prepared.entropy_rate_nats == pytest.approx(entropy, abs=1e-9)
    stream = np.load(prepared.stream_path("train"))
    assert set(np.unique(stream)) <= set(range(17))  # symbols 1..16 and the separator 0
    estimate = _empirical_conditional_entropy(stream, order=2, vocab=16)
    assert estimate == pytest.approx(prepared.entropy_rate_nats, abs=0.02)
    # An order-1 estimate ignores part of the context, so it must be clearly higher.
    assert _empirical_conditional_entropy(stream, order=1, vocab=16) > estimate + 0.1
    # Train and validation come from independent streams of the same language.
    val = np.load(prepared.stream_path("validation"))
    assert not np.array_equal(val[:1000], stream[:1000])
    other_seed = data.fingerprint(dataclasses.replace(cfg, synthetic_seed=1))
    assert other_seed != prepared.fingerprint


def test_bad_configs_raise_clear_errors(cfg, tmp_path):
    with pytest.raises(ValueError, match=r"'stdlib_code', 'local_text', 'synthetic'.*tiny_shak"):
        data.validate(data.DataConfig(name="tiny_shakespear"))
    with pytest.raises(ValueError, match="text_glob is required"):
        data.validate(data.DataConfig(name="local_text"))
    with pytest.raises(ValueError, match="matched no files"):
        data.validate(data.DataConfig(name="local_text", text_glob=str(tmp_path / "*.none")))
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        data.validate(data.DataConfig(seq_len=0))
    with pytest.raises(ValueError, match="synthetic_entropy must be in"):
        data.validate(data.DataConfig(name="synthetic", synthetic_vocab=4, synthetic_entropy=1.5))
    three = grain.sharding.ShardOptions(shard_index=0, shard_count=3)
    with pytest.raises(ValueError, match=r"batch_size=8 \(global\) must be divisible.*\(3\)"):
        data.train_iterator(cfg, three)
    with pytest.raises(ValueError, match="too short for one window"):
        next(data.train_iterator(dataclasses.replace(cfg, seq_len=10**9)))
    data.validate(data.DataConfig(name="tiny_shakespeare"))  # stock names pass validation


class SparsescaleTestLines(tfds.core.GeneratorBasedBuilder):
    """A stock-style (registered) TFDS text dataset with train/test splits, buildable offline."""

    VERSION = tfds.core.Version("1.0.0")
    LINES = {"train": [b"alpha beta", "gamma \u00e9".encode(), b"delta"], "test": [b"epsilon"]}

    def _info(self):
        features = {"id": tfds.features.Scalar(np.int64), "line": tfds.features.Text()}
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(lines) for s, lines in self.LINES.items()}

    def _generate_examples(self, lines):
        for i, line in enumerate(lines):
            yield i, {"id": i, "line": line}


class SparsescaleTestNeedsTf(SparsescaleTestLines):
    """Mimics stock builders that read their downloads with tf.io.gfile."""

    def _split_generators(self, dl_manager):
        from tensorflow_datasets.core.utils.lazy_imports_utils import tensorflow as tf

        tf.io.gfile.exists("/")
        return super()._split_generators(dl_manager)


def test_stock_tfds_passthrough_uses_text_feature(tmp_path):
    cfg = data.DataConfig(name="sparsescale_test_lines", data_dir=str(tmp_path))
    prepared = data.prepare(cfg)
    lines = SparsescaleTestLines.LINES
    assert np.load(prepared.stream_path("train")).tobytes() == b"\0".join(lines["train"])
    assert np.load(prepared.stream_path("validation")).tobytes() == b"\0".join(lines["test"])


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed"
)
def test_stock_tfds_without_tensorflow_says_how_to_fix(tmp_path, monkeypatch):
    cfg = data.DataConfig(name="sparsescale_test_needs_tf", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"needs TensorFlow.*pip install tensorflow"):
        data.prepare(cfg)
    # A real stock builder: fails on the download (offline) or on TensorFlow, clearly either way.
    # No retries, so an offline machine fails at once instead of backing off for minutes.
    monkeypatch.setattr(tfds_downloader, "MAX_RETRIES", 0)
    cfg = data.DataConfig(name="tiny_shakespeare", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"downloads/manual|pip install tensorflow"):
        data.prepare(cfg)


@pytest.fixture(scope="module")
def stdlib_cfg(tmp_path_factory) -> data.DataConfig:
    cfg = data.DataConfig(data_dir=str(tmp_path_factory.mktemp("stdlib")), seq_len=64)
    data.prepare(cfg)
    return cfg


def test_stdlib_code_streams_equal_the_interpreter_sources(stdlib_cfg):
    root, files = data.stdlib_files()
    root = pathlib.Path(root)
    rel = sorted(pathlib.Path(f).relative_to(root).as_posix() for f in files)
    assert len(rel) > 500 and "os.py" in rel and "json/decoder.py" in rel
    assert not any("site-packages" in r for r in rel)
    split = {"train": [], "validation": []}
    for r in rel:
        split["validation" if _is_validation(r) else "train"].append((root / r).read_bytes())
    prepared = data.prepare(stdlib_cfg)
    for name, docs in split.items():
        expected = b"\0".join(docs)
        assert np.load(prepared.stream_path(name)).tobytes() == expected
        assert prepared.split_num_documents[name] == len(docs)
    val_windows = set(_windows(b"\0".join(split["validation"]), 64))
    for batch in data.eval_batches(stdlib_cfg, 2):
        assert batch.shape == (stdlib_cfg.batch_size, 65) and set(_rows(batch)) <= val_windows
    assert data.fingerprint(stdlib_cfg) == prepared.fingerprint


def test_file_hash_cache_is_reused_and_never_stale(corpus, tmp_path, monkeypatch):
    root = tmp_path / "copy"
    shutil.copytree(corpus, root)
    for f in root.rglob("*.txt"):  # files changed seconds ago are always re-hashed (racy stamps)
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns - 60 * 10**9))
    cfg = data.DataConfig(
        name="local_text", text_glob=str(root / "**" / "*.txt"), data_dir=str(tmp_path / "d")
    )
    reads = []
    real = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda p: reads.append(p) or real(p))
    first = data.fingerprint(cfg)
    assert len(reads) > 3  # hashed every file
    reads.clear()
    assert data.fingerprint(cfg) == first and reads == []  # a later process reads none
    (cache,) = (tmp_path / "d" / ".file_hashes").glob("*.json")
    cache.write_text("{not json")  # a damaged cache is ignored and rewritten
    assert data.fingerprint(cfg) == first and len(reads) > 3
    assert json.loads(cache.read_text())
    target = next(root.rglob("*.txt"))
    target.write_bytes(b"Y" + target.read_bytes()[1:])  # same size, edited just now
    edited = data.fingerprint(cfg)
    target.write_bytes(b"Z" + target.read_bytes()[1:])  # again, within the clock's resolution
    assert len({first, edited, data.fingerprint(cfg)}) == 3
