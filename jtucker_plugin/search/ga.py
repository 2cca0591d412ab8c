"""A genetic algorithm over per-layer Tucker ranks: the rank strategy ``ga``.

A chromosome holds the ranks ``(R1, R2)`` of every layer; its fitness is the accuracy proxy
``evaluate(ranks)`` offered by the orchestrator (decompose a copy of the bundle at those ranks,
score it on a calibration subset) minus a penalty on the cost beyond the budget::

    fitness = accuracy - penalty * max(0, cost / cap - 1)

``cost`` and ``cap`` mean what they mean for the ``budget`` strategy: a layer costs
``min(dense, Tucker)`` parameters (all tasks) or MACs (one task), and the cap is a fraction of
the layers' dense total. Ranks live on a grid per mode (``1, step, 2 step, ..., full``), so they
stay in ``[1, full]`` and the search space shrinks with ``rank_step``.

The search (Srinivas & Patnaik, 1994, "Adaptive probabilities of crossover and mutation in
genetic algorithms") starts around the greedy ``budget`` solution, which is feasible, and keeps
the ``elite`` best chromosomes each generation; parents come from tournaments; a pair of parents
crosses over (uniformly, gene by gene) and a child mutates (each gene moves a few grid steps)
with rates that adapt to fitness: high for chromosomes below the population's mean, falling
linearly to the low bound for the best one. A child that copies one already in the next
generation is mutated again, so that every slot is a distinct chromosome. Accuracies are
cached by the ranks the orchestrator would actually apply (ranks whose Tucker layer stores no
fewer parameters than the dense one mean "stay dense"), so a chromosome is scored once. The
answer is the most accurate chromosome within the budget ever evaluated (the cheaper on ties),
never one beyond it.

Built on numpy alone: the operators are a few lines each, and a GA library (pygad, DEAP) would
add a dependency without solving the two parts that matter here, the budget-aware start and
the deterministic, cached, parallel evaluation of an unpicklable closure.

Examples
--------
>>> import torch
>>> from jtucker_plugin.decompose.budget import Budget
>>> from jtucker_plugin.decompose.ranks import LayerInfo, select_ranks
>>> layer = LayerInfo("conv", 16, 16, (3, 3), 2, torch.ones(16), torch.ones(16))
>>> config = GAConfig(budget=Budget(params=0.5), generations=3, progress=False)
>>> ranks = select_ranks(config, [layer], evaluate=lambda r: sum(r["conv"]) / 32, seed=0)
>>> tucker_params(layer, ranks["conv"]) <= 0.5 * layer.dense_params
True
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from jtucker_plugin.decompose.budget import Budget, allocate_budget
from jtucker_plugin.decompose.ranks import (
    LayerInfo,
    Ranks,
    register_rank_strategy,
    tucker_macs,
    tucker_params,
)

Key = tuple[tuple[int, int], ...]


@dataclass(frozen=True, kw_only=True)
class GAConfig:
    """Options of the ``ga`` rank strategy (see the module docstring for the algorithm)."""

    strategy: Literal["ga"] = "ga"
    # the cap: {params: f} or {macs: f}, a fraction of the layers' dense cost, as for `budget`
    budget: Budget
    # population
    population: int = 16
    generations: int = 10
    elite: int = 2
    tournament: int = 3
    # adaptive rates [low, high]: crossover per pair of parents, mutation per gene
    crossover: tuple[float, float] = (0.6, 1.0)
    mutation: tuple[float, float] = (0.05, 0.25)
    # accuracy lost per unit of cost beyond the cap, relative to the cap
    penalty: float = 2.0
    # ranks take the values 1, rank_step, 2 * rank_step, ..., full
    rank_step: int = 4
    # fitness evaluation: 0 or 1 in this process, n > 1 in n forked worker processes
    workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for key, least in (
            ("population", 2),
            ("generations", 0),
            ("elite", 0),
            ("tournament", 1),
            ("rank_step", 1),
            ("workers", 0),
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{key}: expected an integer >= {least}, got {value!r}")
        if self.elite >= self.population:
            raise ValueError(f"elite: must be below population ({self.population}), got {self.elite}")
        if self.tournament > self.population:
            raise ValueError(
                f"tournament: must be at most population ({self.population}), got {self.tournament}"
            )
        for key in ("crossover", "mutation"):
            value = getattr(self, key)
            if not isinstance(value, tuple | list) or len(value) != 2 or not 0 <= value[0] <= value[1] <= 1:
                raise ValueError(f"{key}: expected [low, high] with 0 <= low <= high <= 1, got {value!r}")
            object.__setattr__(self, key, (float(value[0]), float(value[1])))
        if isinstance(self.penalty, bool) or not self.penalty >= 0:
            raise ValueError(f"penalty: expected a number >= 0, got {self.penalty!r}")


@dataclass(frozen=True)
class GAResult:
    """What :func:`search_ranks` found.

    Attributes
    ----------
    ranks
        ``{layer: (R1, R2)}``: the most accurate chromosome within the budget.
    accuracy
        Its accuracy proxy.
    cost_fraction
        Its cost as a fraction of the layers' dense cost (at most the budget's fraction).
    evaluations
        Calls of ``evaluate`` (distinct ranks scored).
    history
        One record per generation (0 is the initial population): ``generation``,
        ``best_accuracy`` (feasible, so far), ``best_fitness`` and ``mean_fitness`` (of the
        population), ``evaluations`` (so far).
    """

    ranks: Ranks
    accuracy: float
    cost_fraction: float
    evaluations: int
    history: list[dict[str, Any]] = field(default_factory=list)


@register_rank_strategy("ga", config=GAConfig)
def ga_ranks(
    config: GAConfig,
    layers: Sequence[LayerInfo],
    *,
    evaluate: Callable[[Ranks], float] | None = None,
    seed: int = 0,
) -> Ranks:
    """Ranks found by the genetic algorithm (see :func:`search_ranks`)."""
    if evaluate is None:
        raise ValueError(
            "rank strategy 'ga' scores candidate ranks and needs evaluate(ranks) -> accuracy; "
            "the tucker and jtucker stages offer it, select_ranks(..., evaluate=...) otherwise"
        )
    return search_ranks(layers, evaluate, config, seed=seed).ranks


def search_ranks(
    layers: Sequence[LayerInfo],
    evaluate: Callable[[Ranks], float],
    config: GAConfig,
    *,
    seed: int = 0,
) -> GAResult:
    """Search per-layer ranks maximising ``evaluate`` within a cost budget.

    Parameters
    ----------
    layers
        The layers to rank.
    evaluate
        ``{layer: (R1, R2)} -> accuracy proxy``; deterministic, as its results are cached and,
        with ``config.workers > 1``, computed in forked processes (it need not be picklable).
        It is first called in this process, on the greedy solution, so that whatever it loads
        lazily is loaded once and inherited by the workers.
    config
        The search's options.
    seed
        Seed of every random choice; the result does not depend on ``config.workers``.

    Returns
    -------
    GAResult

    Raises
    ------
    ValueError
        If there are no layers, the budget cannot be met (below the cost at ranks (1, 1)), or
        ``config.workers > 1`` where processes cannot be forked.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("ga ranks: no layers to rank")
    budget = config.budget
    try:
        greedy = allocate_budget(layers, budget.fraction, cost=budget.cost)
    except ValueError as err:
        raise ValueError(f"ga ranks: {err}") from None
    problem = _Problem(layers, budget, config.rank_step)
    rng = np.random.default_rng(seed)
    start = problem.snap(greedy)
    population = [start] + [
        _mutate(start, problem.sizes, config.mutation[1], rng, at_least_one=True)
        for _ in range(config.population - 1)
    ]
    cache: dict[Key, float] = {}

    def checked(keys: list[Key], accuracies: list[float]) -> None:
        for key, accuracy in zip(keys, accuracies, strict=True):
            if not math.isfinite(accuracy):
                raise ValueError(
                    f"ga ranks: evaluate returned {accuracy!r} for ranks {problem.ranks(key)}; "
                    "expected a finite accuracy proxy"
                )
            cache[key] = accuracy

    first = problem.key(start)
    checked([first], [float(evaluate(problem.ranks(first)))])
    best = _Best()
    history: list[dict[str, Any]] = []

    with (
        _evaluator(evaluate, config.workers) as run,
        _progress(config.generations + 1, config.progress) as bar,
    ):

        def score(population: list[np.ndarray]) -> np.ndarray:
            keys = [problem.key(g) for g in population]
            todo = list(dict.fromkeys(k for k in keys if k not in cache))
            checked(todo, run([problem.ranks(k) for k in todo]))
            fitness = np.empty(len(population))
            for i, (genome, key) in enumerate(zip(population, keys, strict=True)):
                cost = problem.cost(genome)
                fitness[i] = cache[key] - config.penalty * max(0.0, cost / problem.cap - 1)
                best.offer(genome, cache[key], cost, problem.cap)
            history.append(
                {
                    "generation": len(history),
                    "best_accuracy": best.accuracy,
                    "best_fitness": float(fitness.max()),
                    "mean_fitness": float(fitness.mean()),
                    "evaluations": len(cache),
                }
            )
            bar.set_postfix(best=f"{best.accuracy:.4f}", evaluations=len(cache))
            bar.update()
            return fitness

        fitness = score(population)
        for _ in range(config.generations):
            population = _breed(population, fitness, problem.sizes, config, rng)
            fitness = score(population)

    return GAResult(
        ranks=problem.ranks(problem.genes_to_ranks(best.genome)),
        accuracy=best.accuracy,
        cost_fraction=best.cost / problem.dense_total,
        evaluations=len(cache),
        history=history,
    )


