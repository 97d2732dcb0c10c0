"""The partitioner against brute force: optimal, never an empty stage, clear errors."""

from __future__ import annotations

import itertools
import random

import pytest

from lightning_mp.plan.partition import (
    InfeasiblePartition,
    check_explicit_balance,
    optimal_balance,
    optimal_partition,
    uniform_balance,
)
from lightning_mp.runtime.errors import ModelSplitError


def _max_stage(costs: list[float], counts: list[int], first: float, last: float) -> float:
    worst, start = 0.0, 0
    for s, c in enumerate(counts):
        cost = sum(costs[start : start + c]) + (first if s == 0 else 0) + (last if s == len(counts) - 1 else 0)
        worst = max(worst, cost)
        start += c
    return worst


def _brute_force(costs: list[float], stages: int, first: float, last: float) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        counts = [b - a for a, b in itertools.pairwise(bounds)]
        best = min(best, _max_stage(costs, counts, first, last))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_optimal_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    stages = rng.randint(1, n)
    costs = [rng.choice([0.0, rng.random() * 10]) for _ in range(n)]
    first, last = rng.random() * 5, rng.random() * 15
    counts = optimal_balance(costs, stages, first, last)
    assert len(counts) == stages and sum(counts) == n and min(counts) >= 1
    assert _max_stage(costs, counts, first, last) == pytest.approx(_brute_force(costs, stages, first, last))


def test_optimal_moves_layers_away_from_a_heavy_last_stage() -> None:
    assert optimal_balance([1.0] * 8, 2, last_extra=4.0) == [6, 2]


def test_uniform_puts_the_extra_layers_first() -> None:
    assert uniform_balance(7, 3) == [3, 2, 2]
    assert uniform_balance(4, 4) == [1, 1, 1, 1]


def test_fewer_layers_than_stages_is_reported_with_the_fix() -> None:
    with pytest.raises(ModelSplitError, match=r"3 layers but pipeline_parallel_size=4.*at most 3"):
        uniform_balance(3, 4)
    with pytest.raises(ModelSplitError, match="3 layers but pipeline_parallel_size=4"):
        optimal_balance([1, 2, 3], 4)


@pytest.mark.parametrize(
    ("balance", "message"),
    [([2, 2, 2], "3 entries but there are 2 pipeline stages"), ([4, 0], "positive int"), ([3, 2], "sums to 5")],
)
def test_explicit_balance_errors(balance: list[int], message: str) -> None:
    with pytest.raises(ModelSplitError, match=message):
        check_explicit_balance(balance, 4, 2)
    assert check_explicit_balance([1, 3], 4, 2) == [1, 3]


@pytest.mark.parametrize("seed", range(30))
def test_optimal_partition_under_a_memory_limit_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 8)
    stages = rng.randint(1, n)
    time_cost = [rng.random() for _ in range(n)]
    memory = [rng.random() for _ in range(n)]
    limit = rng.uniform(0.5, 3.0)

    def cost(stage: int, start: int, end: int) -> float:
        return sum(time_cost[start:end]) if sum(memory[start:end]) <= limit else float("inf")

    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        best = min(best, max(cost(s, a, b) for s, (a, b) in enumerate(itertools.pairwise(bounds))))
    if best == float("inf"):
        with pytest.raises(InfeasiblePartition):
            optimal_partition(n, stages, cost)
        return
    counts = optimal_partition(n, stages, cost)
    assert min(counts) >= 1 and sum(counts) == n
    starts = list(itertools.accumulate([0, *counts]))
    assert max(cost(s, starts[s], starts[s + 1]) for s in range(stages)) == pytest.approx(best)
