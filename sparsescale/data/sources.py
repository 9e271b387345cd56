"""The source protocol: how each dataset name is built, fingerprinted and read."""

from __future__ import annotations

from typing import Protocol

import tensorflow_datasets as tfds

from sparsescale.data.config import TRAIN, VALIDATION


class Source(Protocol):
    """What `prepare` needs of a dataset: a lock name, a fingerprint of its bytes, its TFDS builder
    and how to build it, the split and feature names, and (synthetic only) the exact entropy."""

    lock_name: str
    fingerprint: str
    entropy_rate_nats: float | None

    def builder(self, data_dir: str) -> tfds.core.DatasetBuilder: ...

    def download_and_prepare(self, builder, data_dir: str) -> None: ...

    def split_names(self, builder) -> dict[str, str]: ...

    def text_feature(self, builder) -> str: ...


class _OwnBuilderMixin:
    """Sources whose TFDS builder is defined here: splits train/validation, feature "text"."""

    def download_and_prepare(self, builder, data_dir: str) -> None:
        del data_dir
        builder.download_and_prepare(file_format="array_record")

    def split_names(self, builder) -> dict[str, str]:
        return {TRAIN: TRAIN, VALIDATION: VALIDATION}

    def text_feature(self, builder) -> str:
        return "text"
