"""Choosing how many consecutive layers each pipeline stage runs: a balance is a plain ``list[int]``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lightning_mp.runtime.errors import ModelSplitError

BALANCE_CHOICES: tuple[str, ...] = ("uniform", "params", "time", "memory")  # besides a list of layer counts


class InfeasiblePartition(ModelSplitError):
    """No split satisfies the constraints (every split has an infinite stage cost)."""


def uniform_balance(num_layers: int, num_stages: int) -> list[int]:
    """Layer counts that differ by at most one, the larger counts first.

    The first stages get the extra layers: the last stage also runs the head and the loss.
    """
    _check_enough_layers(num_layers, num_stages)
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def optimal_balance(
    costs: Sequence[float], num_stages: int, first_extra: float = 0.0, last_extra: float = 0.0
) -> list[int]:
    """Contiguous split of ``costs`` into ``num_stages`` non-empty stages minimizing the costliest stage.

    ``first_extra`` and ``last_extra`` are fixed costs of the first and last stage (the modules that run before and
    after the layers).

    Example:
        >>> optimal_balance([1, 1, 1, 1, 4], 2)
        [4, 1]
    """
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def stage_cost(stage: int, start: int, end: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == num_stages - 1 else 0.0)
        return prefix[end] - prefix[start] + extra

    return optimal_partition(len(costs), num_stages, stage_cost)


def optimal_partition(num_layers: int, num_stages: int, stage_cost: Callable[[int, int, int], float]) -> list[int]:
    """Layer counts minimizing ``max_s stage_cost(s, start_s, end_s)`` over contiguous, non-empty stages.

    ``stage_cost(stage, start, end)`` is the cost of layers ``[start, end)`` on ``stage``; it may depend on the stage
    (1F1B keeps more micro-batches in flight on early stages). Exact dynamic programming over (stage, boundary),
    O(num_stages · num_layers²) cost evaluations; among optimal splits it returns the one whose stages end earliest,
    which is deterministic on every rank.
    """
    n = num_layers
    _check_enough_layers(n, num_stages)
    inf = float("inf")
    # best[s][j]: minimal max-stage-cost placing layers [0, j) on stages [0, s]; cut[s][j]: where stage s starts.
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n - num_stages + 2):
        best[0][j] = stage_cost(0, 0, j)
    for s in range(1, num_stages):
        for j in range(s + 1, n - (num_stages - s - 1) + 1):
            for i in range(s, j):
                candidate = max(best[s - 1][i], stage_cost(s, i, j))
                if candidate < best[s][j] - 1e-12 * max(1.0, abs(candidate)):
                    best[s][j], cut[s][j] = candidate, i
    if best[num_stages - 1][n] == inf:
        raise InfeasiblePartition(f"every split of {n} layers into {num_stages} stages has an infinite cost")
    counts, end = [], n
    for s in range(num_stages - 1, 0, -1):
        start = cut[s][end]
        counts.append(end - start)
        end = start
    counts.append(end)
    return counts[::-1]


def check_explicit_balance(balance: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    """Validate a user-given list of layer counts per stage.

    Raises:
        ModelSplitError: wrong length, a stage without layers, or counts that do not sum to the layer count.
    """
    counts = list(balance)
    if len(counts) != num_stages:
        raise ModelSplitError(
            f"balance={counts} has {len(counts)} entries but there are {num_stages} pipeline stages:"
            f" give one layer count per stage, e.g. balance={uniform_balance(num_layers, num_stages)}."
        )
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise ModelSplitError(
            f"balance={counts}: every stage needs a positive int number of layers, e.g."
            f" balance={uniform_balance(num_layers, num_stages)}."
        )
    if sum(counts) != num_layers:
        raise ModelSplitError(
            f"balance={counts} sums to {sum(counts)} but the model has {num_layers} layers:"
            f" the counts must sum to {num_layers}, e.g. balance={uniform_balance(num_layers, num_stages)}."
        )
    return counts


def _check_enough_layers(num_layers: int, num_stages: int) -> None:
    if num_stages < 1:
        raise ModelSplitError(f"pipeline_parallel_size must be at least 1, got {num_stages}.")
    if num_layers < num_stages:
        raise ModelSplitError(
            f"the model has {num_layers} layers but pipeline_parallel_size={num_stages}: every stage needs at least"
            f" one layer. Lower pipeline_parallel_size to at most {num_layers}, or point layers= at a container"
            " with more blocks."
        )
