"""A spectral probe for any PyTorch language model: FFN activation covariances by token stratum.

    probe = attach(model, token_strata=strata_of_each_id)          # finds the FFNs (SITE_FAMILIES)
    with probe.measuring(input_ids, attention_mask):                # hooks live only in this block
        model(input_ids, attention_mask=attention_mask)             # any number of micro-batches
    records = probe.compute(step)                                   # contract.records.Spectrum, reset

One measurement path: specdb's own training loop measures through this probe too
(`workers.measurement.accumulate`). Where the sites are and how a gated FFN's are defined:
workers/sites.py; every run stores which definition it used (`SITE_DEFINITIONS`).

Padded positions (attention_mask 0) never enter a covariance; `min_tokens` is the strata's floor
(the pooled `all` spectrum is never skipped, protocol 3). Forwards between `compute()` calls
merge exactly. Under torch.compile the forwards inside `measuring` run eagerly (compiled code never
re-checks module hooks); the compiled graphs are untouched, so other steps neither pay nor
recompile. Under torch.distributed the accumulators are reduced across ranks exactly (count,
mean, centred scatter, merged in rank order) before decomposition. Between measurements no hook
is installed; inside one, an activation-checkpoint recomputation during backward is not counted.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from contract import memory as mem
from contract.records import Spectrum
from contract.vocabulary import SITE_DEFINITIONS, SITES, STRATA
from workers.collectives import _rank, _world, fold_to_owner, reduce_across_ranks
from workers.extract import (METRIC_SETS, PRECISIONS, NonFiniteActivations, StreamingCovariance, decompose,
                             eigenvalues_of)
from workers.layouts import batch_first, check_unsharded, whole_features
from workers.positions import MEASURED, REST, by_stratum, label, strata_table  # noqa: F401 - strata_table: the API
from workers.sites import (SITE_FAMILIES, ProbeError, Site, declared_widths, find_sites,  # noqa: F401 - the API
                           device_budget, model_config, model_shape, pre_width)


class Probe:
    """Per-stratum covariances at the FFN sites of `model`. `token_strata`: stratum of every token
    id (None: every position counts as `all` only). `strata` and `min_tokens` as in a spec's
    `measure:`; `precision` one of workers.extract.PRECISIONS. `memory`: the accumulators' budget in
    bytes (None: contract.memory.default_budget of the model's device); when the model's do not
    fit it, the measurement runs in passes (`parts`) over the same tokens, with the spectra of one."""

    def __init__(self, model: torch.nn.Module, sites: list[Site], *, token_strata=None, measure=SITES,
                 strata=STRATA, min_tokens: int = 1000, precision: str = "fp64", strata_scope: str = "global",
                 group=None, memory: int | None = None, shard: bool = False, metrics: str = "full",
                 tensor_parallel=None):
        if precision not in PRECISIONS:
            raise ProbeError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        if metrics not in METRIC_SETS:
            raise ProbeError(f"metrics: expected one of {', '.join(METRIC_SETS)}, got {metrics!r}")
        self.metrics = metrics
        if token_strata is None and any(s != "all" for s in strata):
            raise ProbeError("strata: head/mid/tail need a token-strata table (token_strata=…); without one, "
                             "measure strata=('all',)")
        self.model, self.sites, self.measure = model, list(sites), tuple(measure)
        self.strata, self.min_tokens, self.precision = tuple(strata), min_tokens, precision
        self.strata_scope, self.group = strata_scope, group
        # a DeviceMesh's group or a ProcessGroup: the ranks that each hold a slice of every FFN
        self.tp_group = tensor_parallel.get_group() if hasattr(tensor_parallel, "get_group") else tensor_parallel
        self.token_strata = None if token_strata is None else torch.as_tensor(np.asarray(token_strata), dtype=torch.int64)
        if self.token_strata is not None and (self.token_strata.ndim != 1 or not self.token_strata.numel() or
                                              int(self.token_strata.min()) < 0 or int(self.token_strata.max()) > 2):
            raise ProbeError("token strata: expected one stratum per token id, each 0 (head), 1 (mid) or 2 (tail)")
        # the accumulator parts a (layer, site) needs: all four when `all` (their merge) is measured
        self.needed = tuple(range(REST + 1)) if "all" in self.strata else \
            tuple(MEASURED.index(s) for s in self.strata)
        self.widths = declared_widths(model, self.sites)
        self.names = {(site.layer, name): getattr(site, name) for site in self.sites for name in SITES}
        units = [((site.layer, name), self.widths[(site.layer, "pre")] or pre_width(
            dict(model.named_modules())[site.pre], site)) for site in self.sites for name in self.measure]
        # sharded: each (layer, site) of a pass has one owner rank, so a rank holds 1/W of a pass
        self.world = _world(group) if shard else 1
        budget = (memory if memory is not None else device_budget(model)) * self.world
        try:
            self.plan = mem.plan_passes(units, self.strata, budget)
        except mem.MemoryBudgetError as exc:
            raise ProbeError(str(exc)) from None
        self.owner = {key: i % self.world for keys in self.plan.passes for i, key in enumerate(keys)}
        self.order_of = {key: i for i, (key, _) in enumerate(units)}
        self.rank = _rank(group) if self.world > 1 else 0
        self.error: str | None = None  # a sharded pass's non-finite activations, raised on every rank at compute()
        self.acc: dict[tuple, StreamingCovariance] = {}
        self.part: int | None = None         # the pass the accumulators belong to
        self.finished: list[Spectrum] = []   # earlier passes' spectra (eigenvalues, no metrics yet)
        self.order: torch.Tensor | None = None
        self.counts: list[int] = []
        self._handles: list = []

    def where(self) -> tuple[str | None, str | None]:
        """(device, dtype) of the model's parameters: what a tracked run stores of where it ran."""
        param = next(self.model.parameters(), None)
        return (None, None) if param is None else (str(param.device), str(param.dtype).removeprefix("torch."))

    @property
    def parts(self) -> range:
        """The passes of one measurement: run the step's measured forwards once per part."""
        return range(self.plan.n_passes)

    @property
    def gated(self) -> bool:
        return any(s.gated for s in self.sites)

    @property
    def site_definition(self) -> str:
        return SITE_DEFINITIONS[self.gated]

    # ------------------------------------------------------------------ measuring

    @contextlib.contextmanager
    def measuring(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  limit: int | None = None, all_limit: int | None = None, part: int | None = None):
        """The forwards inside this block are measured, their positions labelled as
        workers.positions.label says (`self.counted`: how many counted). `part`: which pass of
        `parts` these forwards feed (needed only when there are several; another part finishes
        the one before)."""
        if part is None:
            if self.plan.n_passes > 1:
                raise ProbeError(f"memory: this model's accumulators need {mem.fmt_bytes(self.plan.whole)}, over the "
                                 f"budget of {mem.fmt_bytes(self.plan.budget)}: measure in {self.plan.n_passes} passes "
                                 "(for part in probe.parts: with probe.measuring(…, part=part): …) or raise memory=")
            part = 0
        if part not in self.parts:
            raise ProbeError(f"part: {part} is not one of this probe's {self.plan.n_passes} passes")
        if self.part is not None and part != self.part:
            self._finish_pass()
        self.part = part
        keys = set(self.plan.passes[part])
        self._label(input_ids, attention_mask, limit, all_limit)
        modules = dict(self.model.named_modules())
        # compiled code does not re-check module hooks: the measured forwards run eagerly (the
        # compiled graphs stay as they are, so the steps between measurements never recompile)
        try:
            with torch.compiler.set_stance("force_eager"):
                for site in self.sites:
                    if "pre" in self.measure and (site.layer, "pre") in keys:
                        self._handles.append(modules[site.pre].register_forward_hook(
                            lambda m, inp, out, site=site: self._fold(site, "pre", out)))
                    if "post" in self.measure and (site.layer, "post") in keys:
                        self._handles.append(modules[site.post].register_forward_pre_hook(
                            lambda m, inp, site=site: self._fold(site, "post", inp[0])))
                yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self.order = None

    def _label(self, input_ids, attention_mask, limit: int | None = None, all_limit: int | None = None) -> None:
        ids = torch.as_tensor(input_ids)
        if self.token_strata is not None and self.token_strata.device != ids.device:
            self.token_strata = self.token_strata.to(ids.device)
        labels = label(ids, self.token_strata, attention_mask, limit, all_limit)
        self.shape, self.positions = labels.shape, labels.positions
        self.order, self.counts, self.n_pad, self.counted = labels.order, labels.counts, labels.n_pad, labels.counted

    def _fold(self, where: Site, site: str, act) -> None:
        if self.order is None or torch._C._current_graph_task_id() != -1:
            return  # outside `measuring`, or a checkpointed forward recomputed during backward
        layer = where.layer
        name = self.names[(layer, site)]
        act, (tp_rank, tp_world) = whole_features(where, site, act, self.tp_group, name)
        check_unsharded(act, self.widths[(layer, site)], layer, site, name)
        act = batch_first(where, site, act, self.shape, name)
        dim = act.shape[-1]
        if act.numel() != self.positions * dim:
            raise ProbeError(f"site {site} of layer {layer}: the activations hold {act.numel() // dim} positions, "
                             f"the input ids {self.positions}")
        accumulate = PRECISIONS[self.precision].accumulate
        mine = self.owner[(layer, site)] == self.rank
        if mine and (layer, site, self.needed[0]) not in self.acc:
            for s in self.needed:
                self.acc[(layer, site, s)] = StreamingCovariance(dim, accumulate, act.device)
        # hooks run inside the forward's autocast region, which would turn a float32 product into
        # a bfloat16 one on a GPU: the products keep the precision policy's dtype
        with torch.autocast(act.device.type, enabled=False):
            # one gather sorts the positions by stratum (padded ones left out); it is a fresh copy,
            # so each stratum's rows are converted once and centred in place
            x = act.detach().reshape(-1, dim).index_select(0, self.order).to(accumulate)
            parts = torch.split(x, self.counts)
            if tp_world > 1:  # every TP rank holds the same whole rows: each folds its share of them
                parts = [rows.tensor_split(tp_world)[tp_rank] for rows in parts]
            if self.world > 1:
                owner = self.owner[(layer, site)]
                fold_to_owner([self.acc.get((layer, site, s)) for s in self.needed], self.needed, parts, owner,
                              self.group)
                return
            for s, rows in enumerate(parts):
                if rows.shape[0] and s in self.needed:
                    self.acc[(layer, site, s)]._update_owned(rows)

    # ------------------------------------------------------------------ results

    def select(self) -> list[tuple[Spectrum, StreamingCovariance | None]]:
        """One (record, covariance to decompose) per layer × site × stratum, after the reduction
        across ranks; a stratum under the token floor gets None, and so does every spectrum of an
        earlier pass (its eigenvalues already in the record). Hands the accumulators over and
        starts afresh. Raises NonFiniteActivations here, synchronously."""
        if not self.acc and not self.finished and self.part is None:
            raise ProbeError("nothing measured: run the model inside `with probe.measuring(input_ids):` first")
        if self.part is not None and self.part != self.plan.n_passes - 1:
            raise ProbeError(f"passes: measured {self.part + 1} of {self.plan.n_passes}; run every part before compute()")
        done, self.finished = [(rec, None) for rec in self.finished], []
        out = done + self._select_pass()
        self.part = None
        return out

    def _finish_pass(self) -> None:
        """Decompose the current pass now (eigenvalues only: the metrics pair pre with post at
        the end) and free its accumulators before the next pass allocates its own."""
        try:
            selected = self._select_pass()
        except NonFiniteActivations as exc:
            if self.world == 1:
                raise
            self.error, selected = str(exc), []  # raised on every rank at compute(), not in a hook's collective
        eigenvalues_of(selected, self.precision, self.metrics)
        self.finished += [rec for rec, _ in selected]

    def _select_pass(self) -> list[tuple[Spectrum, StreamingCovariance | None]]:
        if not self.acc and self.world == 1:
            raise ProbeError("nothing measured: run the model inside `with probe.measuring(input_ids):` first")
        acc, self.acc = self.acc, {}
        if self.world == 1 and _world(self.group) > 1:
            acc = reduce_across_ranks(acc, self.group)
        out = []
        for site in self.sites:
            for name in self.measure:
                if (site.layer, name, self.needed[0]) not in acc:
                    continue  # another pass's unit
                out += by_stratum({s: acc[(site.layer, name, s)] for s in self.needed}, self.strata,
                                  self.min_tokens, site.layer, name)
        kept = [c.m2 for _, c in out if c is not None]
        if kept and not torch.isfinite(torch.stack([m.sum() for m in kept])).all():
            raise NonFiniteActivations("non-finite FFN activations: the covariance has inf or NaN entries")
        return out

    def compute(self, step: int = 0) -> list[Spectrum]:
        """Every spectrum with its metrics (as specdb's worker stores them), and a fresh start.
        Sharded: each rank decomposes the covariances it owns, and every rank gets every record."""
        if self.world == 1:
            return decompose(self.select(), self.precision, step, self.metrics)
        import torch.distributed as dist

        try:
            mine = self.select()
            eigenvalues_of(mine, self.precision, self.metrics)
        except NonFiniteActivations as exc:
            self.error, mine = str(exc), []
        error, self.error = self.error, None
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (error, [rec for rec, _ in mine]), group=self.group)
        errors = [e for e, _ in gathered if e]
        if errors:
            raise NonFiniteActivations(errors[0])
        records = sorted((rec for _, recs in gathered for rec in recs),
                         key=lambda r: (self.order_of[(r.layer, r.site)], self.strata.index(r.stratum)))
        return decompose([(rec, None) for rec in records], self.precision, step)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach(model: torch.nn.Module, *, patterns: tuple[str, str] | None = None, token_strata=None,
           token_counts=None, strata_scope: str = "global", measure=SITES, strata=None, min_tokens: int = 1000,
           precision: str = "fp64", group=None, memory: int | None = None, shard: bool = False,
           metrics: str = "full", gated: bool = False, tensor_parallel=None, sequence_first: bool = False,
           stack: str | None = None) -> Probe:
    """A Probe on the FFNs of `model` (found by family, or by `patterns`). Strata come from
    `token_strata` (stratum of each id) or `token_counts` (a count per id: the study's frequency
    rule, reduced across ranks by `strata_scope`); with neither, only `all` is measured. `gated`
    says whether the first projection `patterns` names is a gate (families know their own). With
    `shard` under torch.distributed, each layer × site's accumulators live on one owner rank (every
    rank must run the same measured forwards); `memory` is then each rank's budget. `metrics`
    `hard_only` stores the hard rank alone, without an eigendecomposition. `tensor_parallel` (a
    ProcessGroup or 1-D DeviceMesh): the ranks among which each FFN's features are split; each
    site's slices are gathered into the whole features, exactly (a DTensor activation needs no
    declaration). `sequence_first`: `patterns`' activations are [s, b, h] (families know theirs).
    `stack`: one layer set of a model with several (T5: `encoder` or `decoder`), layers numbered
    within it; without it every FFN is measured (T5: numbered encoder first)."""
    table = None
    if token_strata is not None or token_counts is not None:
        table = strata_table(token_counts, strata_of_ids=token_strata, scope=strata_scope, group=group)
    strata = tuple(strata) if strata is not None else (STRATA if table is not None else ("all",))
    return Probe(model, find_sites(model, patterns, gated, sequence_first, stack), token_strata=table, measure=measure,
                 strata=strata, min_tokens=min_tokens, precision=precision, strata_scope=strata_scope, group=group,
                 memory=memory, shard=shard, metrics=metrics, tensor_parallel=tensor_parallel)
