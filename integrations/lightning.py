"""A Lightning `Callback` that measures FFN spectra during training into a specdb store.

    from integrations.lightning import SpecdbLightningCallback
    trainer = L.Trainer(max_steps=6000, callbacks=[SpecdbLightningCallback(
        "specdb.duckdb", every=200, optimizer="Muon", token_counts=counts, model_attr="model")])

At the first step, every `every`-th and the last (contract.sizes.is_measured) the forwards of that training step are measured (at
most `tokens` positions when given): the batch's `input_ids` (and `attention_mask`) label the positions. `model_attr` names the
LightningModule's attribute holding the language model (None: the module itself). Logged
`train_loss` / `val_loss` metrics join the step's record. When training ends the run is stored.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from contract.sizes import is_measured
from spectraldb.track import track
from workers.probe import attach, model_config, model_shape


def _ids(batch):
    if isinstance(batch, dict):
        return batch.get("input_ids"), batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], None
    return (batch, None) if isinstance(batch, torch.Tensor) else (None, None)


class SpecdbLightningCallback(Callback):
    def __init__(self, store, *, every: int, optimizer: str, model_attr: str | None = None, tokens: int | None = None,
                 token_counts=None,
                 token_strata=None, strata=None, min_stratum_tokens: int = 1000, strata_scope: str = "global",
                 patterns=None, factors: dict | None = None, seed: int = 0, last_k: int = 5, **declared):
        self.store, self.every, self.optimizer, self.model_attr = store, every, optimizer, model_attr
        self.tokens, self.remaining = tokens, tokens
        self.probe_args = dict(token_counts=token_counts, token_strata=token_strata, strata=strata,
                               min_tokens=min_stratum_tokens, strata_scope=strata_scope, patterns=patterns)
        self.factors, self.seed, self.last_k, self.declared = factors or {}, seed, last_k, declared
        self.run = self.probe = self.block = self.started_at = None

    def _model(self, pl_module):
        return getattr(pl_module, self.model_attr) if self.model_attr else pl_module

    def on_train_start(self, trainer, pl_module):
        model = self._model(pl_module)
        self.probe = attach(model, **self.probe_args)
        shape = model_shape(model, self.probe) | self.declared
        # max_steps is -1 when training runs by epochs: Lightning's own estimate of the total then
        self.total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 \
            else int(trainer.estimated_stepping_batches)
        self.run = track(self.store, optimizer=self.optimizer, steps=self.total, seed=self.seed,
                         every=self.every, tokens=self.tokens, last_k=self.last_k, factors=self.factors,
                         probe=self.probe,
                         model_config=model_config(model), **shape)

    def _measured(self, step: int, trainer) -> bool:
        return is_measured(step, self.total, self.every)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids, mask = _ids(batch)
        if ids is not None and self._measured(trainer.global_step + 1, trainer):
            if self.started_at != trainer.global_step:
                self.remaining = self.tokens  # a measured step begins: a fresh token budget
            self.block, self.started_at = self.probe.measuring(ids, mask, limit=self.remaining), trainer.global_step
            self.block.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.block is None:
            return
        self.block.__exit__(None, None, None)
        self.block = None
        if self.remaining is not None:
            self.remaining -= self.probe.counted
        if trainer.global_step == self.started_at:
            return  # a micro-batch of an accumulating step: the step's last one computes the spectra
        metrics = trainer.callback_metrics
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.run.log(trainer.global_step, probe=self.probe,
                     train_loss=float(loss) if isinstance(loss, torch.Tensor) else None,
                     val_loss=float(metrics["val_loss"]) if "val_loss" in metrics else None)

    def on_train_end(self, trainer, pl_module):
        if self.block is not None:
            self.block.__exit__(None, None, None)
        self.run.finish("done")
