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

import contextlib
import dataclasses
import difflib
import fcntl
import functools
import glob
import hashlib
import json
import logging
import math
import os
import pathlib
import sysconfig
import time
from collections.abc import Iterator, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

log = logging.getLogger("sparsescale")

SEPARATOR = 0  # byte placed between documents; absent from text and from synthetic output
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


# ---------------------------------------------------------------------------------------------
# Public API


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


def train_iterator(
    cfg: DataConfig, shard_options: grain.sharding.ShardOptions | None = None
) -> grain.DatasetIterator:
    """Endless, seeded, per-epoch reshuffled batches of this process's rows.

    ``next()`` gives np.int32 [batch_size / process_count, seq_len + 1]. The iterator supports
    ``get_state()``/``set_state()`` and ``grain.checkpoint.CheckpointSave/CheckpointRestore``.
    ``shard_options`` defaults to ``grain.sharding.ShardByJaxProcess()``."""
    shard = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    local_batch = _local_batch_size(cfg, shard.shard_count)
    prepared = prepare(cfg)
    windows = _Windows(prepared.stream_path(TRAIN), cfg.seq_len)
    if len(windows) == 0:
        raise ValueError(
            f"The {TRAIN} split of {cfg.name!r} ({prepared.split_num_bytes[TRAIN]} bytes) is too "
            f"short for one window of seq_len + 1 = {cfg.seq_len + 1} bytes."
        )
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
    prepared = prepare(cfg)
    windows = _Windows(prepared.stream_path(VALIDATION), cfg.seq_len)
    if len(windows) == 0:
        raise ValueError(
            f"The {VALIDATION} split of {cfg.name!r} ({prepared.split_num_bytes[VALIDATION]} "
            f"bytes) is too short for one window of seq_len + 1 = {cfg.seq_len + 1} bytes."
        )
    total = num_batches * batch
    if total <= len(windows):
        index = np.arange(total, dtype=np.int64) * len(windows) // total
    else:
        index = np.arange(total, dtype=np.int64) % len(windows)
    index_TxB = index.reshape(num_batches, batch)
    rows = slice(shard.shard_index * local_batch, (shard.shard_index + 1) * local_batch)
    return [windows.gather(index_B[rows]) for index_B in index_TxB]


# ---------------------------------------------------------------------------------------------
# Windows over a memory-mapped byte stream


class _Windows:
    """Windows ``stream[i*L : i*L + L + 1]`` of a memory-mapped byte stream, gathered as int32."""

    def __init__(self, stream_path: str, seq_len: int):
        self._path = stream_path
        self._seq_len = seq_len
        self._len = max(0, (_stream_len(stream_path) - 1) // seq_len)
        self._stream = None

    def __len__(self) -> int:
        return self._len

    def _bytes(self) -> np.ndarray:
        if self._stream is None:  # opened lazily, so pickling to grain workers stays cheap
            self._stream = np.load(self._path, mmap_mode="r")
        return self._stream

    def gather(self, index_B: np.ndarray) -> np.ndarray:
        offsets_BxW = index_B[:, None] * self._seq_len + np.arange(self._seq_len + 1)
        return self._bytes()[offsets_BxW].astype(np.int32)

    def __getstate__(self):
        return {**self.__dict__, "_stream": None}

    def __repr__(self) -> str:
        return f"_Windows({self._path!r}, seq_len={self._seq_len}, len={self._len})"


def _stream_path(builder_dir: str, split: str) -> str:
    return os.path.join(builder_dir, f"sparsescale_stream-{split}.npy")


def _stream_len(path: str) -> int:
    return int(np.load(path, mmap_mode="r").shape[0])


def _stream_reads(path: str) -> bool:
    """Whether a byte stream opens whole (a truncated .npy fails to memory-map)."""
    try:
        _stream_len(path)
    except (ValueError, OSError, EOFError):
        return False
    return True


def _write_stream(path: str, documents: Iterator[bytes]) -> None:
    """Writes documents joined by SEPARATOR as a flat uint8 .npy, atomically."""
    stream = bytes([SEPARATOR]).join(documents)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, np.frombuffer(stream, dtype=np.uint8))
    os.replace(tmp, path)


