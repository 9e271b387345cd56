"""File corpora: `stdlib_code` (the interpreter's standard library) and `local_text` (the
user's files), one document per file, split by a hash of each path."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
import time
from collections.abc import Sequence

import tensorflow_datasets as tfds

from sparsescale.data.config import SPLIT_RULE, TRAIN, VALIDATION, VALIDATION_PER_10K
from sparsescale.data.sources import _OwnBuilderMixin
from sparsescale.data.stream import SEPARATOR


@dataclasses.dataclass(frozen=True)
class _CorpusFile:
    relative_path: str
    path: str
    sha256: str

    @property
    def is_validation(self) -> bool:
        digest = hashlib.sha256(self.relative_path.encode("utf-8")).hexdigest()
        return int(digest[:8], 16) % 10000 < VALIDATION_PER_10K


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
