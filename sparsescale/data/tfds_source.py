"""Any stock TFDS text dataset (e.g. `tiny_shakespeare`): the bytes of its text feature."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import os

import tensorflow_datasets as tfds

from sparsescale.data.config import BUILTIN_DATASETS, TRAIN, VALIDATION
from sparsescale.data.stream import SEPARATOR


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
