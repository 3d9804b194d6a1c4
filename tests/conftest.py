"""Shared fixtures: a synthetic corpus (no third-party text), tiny specs, an isolated cache."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest


def make_corpus(folder: Path, n_docs: int = 40, words_per_doc: int = 400, seed: int = 0) -> Path:
    """Zipf-distributed made-up words: a head of frequent words and a long tail, like prose."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lexicon = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(600)]
    weights = 1.0 / np.arange(1, len(lexicon) + 1)
    weights /= weights.sum()
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        words = rng.choice(lexicon, size=words_per_doc, p=weights)
        (folder / f"doc{d:03d}.txt").write_text(" ".join(words) + ".\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPECDB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("SPECDB_DB", raising=False)


def tiny_spec(corpus: Path, store: Path, sweep: str = "", steps: int = 6, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        name: tiny
        store: {store}
        data: {{corpus: {corpus}, vocab_size: 300, context: 16, heldout_fraction: 0.2}}
        model: {{n_layer: 2, d_model: 16, n_head: 2, ffn_mult: 1}}
        train: {{steps: {steps}, batch_size: 4, seed: 0, device: cpu, eval_tokens: 256}}
        measure: {{every: 3, last_k: 2, tokens: 1024, min_stratum_tokens: 20}}
        """) + extra + sweep


TINY_SWEEP = "sweep:\n  optimizer: [adamw, muon]\n  ffn_mult: [1, 2, 4]\n"


@pytest.fixture
def tiny(tmp_path, corpus):
    """Write a tiny 2 optimizers × 3 widths spec; returns (spec path, store path)."""
    store = tmp_path / "tiny.duckdb"
    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_spec(corpus, store, TINY_SWEEP))
    return spec, store