# --------------------------------------------------------------------------------------------
# The problem: rank grids, costs, cache keys


class _Problem:
    """Layers, their rank grids and costs. A genome is an ``L x 2`` array of grid indices."""

    def __init__(self, layers: list[LayerInfo], budget: Budget, step: int):
        self.layers = layers
        self.grids = [(_grid(layer.out_channels, step), _grid(layer.in_channels, step)) for layer in layers]
        self.sizes = np.array([[len(g1), len(g2)] for g1, g2 in self.grids])
        self.by_params = budget.cost == "params"
        self.dense = [layer.dense_params if self.by_params else layer.dense_macs for layer in layers]
        self.dense_total = sum(self.dense)
        self.cap = budget.fraction * self.dense_total

    def snap(self, ranks: Ranks) -> np.ndarray:
        """Ranks as a genome, each rounded down to its grid (so never costing more)."""
        return np.array(
            [
                [
                    np.searchsorted(grid, r, side="right") - 1
                    for grid, r in zip(grids, ranks[layer.name], strict=True)
                ]
                for layer, grids in zip(self.layers, self.grids, strict=True)
            ]
        )

    def genes_to_ranks(self, genome: np.ndarray) -> Key:
        return tuple(
            (int(g1[i1]), int(g2[i2])) for (g1, g2), (i1, i2) in zip(self.grids, genome, strict=True)
        )

    def key(self, genome: np.ndarray) -> Key:
        """The ranks the orchestrator applies: full ranks where Tucker would not save params."""
        out = []
        for layer, ranks in zip(self.layers, self.genes_to_ranks(genome), strict=True):
            if tucker_params(layer, ranks) >= layer.dense_params:
                ranks = (layer.out_channels, layer.in_channels)
            out.append(ranks)
        return tuple(out)

    def ranks(self, key: Key) -> Ranks:
        return {layer.name: r for layer, r in zip(self.layers, key, strict=True)}

    def cost(self, genome: np.ndarray) -> int:
        fn = tucker_params if self.by_params else tucker_macs
        return sum(
            min(dense, fn(layer, ranks))
            for layer, dense, ranks in zip(self.layers, self.dense, self.genes_to_ranks(genome), strict=True)
        )


