"""A split's documents as one flat byte stream (a uint8 .npy joined by SEPARATOR), and the
windows training reads from it, memory-mapped."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

SEPARATOR = 0  # byte placed between documents; absent from text and from synthetic output


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