def _iter_documents(records, text_feature: str, chunk: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(records), chunk):
        for record in records.__getitems__(range(start, min(start + chunk, len(records)))):
            text = record[text_feature]
            yield text.encode("utf-8") if isinstance(text, str) else bytes(text)


# ---------------------------------------------------------------------------------------------
# Sources: how each dataset name is built, fingerprinted and read


@dataclasses.dataclass(frozen=True)
class _CorpusFile:
    relative_path: str
    path: str
    sha256: str

    @property
    def is_validation(self) -> bool:
        digest = hashlib.sha256(self.relative_path.encode("utf-8")).hexdigest()
        return int(digest[:8], 16) % 10000 < VALIDATION_PER_10K


class _OwnBuilderMixin:
    """Sources whose TFDS builder is defined here: splits train/validation, feature "text"."""

    def download_and_prepare(self, builder, data_dir: str) -> None:
        del data_dir
        builder.download_and_prepare(file_format="array_record")

    def split_names(self, builder) -> dict[str, str]:
        return {TRAIN: TRAIN, VALIDATION: VALIDATION}

    def text_feature(self, builder) -> str:
        return "text"


@dataclasses.dataclass(frozen=True)
class _FileSource(_OwnBuilderMixin):
    """A corpus of files on disk (stdlib_code or local_text), one document per file."""

    name: str
    root: str
    files: tuple[_CorpusFile, ...]
    version: str = "1.0.0"
    entropy_rate_nats = None

    @property
    def lock_name(self) -> str:
        return self.name

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        header = {"name": self.name, "version": self.version, "split_rule": SPLIT_RULE}
        h.update(json.dumps({**header, "separator": SEPARATOR}, sort_keys=True).encode())
        for f in self.files:
            h.update(f"\n{f.relative_path}\t{f.sha256}".encode())
        return h.hexdigest()

    def builder(self, data_dir: str) -> tfds.core.DatasetBuilder:
        cls = _StdlibCode if self.name == "stdlib_code" else _LocalText
        return cls(source=self, data_dir=data_dir)


def _scan_files(
    name: str, root: str, paths: Sequence[str], cache: str | None = None
) -> _FileSource:
    """The corpus files with their sha256. `cache` (a JSON file) keeps each file's hash under its
    stat signature, so a later process re-reads only files that changed."""
    known = {}
    if cache:
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(pathlib.Path(cache).read_text())
    files, fresh, now = [], {}, time.time_ns()
    for path in paths:
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = known.get(path)
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == stamp:
            digest = entry[4]
        else:
            digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
        # A file changed in the last seconds could change again within the clock's resolution
        # without changing its stamp: keep re-hashing it until it has been still for a while.
        recent = now - st.st_mtime_ns < 5_000_000_000
        fresh[path] = stamp if recent else [*stamp, digest]
        relative = pathlib.Path(path).relative_to(root).as_posix()
        files.append(_CorpusFile(relative, path, digest))
    if cache and fresh != known:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        pathlib.Path(tmp).write_text(json.dumps(fresh))
        os.replace(tmp, cache)  # atomic: concurrent processes each write a whole file
    files.sort(key=lambda f: f.relative_path)
    return _FileSource(name=name, root=root, files=tuple(files))


