"""An HF `TrainerCallback` that measures FFN spectra during training into a specdb store.

    from integrations.hf import SpecdbCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SpecdbCallback("specdb.duckdb", every=200, optimizer="AdamW",
                                                token_counts=counts, factors={"dataset": "fineweb"})])

At the first optimizer step, every `every`-th and the last (contract.sizes.is_measured) the forwards of that step — its micro-batches,
pads left out, at most `tokens` positions when given — are measured; HF callbacks never see the batch, so the token ids come from a
forward pre-hook on the model. Train and eval losses of those steps come from the trainer's logs
(set `logging_steps` and `eval_steps` to a divisor of `every` to have them). When training
ends the run is stored (spectraldb.track): committed, or spooled while a `specdb run` holds the store.
"""

from __future__ import annotations

from transformers import TrainerCallback

from contract.sizes import is_measured
from integrations.common import Tap
from spectraldb.track import track
from workers.probe import attach, model_config, model_shape


class SpecdbCallback(TrainerCallback):
    def __init__(self, store, *, every: int, optimizer: str, tokens: int | None = None, token_counts=None,
                 token_strata=None,
                 strata=None, min_stratum_tokens: int = 1000, strata_scope: str = "global", patterns=None,
                 factors: dict | None = None, seed: int | None = None, last_k: int = 5, **declared):
        self.store, self.every, self.optimizer, self.tokens = store, every, optimizer, tokens
        self.probe_args = dict(token_counts=token_counts, token_strata=token_strata, strata=strata,
                               min_tokens=min_stratum_tokens, strata_scope=strata_scope, patterns=patterns)
        self.factors, self.seed, self.last_k, self.declared = factors or {}, seed, last_k, declared
        self.run = self.tap = self.probe = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.probe = attach(model, **self.probe_args)
        self.tap = Tap(model, self.probe, self.tokens)
        shape = model_shape(model, self.probe) | self.declared
        self.run = track(self.store, optimizer=self.optimizer, steps=state.max_steps,
                         seed=args.seed if self.seed is None else self.seed, every=self.every, last_k=self.last_k,
                         tokens=self.tokens,
                         factors=self.factors, probe=self.probe, model_config=model_config(model),
                         batch_size=args.per_device_train_batch_size * max(1, args.world_size)
                         * args.gradient_accumulation_steps, **shape)

    def _measured(self, step: int, state) -> bool:
        return is_measured(step, state.max_steps, self.every)

    def on_step_begin(self, args, state, control, **kw):
        self.tap.arm(self._measured(state.global_step + 1, state))

    def on_step_end(self, args, state, control, **kw):
        if self.tap.armed:
            self.tap.arm(False)
            self.run.log(state.global_step, probe=self.probe)

    def on_log(self, args, state, control, logs=None, **kw):
        """The trainer logs a step's losses after its on_step_end: they join that step's record."""
        logs = logs or {}
        if self._measured(state.global_step, state) and ("loss" in logs or "eval_loss" in logs):
            self.run.log(state.global_step, train_loss=logs.get("loss"), val_loss=logs.get("eval_loss"))

    def on_train_end(self, args, state, control, **kw):
        self.tap.remove()
        self.run.finish("done")
