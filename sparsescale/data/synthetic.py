"""The `synthetic` dataset: a seeded k-th order Markov language whose entropy rate is known
exactly."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math

import numpy as np
import tensorflow_datasets as tfds

from sparsescale.data.config import (
    _SYNTHETIC_DOC_LEN,
    _SYNTHETIC_MAX_TABLE,
    TRAIN,
    VALIDATION,
    DataConfig,
)
from sparsescale.data.sources import _OwnBuilderMixin
from sparsescale.data.stream import SEPARATOR


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
