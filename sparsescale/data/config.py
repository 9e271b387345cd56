"""The data config (`DataConfig`), what a built dataset is (`PreparedData`), and the helpers every
source shares (data directory, batch sizes per process, the build lock)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
from collections.abc import Mapping

from sparsescale.data.stream import _stream_path

log = logging.getLogger("sparsescale")

TRAIN, VALIDATION = "train", "validation"
BUILTIN_DATASETS = ("stdlib_code", "local_text", "synthetic")
VOCAB_SIZE = 256

# Held-out validation files: chosen by a hash of the path relative to the corpus root, so the split
# is the same on every machine and does not move when files are added elsewhere in the corpus.
VALIDATION_PER_10K = 500
SPLIT_RULE = f"validation iff int(sha256(relative_path)[:8], 16) % 10000 < {VALIDATION_PER_10K}"

_SYNTHETIC_DOC_LEN = 8192
_SYNTHETIC_MAX_TABLE = 2**24  # vocab**order contexts x vocab next symbols
_DEFAULT_DATA_DIR = "~/.cache/sparsescale/tfds"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on and how to batch it. ``batch_size`` is global (all processes)."""

    name: str = "stdlib_code"  # "stdlib_code" | "local_text" | "synthetic" | any TFDS name
    data_dir: str | None = None  # None -> $SPARSESCALE_DATA_DIR or ~/.cache/sparsescale/tfds
    text_glob: str | None = None  # required for local_text; "**" matches subdirectories
    seq_len: int = 128
    batch_size: int = 32
    eval_batch_size: int | None = None  # validation rows per batch (None: batch_size)
    seed: int = 0  # shuffle seed
    # synthetic: entropy rate in nats/byte (the irreducible loss), Markov order, alphabet size,
    # seed of the language itself (not of the shuffle), bytes per split (whole 8 KiB documents).
    synthetic_entropy: float = 1.0
    synthetic_order: int = 2
    synthetic_vocab: int = 64
    synthetic_seed: int = 0
    synthetic_train_bytes: int = 2**23
    synthetic_validation_bytes: int = 2**19
    worker_count: int = 0  # grain worker processes (0: read in the training process)
    read_threads: int = 1  # prefetch threads per process (0: read synchronously in next())
    prefetch_batches: int = 4


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """A built dataset: where its byte streams are and how large they are."""

    name: str
    fingerprint: str
    builder_dir: str
    split_num_bytes: Mapping[str, int]  # stream length including separators
    split_num_documents: Mapping[str, int]
    entropy_rate_nats: float | None = None  # synthetic only: exact irreducible loss per byte

    def stream_path(self, split: str) -> str:
        return _stream_path(self.builder_dir, split)


def _data_dir(cfg: DataConfig) -> str:
    path = cfg.data_dir or os.environ.get("SPARSESCALE_DATA_DIR") or _DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(path))


def _process_count() -> int:
    import jax

    return jax.process_count()


def eval_batch_size(cfg: DataConfig) -> int:
    """Global rows per validation batch."""
    return cfg.batch_size if cfg.eval_batch_size is None else cfg.eval_batch_size


def _local_batch_size(cfg: DataConfig, process_count: int, name: str = "batch_size") -> int:
    """Rows per process of the global train (`name` "batch_size") or eval batch."""
    batch = eval_batch_size(cfg) if name == "eval_batch_size" else cfg.batch_size
    if batch % process_count:
        raise ValueError(
            f"DataConfig.{name}={batch} (global) must be divisible by the number of "
            f"processes ({process_count}); each process loads {name} / process_count rows."
        )
    return batch // process_count


@contextlib.contextmanager
def _file_lock(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
