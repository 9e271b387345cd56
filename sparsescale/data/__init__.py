"""Byte-level language-model data: TFDS ArrayRecord datasets read through grain.

Datasets (``DataConfig.name``):
  stdlib_code  offline default: the running interpreter's standard-library ``*.py`` sources.
  local_text   the user's own files matched by ``DataConfig.text_glob``.
  synthetic    a seeded k-th order Markov language whose entropy rate is known exactly.
  <tfds name>  any stock TFDS text dataset (e.g. ``tiny_shakespeare``): bytes of its text feature.

Each dataset is stored by TFDS as ArrayRecord, one record per document (no TensorFlow needed).
``prepare`` then writes each split's documents, joined by ``SEPARATOR``, as one flat uint8 ``.npy``
stream next to the records; training memory-maps it, so windows for any ``seq_len`` are computed at
load time: window i of a split is ``w = stream[i*L : i*L + L + 1]`` (inputs ``w[:-1]``, targets
``w[1:]``).

Batches are defined globally and independently of the process count: global step t holds the
windows ``t*B .. (t+1)*B - 1`` of a per-epoch shuffled order, and process p gets rows
``p*B/P .. (p+1)*B/P - 1`` of it, so concatenating the local batches in process order gives the
single-process batch exactly.
"""

from __future__ import annotations

import hashlib
import os
import time

import grain
import numpy as np

from sparsescale.data.config import (  # noqa: F401 (the package's public names)
    BUILTIN_DATASETS,
    SPLIT_RULE,
    TRAIN,
    VALIDATION,
    VALIDATION_PER_10K,
    VOCAB_SIZE,
    DataConfig,
    PreparedData,
    _data_dir,
    _file_lock,
    _local_batch_size,
    _process_count,
    eval_batch_size,
    log,
)
from sparsescale.data.files import _match_text_glob, _scan_files, stdlib_files
from sparsescale.data.sources import Source
from sparsescale.data.stream import (  # noqa: F401
    SEPARATOR,
    _iter_documents,
    _stream_len,
    _stream_path,
    _stream_reads,
    _Windows,
    _write_stream,
)
from sparsescale.data.synthetic import (  # noqa: F401
    SyntheticLanguage,
    _SyntheticSource,
    _validate_synthetic,
    rank_profile,
    synthetic_language,
)
from sparsescale.data.tfds_source import _TfdsSource, _validate_tfds_name


def validate(cfg: DataConfig) -> None:
    """Raises ValueError if ``cfg`` cannot work; cheap (lists files at most, builds nothing).

    Also checks ``batch_size`` against ``jax.process_count()``, so call it after
    ``jax.distributed.initialize()`` in multi-process runs."""
    _validate_dataset(cfg)
    _local_batch_size(cfg, _process_count())
    _local_batch_size(cfg, _process_count(), "eval_batch_size")


def _validate_dataset(cfg: DataConfig) -> None:
    if not isinstance(cfg.name, str) or not cfg.name:
        raise ValueError(f"DataConfig.name must be a non-empty dataset name, got {cfg.name!r}.")
    for key in ("seq_len", "batch_size"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"DataConfig.{key} must be a positive int, got {value!r}.")
    if cfg.eval_batch_size is not None and (
        not isinstance(cfg.eval_batch_size, int) or cfg.eval_batch_size < 1
    ):
        raise ValueError(
            f"DataConfig.eval_batch_size must be a positive int or None, got {cfg.eval_batch_size!r}."
        )
    if not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
        raise ValueError(f"DataConfig.seed must be an int in [0, 2**32), got {cfg.seed!r}.")
    if cfg.worker_count < 0 or cfg.read_threads < 0 or cfg.prefetch_batches < 0:
        raise ValueError(
            "DataConfig.worker_count, read_threads and prefetch_batches must be >= 0, got "
            f"{cfg.worker_count}, {cfg.read_threads}, {cfg.prefetch_batches}."
        )
    if cfg.name == "stdlib_code":
        return
    if cfg.name == "local_text":
        _match_text_glob(cfg.text_glob)
    elif cfg.name == "synthetic":
        _validate_synthetic(cfg)
    else:
        _validate_tfds_name(cfg.name)


def prepare(cfg: DataConfig) -> PreparedData:
    """Builds the dataset and its byte streams if needed; idempotent and safe to call from
    several processes at once (they serialise on a lock file in the data dir)."""
    _validate_dataset(cfg)
    data_dir = _data_dir(cfg)
    os.makedirs(data_dir, exist_ok=True)
    source = _source(cfg)
    with _file_lock(os.path.join(data_dir, f".{source.lock_name}.lock")):
        # Inside the lock: a builder reads the dataset info on disk when it is constructed.
        builder = source.builder(data_dir)
        source.download_and_prepare(builder, data_dir)
        builder_dir = str(builder.data_dir)
        split_names = source.split_names(builder)
        num_docs = {}
        for split, tfds_split in split_names.items():
            path = _stream_path(builder_dir, split)
            num_docs[split] = builder.info.splits[tfds_split].num_examples
            if os.path.exists(path) and not _stream_reads(path):  # e.g. a half-copied file
                aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
                os.replace(path, aside)
                log.warning("%s does not read; moved it to %s and rebuilding it.", path, aside)
            if not os.path.exists(path):
                try:
                    records = builder.as_data_source(split=tfds_split)
                    _write_stream(path, _iter_documents(records, source.text_feature(builder)))
                except Exception as e:  # a damaged ArrayRecord shard: nothing to rebuild from
                    raise ValueError(
                        f"dataset {cfg.name!r}: its built records in {builder_dir} do not read "
                        f"({type(e).__name__}: {e}); delete that directory to rebuild them."
                    ) from e
    return PreparedData(
        name=cfg.name,
        fingerprint=source.fingerprint,
        builder_dir=builder_dir,
        split_num_bytes={s: _stream_len(_stream_path(builder_dir, s)) for s in split_names},
        split_num_documents=num_docs,
        entropy_rate_nats=source.entropy_rate_nats,
    )