def _grid(full: int, step: int) -> np.ndarray:
    """``1, step, 2 step, ..., full`` (each once, ascending)."""
    return np.unique(np.concatenate([[1], np.arange(step, full, step), [full]]))


@dataclass
class _Best:
    """The most accurate genome within the cap seen so far (the cheaper on ties)."""

    genome: np.ndarray | None = None
    accuracy: float = -np.inf
    cost: float = np.inf

    def offer(self, genome: np.ndarray, accuracy: float, cost: float, cap: float) -> None:
        if cost <= cap and (accuracy > self.accuracy or (accuracy == self.accuracy and cost < self.cost)):
            self.genome, self.accuracy, self.cost = genome.copy(), accuracy, cost


# --------------------------------------------------------------------------------------------
# Operators


_RETRIES = 10
"""Re-mutations of a child that is already in the next generation before it is let in."""


def _breed(
    population: list[np.ndarray],
    fitness: np.ndarray,
    sizes: np.ndarray,
    config: GAConfig,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The next generation: the elite, then children of tournament winners."""
    order = np.argsort(-fitness, kind="stable")
    children = [population[i].copy() for i in order[: config.elite]]
    seen = {child.tobytes() for child in children}
    f_max, f_avg = float(fitness.max()), float(fitness.mean())

    def rate(f: float, bounds: tuple[float, float]) -> float:
        # Srinivas & Patnaik: the best keep their genes, the below-average are reshuffled; a
        # converged population (max == mean) is reshuffled too, to get it moving again.
        low, high = bounds
        if f < f_avg or f_max - f_avg <= 1e-12:
            return high
        return low + (high - low) * (f_max - f) / (f_max - f_avg)

    while len(children) < config.population:
        a = _tournament(fitness, config.tournament, rng)
        b = _tournament(fitness, config.tournament, rng)
        fa, fb = float(fitness[a]), float(fitness[b])
        if rng.random() < rate(max(fa, fb), config.crossover):
            take = rng.random(population[a].shape) < 0.5
            pair = [
                np.where(take, population[a], population[b]),
                np.where(take, population[b], population[a]),
            ]
            fa = fb = max(fa, fb)
        else:
            pair = [population[a], population[b]]
        for child, f in zip(pair, (fa, fb), strict=True):
            if len(children) < config.population:
                child = _mutate(child, sizes, rate(f, config.mutation), rng)
                # Copies of a chromosome waste a slot and drain diversity: move them away.
                for _ in range(_RETRIES):
                    if child.tobytes() not in seen:
                        break
                    child = _mutate(child, sizes, config.mutation[0], rng, at_least_one=True)
                seen.add(child.tobytes())
                children.append(child)
    return children


def _tournament(fitness: np.ndarray, size: int, rng: np.random.Generator) -> int:
    """The fittest of ``size`` distinct random entrants (the first drawn on ties)."""
    entrants = rng.choice(len(fitness), size=size, replace=False)
    return int(entrants[np.argmax(fitness[entrants])])


def _mutate(
    genome: np.ndarray,
    sizes: np.ndarray,
    rate: float,
    rng: np.random.Generator,
    *,
    at_least_one: bool = False,
) -> np.ndarray:
    """Each gene moves with probability ``rate`` by 1 to ``max(2, n // 4)`` grid steps.

    The step scales with the grid's length ``n`` so that long grids (``rank_step=1`` on wide
    layers) are crossed in a few generations; moves stop at the grid's ends.
    """
    moves = rng.random(genome.shape) < rate
    if at_least_one and not moves.any():
        moves.flat[rng.integers(genome.size)] = True
    reach = np.maximum(2, sizes // 4)
    steps = rng.integers(1, reach + 1) * rng.choice([-1, 1], size=genome.shape)
    return np.clip(genome + np.where(moves, steps, 0), 0, sizes - 1)


# --------------------------------------------------------------------------------------------
# Evaluation in worker processes, progress


_WORKER_EVALUATE: Callable[[Ranks], float] | None = None
"""In a worker process only: the ``evaluate`` it inherited."""


def _init_worker(evaluate: Callable[[Ranks], float]) -> None:
    global _WORKER_EVALUATE
    _WORKER_EVALUATE = evaluate
    # One thread per worker: the workers share the cores, and a forked child must not enter
    # the OpenMP pool its parent may have started.
    torch.set_num_threads(1)


def _evaluate_in_worker(ranks: Ranks) -> float:
    return float(_WORKER_EVALUATE(ranks))


@contextlib.contextmanager
def _evaluator(
    evaluate: Callable[[Ranks], float], workers: int
) -> Iterator[Callable[[list[Ranks]], list[float]]]:
    """``run(list of ranks) -> accuracies`` in order, in this process or in forked workers.

    Fork, because ``evaluate`` is a closure over a bundle and data that cannot be pickled: the
    workers inherit it (the initializer's arguments are not pickled under fork) and only ranks
    and floats cross the pipes. Results come back in submission order, so nothing downstream
    depends on which worker finishes first.
    """
    if workers <= 1:
        yield lambda batch: [float(evaluate(r)) for r in batch]
        return
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"ga ranks: workers={workers} needs the 'fork' start method, which this platform "
            f"lacks (available: {', '.join(multiprocessing.get_all_start_methods())}); "
            "set workers: 0"
        )
    with ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_init_worker,
        initargs=(evaluate,),
    ) as pool:
        # Fork all workers now, before the progress bar starts its monitor thread.
        pool.submit(abs, 0).result()
        yield lambda batch: list(pool.map(_evaluate_in_worker, batch))


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    # disable=None: no bar when the output is not a terminal (CI logs, pipes).
    bar = tqdm(
        total=total,
        desc="ga ranks",
        unit="generation",
        leave=False,
        dynamic_ncols=True,
        disable=None if enabled else True,
    )
    try:
        yield bar
    finally:
        bar.close()