def stdlib_files() -> tuple[str, list[str]]:
    """(root, files): the running interpreter's stdlib ``*.py`` files, without site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return root, sorted(p for p in paths if os.path.isfile(p))


def _match_text_glob(text_glob: str | None) -> tuple[str, list[str]]:
    """(root, files) for a local_text glob; root is the glob's directory part before any wildcard,
    so relative paths (and thus the split) do not depend on where the corpus lives."""
    if not text_glob:
        raise ValueError(
            "DataConfig.text_glob is required for name='local_text': a glob such as "
            "'/data/my_corpus/**/*.txt' selecting the text files to train on."
        )
    pattern = os.path.abspath(os.path.expanduser(text_glob))
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(
            f"DataConfig.text_glob={text_glob!r} matched no files (looked for {pattern})."
        )
    parts = pathlib.Path(pattern).parts
    prefix = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        prefix.append(part)
    return str(pathlib.Path(*prefix)), paths


class _FileCorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One record {"path", "text"} per file, in sorted path order; split by file."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, source: _FileSource, **kwargs):
        self._source = source
        config = tfds.core.BuilderConfig(
            name=f"fp_{source.fingerprint[:16]}", description=f"{len(source.files)} files"
        )
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Files under {self._source.root}; {SPLIT_RULE}.",
            features=tfds.features.FeaturesDict(
                {"path": tfds.features.Text(), "text": tfds.features.Text()}
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                fingerprint=self._source.fingerprint, split_rule=SPLIT_RULE
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        files = self._source.files
        return {
            TRAIN: self._generate_examples([f for f in files if not f.is_validation]),
            VALIDATION: self._generate_examples([f for f in files if f.is_validation]),
        }

    def _generate_examples(self, files: Sequence[_CorpusFile]):
        for f in files:
            data = pathlib.Path(f.path).read_bytes()
            if hashlib.sha256(data).hexdigest() != f.sha256:
                raise RuntimeError(f"{f.path} changed while the dataset was being built; rerun.")
            yield f.relative_path, {"path": f.relative_path, "text": data}


class _StdlibCode(_FileCorpusBuilder, skip_registration=True):
    name = "stdlib_code"


class _LocalText(_FileCorpusBuilder, skip_registration=True):
    name = "local_text"


# --- synthetic ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticLanguage:
    """k-th order Markov chain over ``vocab`` symbols (bytes 1..vocab).

    Every context's next-symbol distribution is a (context-specific, seeded) permutation of one
    rank profile ``probs_by_rank`` (p_r ∝ exp(-beta r), beta solved for the target entropy), so the
    entropy rate H(X_t | previous k) equals the profile's entropy exactly, whatever the stationary
    distribution: that is the irreducible loss in nats/byte."""

    order: int
    vocab: int
    probs_by_rank: np.ndarray  # [vocab], descending
    next_symbol_CxR: np.ndarray  # [vocab**order, vocab]: symbol index of rank r after context c

    @property
    def entropy_rate_nats(self) -> float:
        p = self.probs_by_rank[self.probs_by_rank > 0]
        return float(-(p * np.log(p)).sum())

    def sample(self, num_docs: int, doc_len: int, rng: np.random.Generator) -> np.ndarray:
        """uint8 [num_docs, doc_len] of bytes 1..vocab; each doc starts in a uniform context."""
        num_contexts = self.vocab**self.order
        rank_DxT = rng.choice(self.vocab, size=(num_docs, doc_len), p=self.probs_by_rank)
        context_D = rng.integers(num_contexts, size=num_docs)
        symbol_DxT = np.zeros((num_docs, doc_len), dtype=np.int64)
        for i in range(min(self.order, doc_len)):  # the first k symbols spell the start context
            symbol_DxT[:, i] = context_D // self.vocab ** (self.order - 1 - i) % self.vocab
        for t in range(self.order, doc_len):
            symbol_D = self.next_symbol_CxR[context_D, rank_DxT[:, t]]
            symbol_DxT[:, t] = symbol_D
            context_D = (context_D * self.vocab + symbol_D) % num_contexts
        return (symbol_DxT + 1).astype(np.uint8)


def rank_profile(vocab: int, entropy_nats: float) -> np.ndarray:
    """p_r ∝ exp(-beta r), r = 0..vocab-1, with entropy ``entropy_nats`` (bisection on beta)."""
    if not 0 < entropy_nats < math.log(vocab):
        raise ValueError(f"entropy must be in (0, log({vocab}) = {math.log(vocab):.4f}).")
    ranks = np.arange(vocab, dtype=np.float64)

    def profile(beta):
        logits = -beta * ranks
        p = np.exp(logits - logits.max())
        return p / p.sum()

    def entropy(p):
        p = p[p > 0]
        return -(p * np.log(p)).sum()

    lo, hi = 0.0, 1.0
    while entropy(profile(hi)) > entropy_nats:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if entropy(profile(mid)) > entropy_nats else (lo, mid)
    return profile(0.5 * (lo + hi))


def synthetic_language(cfg: DataConfig) -> SyntheticLanguage:
    """The language named by cfg.synthetic_{vocab, order, entropy, seed}."""
    _validate_synthetic(cfg)
    return _synthetic_language(
        cfg.synthetic_vocab, cfg.synthetic_order, cfg.synthetic_entropy, cfg.synthetic_seed
    )


@functools.lru_cache(maxsize=4)
def _synthetic_language(vocab: int, order: int, entropy: float, seed: int) -> SyntheticLanguage:
    rng = np.random.default_rng((seed, 0))
    next_symbol = np.argsort(rng.random((vocab**order, vocab)), axis=1).astype(np.uint8)
    return SyntheticLanguage(order, vocab, rank_profile(vocab, entropy), next_symbol)


@dataclasses.dataclass(frozen=True)
class _SyntheticSource(_OwnBuilderMixin):
    cfg: DataConfig
    version: str = "1.0.0"
    lock_name = "synthetic"

    @property
    def params(self) -> dict:
        fields = [f.name for f in dataclasses.fields(DataConfig) if f.name.startswith("synthetic_")]
        return {f: getattr(self.cfg, f) for f in fields}

    @property
    def fingerprint(self) -> str:
        header = {"name": "synthetic", "version": self.version, "separator": SEPARATOR}
        payload = {**header, "doc_len": _SYNTHETIC_DOC_LEN, **self.params}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @property
    def entropy_rate_nats(self) -> float:
        p = rank_profile(self.cfg.synthetic_vocab, self.cfg.synthetic_entropy)
        return float(-(p * np.log(p)).sum())

    def builder(self, data_dir: str) -> tfds.core.DatasetBuilder:
        return _Synthetic(source=self, data_dir=data_dir)


class _Synthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents of ``_SYNTHETIC_DOC_LEN`` bytes sampled from a SyntheticLanguage."""

    name = "synthetic"
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, source: _SyntheticSource, **kwargs):
        self._source = source
        config = tfds.core.BuilderConfig(
            name=f"fp_{source.fingerprint[:16]}", description=json.dumps(source.params)
        )
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Seeded k-th order Markov language with an exact entropy rate.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                fingerprint=self._source.fingerprint,
                entropy_rate_nats=self._source.entropy_rate_nats,
                **self._source.params,
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self._source.cfg
        return {
            TRAIN: self._generate_examples(cfg.synthetic_train_bytes, 1),
            VALIDATION: self._generate_examples(cfg.synthetic_validation_bytes, 2),
        }

    def _generate_examples(self, total_bytes: int, stream_id: int):
        cfg = self._source.cfg
        doc_len = min(_SYNTHETIC_DOC_LEN, total_bytes)
        rng = np.random.default_rng((cfg.synthetic_seed, stream_id))
        docs = synthetic_language(cfg).sample(total_bytes // doc_len, doc_len, rng)
        for i, doc in enumerate(docs):
            yield f"{i:08d}", {"text": doc.tobytes()}


def _validate_synthetic(cfg: DataConfig) -> None:
    vocab, order = cfg.synthetic_vocab, cfg.synthetic_order
    if not isinstance(vocab, int) or not 2 <= vocab <= 255:
        raise ValueError(f"DataConfig.synthetic_vocab must be an int in [2, 255], got {vocab!r}.")
    if not isinstance(order, int) or order < 1 or vocab**order * vocab > _SYNTHETIC_MAX_TABLE:
        raise ValueError(
            f"DataConfig.synthetic_order must be an int >= 1 with vocab**(order+1) <= "
            f"{_SYNTHETIC_MAX_TABLE}, got order={order!r} for vocab={vocab}."
        )
    if not 0 < cfg.synthetic_entropy < math.log(vocab):
        raise ValueError(
            f"DataConfig.synthetic_entropy must be in (0, log(synthetic_vocab) = "
            f"{math.log(vocab):.4f}) nats/byte, got {cfg.synthetic_entropy!r}."
        )
    for key in ("synthetic_train_bytes", "synthetic_validation_bytes"):
        if getattr(cfg, key) < order + 1:
            raise ValueError(
                f"DataConfig.{key} must be > synthetic_order, got {getattr(cfg, key)}."
            )


# --- stock TFDS ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TfdsSource:
    """A stock TFDS dataset; documents are the bytes of its first Text feature."""

    name: str
    entropy_rate_nats = None

    @property
    def lock_name(self) -> str:
        return self.name.replace("/", "_").replace(":", "_")

    @property
    def fingerprint(self) -> str:
        version = tfds.builder_cls(self.name.split("/")[0].split(":")[0]).VERSION
        key = f"tfds:{self.name}:default_version={version}:separator={SEPARATOR}"
        return hashlib.sha256(key.encode()).hexdigest()

    def builder(self, data_dir: str) -> tfds.core.DatasetBuilder:
        with _explain_build_errors(self.name, data_dir):
            return tfds.builder(self.name, data_dir=data_dir)

    def download_and_prepare(self, builder, data_dir: str) -> None:
        with _explain_build_errors(self.name, data_dir):
            builder.download_and_prepare(file_format="array_record")

    def split_names(self, builder) -> dict[str, str]:
        splits = builder.info.splits
        held_out = next((s for s in ("validation", "test") if s in splits), None)
        if TRAIN not in splits or held_out is None:
            raise ValueError(
                f"TFDS dataset {self.name!r} has splits {sorted(splits)}; sparsescale needs "
                "'train' and one of 'validation'/'test'."
            )
        return {TRAIN: TRAIN, VALIDATION: held_out}

    def text_feature(self, builder) -> str:
        features = builder.info.features
        names = [k for k, v in features.items() if isinstance(v, tfds.features.Text)]
        if not names:
            raise ValueError(
                f"TFDS dataset {self.name!r} has no Text feature (features: {list(features)}); "
                "sparsescale trains on the bytes of a text feature."
            )
        return "text" if "text" in names else names[0]


@contextlib.contextmanager
def _explain_build_errors(name: str, data_dir):
    try:
        yield
    except ModuleNotFoundError as e:
        if "tensorflow" not in str(e):
            raise
        raise RuntimeError(
            f"Building the stock TFDS dataset {name!r} needs TensorFlow, which is not installed "
            f"({e}). Run `pip install tensorflow` (or tensorflow-cpu), or build it elsewhere and "
            f"copy it under {data_dir}. The offline default is name='stdlib_code'."
        ) from e
    except OSError as e:
        raise RuntimeError(
            f"Could not download the source files of TFDS dataset {name!r} ({type(e).__name__}: "
            f"{e}). Place them under {os.path.join(str(data_dir), 'downloads', 'manual')} or "
            "build with network access; building may also need `pip install tensorflow`."
        ) from e


def _validate_tfds_name(name: str) -> None:
    base = name.split("/")[0].split(":")[0]
    try:
        tfds.builder_cls(base)
        return
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(base, list(BUILTIN_DATASETS) + known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"DataConfig.name={name!r} is not a known dataset. Known names: "
        f"{', '.join(map(repr, BUILTIN_DATASETS))}, or a TFDS dataset name such as "
        f"'tiny_shakespeare' or 'lm1b' (see tfds.list_builders()).{hint}"
    )


def _source(cfg: DataConfig):
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


# ---------------------------------------------------------------------------------------------
# Helpers


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
