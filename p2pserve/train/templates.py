"""Oobleck-style pipeline templates: the job's layout is instantiated from a few pipeline
shapes, for however many ranks are alive, and re-instantiated when a rank dies.

A template is one pipeline shape (TP degree and layers of each stage). ``instantiate``
picks the multiset of templates that uses exactly the ranks at hand and gives the
fixed global batch to the pipelines, in whole micro-batches, so that the slowest
pipeline's step is as short as it can be. A pipeline's step time is estimated as
``(micro-batches + stages - 1) * slowest stage``, a stage's time as its layers over its
TP degree: ranks are taken to be equal devices.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass

from p2pserve.errors import ConfigError
from p2pserve.train.layout import TrainLayout, make_layout


@dataclass(frozen=True)
class PipelineTemplate:
    tps: tuple[int, ...]
    layers: tuple[int, ...]

    @property
    def n_ranks(self) -> int:
        return sum(self.tps)

    def time(self, micro_batches: int) -> float:
        """Step time of ``micro_batches`` micro-batches, in units of one layer on one rank."""
        slowest = max(n / tp for n, tp in zip(self.layers, self.tps))
        return (micro_batches + len(self.tps) - 1) * slowest


def parse_templates(text: str) -> list[PipelineTemplate]:
    """``"[[[1, 1], [2, 2]], [[2], [4]]]"``: each template's TP degrees, then its layers."""
    try:
        value = ast.literal_eval(text.strip())
        out = [PipelineTemplate(tuple(tps), tuple(layers)) for tps, layers in value]
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ConfigError(f"--templates {text!r} is not a list of [TP degrees, layers] pairs, "
                          f"e.g. --templates \"[[[1, 1], [2, 2]], [[2], [4]]]\"") from None
    return out


def instantiate(templates: list[PipelineTemplate], n_ranks: int, global_batch: int,
                micro_batch: int) -> TrainLayout:
    """The layout of least estimated step time on exactly ``n_ranks`` ranks."""
    if global_batch % micro_batch:
        raise ConfigError(f"the global batch {global_batch} is not a whole number of micro-batches of {micro_batch}")
    n_micro = global_batch // micro_batch
    best = None
    for combo in _combinations(tuple(sorted(set(templates), key=lambda t: (t.n_ranks, t.tps, t.layers))), n_ranks):
        if len(combo) > n_micro:
            continue  # every pipeline needs at least one micro-batch
        counts = allocate(combo, n_micro)
        time = max(t.time(c) for t, c in zip(combo, counts))
        if best is None or time < best[0]:
            best = (time, combo, counts)
    if best is None:
        sizes = sorted({t.n_ranks for t in templates})
        raise ConfigError(f"no set of templates uses exactly {n_ranks} ranks (templates take {sizes} ranks) "
                          f"with at least one of the {n_micro} micro-batches per pipeline")
    _, combo, counts = best
    return make_layout([list(t.tps) for t in combo], [list(t.layers) for t in combo],
                       [c * micro_batch for c in counts], counts)


def allocate(pipelines, n_micro: int) -> list[int]:
    """Micro-batches per pipeline, each at least one, given one at a time to the pipeline
    whose step would end soonest with it."""
    counts = [1] * len(pipelines)
    for _ in range(n_micro - len(pipelines)):
        i = min(range(len(pipelines)), key=lambda i: (pipelines[i].time(counts[i] + 1), i))
        counts[i] += 1
    return counts


def _combinations(templates: tuple[PipelineTemplate, ...], n_ranks: int):
    """Every multiset of templates whose ranks add up to ``n_ranks`` (largest templates first)."""

    @functools.lru_cache(maxsize=None)
    def combos(first: int, left: int) -> tuple[tuple[PipelineTemplate, ...], ...]:
        if left == 0:
            return ((),)
        out = []
        for i in range(first, len(templates)):
            if templates[i].n_ranks <= left:
                out += [(templates[i],) + rest for rest in combos(i, left - templates[i].n_ranks)]
        return tuple(out)

    return [tuple(reversed(c)) for c in combos(0, n_ranks)]
