"""contract.memory: what the accumulators cost and how they split into passes (issue 27)."""

import math

import pytest

from contract import memory as mem

STRATA = ("all", "head", "mid", "tail")


def test_an_accumulator_is_a_float64_scatter_and_mean_and_all_needs_every_part():
    assert mem.accumulator_bytes(1024) == 8 * (1024 * 1024 + 1024)
    assert mem.parts(STRATA) == 4 and mem.parts(["all"]) == 4  # `all` is the merge of all four parts
    assert mem.parts(["tail"]) == 1 and mem.parts(["head", "tail"]) == 2
    # the merged `all` lives beside its parts while it is decomposed
    assert mem.unit_bytes(64, STRATA) == 5 * mem.accumulator_bytes(64)
    assert mem.unit_bytes(64, ["tail"]) == mem.accumulator_bytes(64)


def test_the_eigensolver_batch_is_bounded_by_batch_bytes_but_holds_one_matrix_at_least():
    one = 8 * 8192 * 8192  # 512 MiB
    assert mem.decompose_bytes(8192, 10) == 2 * 2 * one  # two per 1 GiB batch, and the solver's copy
    assert mem.decompose_bytes(16384, 3) == 2 * 8 * 16384 * 16384  # larger than a batch: one at a time
    assert mem.decompose_bytes(64, 0) == 0


def test_a_plan_packs_units_in_order_within_the_budget_and_one_pass_when_all_fit():
    units = [((layer, site), 256) for layer in range(4) for site in ("pre", "post")]
    whole = mem.pass_bytes([256] * 8, STRATA)
    big = mem.plan_passes(units, STRATA, whole)
    assert big.n_passes == 1 and big.peak == big.whole == whole
    tight = mem.plan_passes(units, STRATA, mem.pass_bytes([256] * 3, STRATA))
    assert [len(p) for p in tight.passes] == [3, 3, 2]
    assert [k for p in tight.passes for k in p] == [k for k, _ in units]  # measuring order kept
    assert tight.peak <= tight.budget and tight.part_of((3, "post")) == 2
    alone = mem.plan_passes(units, STRATA, mem.pass_bytes([256], STRATA))
    assert alone.n_passes == 8


def test_a_unit_over_the_budget_is_refused_with_its_numbers():
    with pytest.raises(mem.MemoryBudgetError, match=r"measure\.memory: one layer × site of width 8192 needs "
                                                     r"4\.50 GiB .* over the budget of 300\.0 MiB"):
        mem.plan_passes([((0, "pre"), 8192)], STRATA, 300 * mem.MiB)


@pytest.mark.parametrize("text, size", [("512MiB", 512 * 2**20), ("2 GiB", 2 * 2**30), ("1.5GB", 1_500_000_000),
                                        ("300M", 300_000_000), (4096, 4096), ("7", 7), (1.5e9, 1_500_000_000),
                                        ("1kib", 1024)])
def test_sizes_are_read_with_units(text, size):
    assert mem.parse_bytes(text) == size


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "", "   ", "12 parsecs", "1e3GiB", "0", 0, True, "1" * 400,
                                 "9" * 30 + "TiB", "\x00", "１２MiB", math.nan, math.inf, None, [1], {"a": 1}])
def test_hostile_sizes_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        mem.parse_bytes(bad)


def test_the_default_budget_is_a_share_of_the_device():
    assert mem.default_budget(8 * mem.GiB) == 4 * mem.GiB
    assert 0 < mem.default_budget() <= mem.machine_memory()


@pytest.mark.parametrize("n_units, dim, fit", [(8, 256, 3), (48, 4096, 7), (5, 64, 1), (3, 128, 10)])
def test_the_uniform_plan_is_the_greedy_plan_in_arithmetic(n_units, dim, fit):
    budget = mem.uniform_pass_bytes(dim, fit, STRATA) + 1
    greedy = mem.plan_passes([((i, "pre"), dim) for i in range(n_units)], STRATA, budget)
    uniform = mem.uniform_plan(n_units, dim, STRATA, budget)
    assert (uniform.n_passes, uniform.peak, uniform.whole) == (greedy.n_passes, greedy.peak, greedy.whole)
    assert mem.uniform_pass_bytes(dim, n_units, STRATA) == mem.pass_bytes([dim] * n_units, STRATA)


def test_a_billion_layers_are_planned_in_arithmetic():
    plan = mem.uniform_plan(2 * 10**9, 64, STRATA, 8 * mem.GiB)
    assert plan.n_passes > 1 and plan.peak <= 8 * mem.GiB and plan.passes == ()
    with pytest.raises(mem.MemoryBudgetError, match="width 10240 needs"):
        mem.uniform_plan(64, 10240, STRATA, mem.GiB)