def fingerprint(cfg: DataConfig) -> str:
    """Hex sha256 naming the dataset's bytes and split rule (record it with every run).

    Files: hash of builder version, split rule, separator and every (path, content) pair, so any
    edited, added or removed file changes it. Synthetic: hash of the language's parameters and
    generator version. Stock TFDS: hash of the name and builder version (not the contents)."""
    _validate_dataset(cfg)
    return _source(cfg).fingerprint


def num_bytes(cfg: DataConfig, split: str = TRAIN) -> int:
    """Length of a split's byte stream (documents plus separators); builds if needed."""
    if split not in (TRAIN, VALIDATION):
        raise ValueError(f"split must be {TRAIN!r} or {VALIDATION!r}, got {split!r}.")
    return prepare(cfg).split_num_bytes[split]


def _split_windows(cfg: DataConfig, split: str) -> _Windows:
    """The windows of a split's byte stream (built if needed); ValueError if there is none."""
    prepared = prepare(cfg)
    windows = _Windows(prepared.stream_path(split), cfg.seq_len)
    if len(windows) == 0:
        raise ValueError(
            f"The {split} split of {cfg.name!r} ({prepared.split_num_bytes[split]} bytes) is too "
            f"short for one window of seq_len + 1 = {cfg.seq_len + 1} bytes."
        )
    return windows


def train_iterator(
    cfg: DataConfig, shard_options: grain.sharding.ShardOptions | None = None
) -> grain.DatasetIterator:
    """Endless, seeded, per-epoch reshuffled batches of this process's rows.

    ``next()`` gives np.int32 [batch_size / process_count, seq_len + 1]. The iterator supports
    ``get_state()``/``set_state()`` and ``grain.checkpoint.CheckpointSave/CheckpointRestore``.
    ``shard_options`` defaults to ``grain.sharding.ShardByJaxProcess()``."""
    shard = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    local_batch = _local_batch_size(cfg, shard.shard_count)
    windows = _split_windows(cfg, TRAIN)
    # Shuffle and batch window indices, then gather each batch from the stream in one go.
    ds = grain.MapDataset.range(len(windows)).shuffle(seed=cfg.seed).repeat()
    ds = ds.batch(local_batch, drop_remainder=True)[shard.shard_index :: shard.shard_count]
    ds = ds.map(windows.gather)
    read_options = grain.ReadOptions(
        num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_batches
    )
    iter_ds = ds.to_iter_dataset(read_options)
    if cfg.worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return iter(iter_ds)


def eval_batches(
    cfg: DataConfig, num_batches: int, shard_options: grain.sharding.ShardOptions | None = None
) -> list[np.ndarray]:
    """``num_batches`` validation batches, np.int32 [local eval batch, seq_len + 1], the same for
    every seed and run: windows evenly spaced over the whole validation stream, unshuffled
    (cycling only if the split has fewer windows than ``num_batches * eval_batch_size``). Runs
    with equal ``num_batches * eval_batch_size`` see the same windows whatever their batch_size."""
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}.")
    shard = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    batch = eval_batch_size(cfg)
    local_batch = _local_batch_size(cfg, shard.shard_count, "eval_batch_size")
    windows = _split_windows(cfg, VALIDATION)
    total = num_batches * batch
    if total <= len(windows):
        index = np.arange(total, dtype=np.int64) * len(windows) // total
    else:
        index = np.arange(total, dtype=np.int64) % len(windows)
    index_TxB = index.reshape(num_batches, batch)
    rows = slice(shard.shard_index * local_batch, (shard.shard_index + 1) * local_batch)
    return [windows.gather(index_B[rows]) for index_B in index_TxB]


def _source(cfg: DataConfig) -> Source:
    if cfg.name in ("stdlib_code", "local_text"):
        root, paths = (
            stdlib_files() if cfg.name == "stdlib_code" else _match_text_glob(cfg.text_glob)
        )
        key = hashlib.sha256(f"{cfg.name}:{root}".encode()).hexdigest()[:16]
        cache = os.path.join(_data_dir(cfg), ".file_hashes", f"{cfg.name}_{key}.json")
        return _scan_files(cfg.name, root, paths, cache)
    if cfg.name == "synthetic":
        return _SyntheticSource(cfg)
    return _TfdsSource(cfg.name)
