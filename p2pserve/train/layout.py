"""A training layout: HexiScale's per-pipeline lists, validated once at the edge.

``hetero_configs[p][s]`` is the TP degree of stage ``s`` of pipeline ``p``,
``layer_partitions[p][s]`` its number of layers; pipeline ``p`` takes
``batch_sizes[p]`` sequences of each global batch in ``chunks[p]`` micro-batches.
Ranks are numbered pipeline by pipeline, stage by stage, TP rank by TP rank.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError


@dataclass(frozen=True)
class PipelineLayout:
    tps: tuple[int, ...]  # TP degree of each stage
    layers: tuple[int, ...]  # layers of each stage
    batch_size: int  # sequences of each global batch this pipeline trains on
    chunks: int  # micro-batches the batch is cut into

    @property
    def n_stages(self) -> int:
        return len(self.tps)

    @property
    def n_ranks(self) -> int:
        return sum(self.tps)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.chunks

    def stage_range(self, stage: int) -> tuple[int, int]:
        start = sum(self.layers[:stage])
        return start, start + self.layers[stage]

    def __str__(self) -> str:
        """``[1 2]/[12 18] x3``: TP degrees / layers of its stages, and its batch."""
        return f"[{' '.join(map(str, self.tps))}]/[{' '.join(map(str, self.layers))}] x{self.batch_size}"


@dataclass(frozen=True)
class Role:
    """What one rank does: TP rank ``tp_rank`` of stage ``stage`` of pipeline ``pipeline``."""

    rank: int
    pipeline: int
    stage: int
    n_stages: int
    tp_rank: int
    tp: int
    start: int  # first layer, inclusive
    end: int  # last layer, exclusive
    tp_ranks: tuple[int, ...]  # global ranks of this stage's TP group
    prev_ranks: tuple[int, ...]  # the previous stage's TP group; () on stage 0
    next_ranks: tuple[int, ...]  # the next stage's TP group; () on the last stage

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1


@dataclass(frozen=True)
class TrainLayout:
    pipelines: tuple[PipelineLayout, ...]
    accum_iter: int = 1

    @property
    def world_size(self) -> int:
        return sum(p.n_ranks for p in self.pipelines)

    @property
    def global_batch(self) -> int:
        return sum(p.batch_size for p in self.pipelines)

    def batch_offset(self, pipeline: int) -> int:
        """Where pipeline ``pipeline``'s contiguous slice of each global batch starts."""
        return sum(p.batch_size for p in self.pipelines[:pipeline])

    def stage_ranks(self, pipeline: int, stage: int) -> tuple[int, ...]:
        first = sum(p.n_ranks for p in self.pipelines[:pipeline]) + sum(self.pipelines[pipeline].tps[:stage])
        return tuple(range(first, first + self.pipelines[pipeline].tps[stage]))

    def roles(self) -> list[Role]:
        out = []
        for p, pipe in enumerate(self.pipelines):
            for s, tp in enumerate(pipe.tps):
                start, end = pipe.stage_range(s)
                group = self.stage_ranks(p, s)
                prev = self.stage_ranks(p, s - 1) if s > 0 else ()
                nxt = self.stage_ranks(p, s + 1) if s + 1 < pipe.n_stages else ()
                for t, rank in enumerate(group):
                    out.append(Role(rank, p, s, pipe.n_stages, t, tp, start, end, group, prev, nxt))
        return out

    def role(self, rank: int) -> Role:
        return self.roles()[rank]

    def check_model(self, config: ModelConfig) -> None:
        """Raise ConfigError unless every pipeline holds the whole model, TP within its KV heads."""
        check_trainable(config)
        for p, pipe in enumerate(self.pipelines):
            if sum(pipe.layers) != config.n_layers:
                raise ConfigError(
                    f"--layer-partitions: pipeline {p} holds {sum(pipe.layers)} layers but {config.name} "
                    f"has {config.n_layers}: make each pipeline's layers add up to {config.n_layers}"
                )
            too_wide = [tp for tp in pipe.tps if tp > config.n_kv_heads]
            if too_wide:
                raise ConfigError(
                    f"--hetero-configs: pipeline {p} has TP degree {too_wide[0]}, above {config.name}'s "
                    f"{config.n_kv_heads} KV heads: use a TP degree of at most {config.n_kv_heads}"
                )

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ConfigError(
                f"the layout needs {self.world_size} ranks (the sum of --hetero-configs) but the world "
                f"has {world_size}: change --nproc or the layout"
            )

    def to_dict(self) -> dict:
        return {
            "hetero_configs": [list(p.tps) for p in self.pipelines],
            "layer_partitions": [list(p.layers) for p in self.pipelines],
            "global_batch_sizes": [p.batch_size for p in self.pipelines],
            "chunks": [p.chunks for p in self.pipelines],
            "accum_iter": self.accum_iter,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TrainLayout":
        return make_layout(d["hetero_configs"], d["layer_partitions"], d["global_batch_sizes"],
                           d["chunks"], d.get("accum_iter", 1))


def check_trainable(config: ModelConfig) -> None:
    """Training covers dense models: a mixture of experts' routing and its load-balancing
    loss are not built (it serves, it does not train)."""
    if config.is_moe:
        raise ConfigError(f"{config.name} is a mixture-of-experts model: p2pserve serves those but trains "
                          "dense models only (Llama, Mistral, Qwen2, Qwen3)")


def parse_nested(flag: str, text: str) -> list[list[int]]:
    """``"[[1, 2], [1, 1]]"`` -> ``[[1, 2], [1, 1]]``: a literal, never evaluated as code."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ConfigError(f"{flag} {text!r} is not a list of lists of integers, e.g. {flag} \"[[1, 2], [1, 1]]\"") from None
    if not (isinstance(value, (list, tuple)) and value
            and all(isinstance(row, (list, tuple)) and row for row in value)
            and all(type(x) is int for row in value for x in row)):
        raise ConfigError(f"{flag} {text!r} is not a list of non-empty lists of integers, e.g. {flag} \"[[1, 2], [1, 1]]\"")
    return [list(row) for row in value]


def make_layout(hetero_configs, layer_partitions, batch_sizes, chunks=None, accum_iter: int = 1) -> TrainLayout:
    """The layout the lists describe, or ConfigError naming the first thing that does not fit.
    ``chunks`` defaults to one micro-batch per pipeline."""
    n = len(hetero_configs)
    chunks = list(chunks) if chunks else [1] * n
    batch_sizes = list(batch_sizes)
    for flag, values in (("--layer-partitions", layer_partitions), ("--global-batch-sizes", batch_sizes),
                         ("--chunks", chunks)):
        if len(values) != n:
            raise ConfigError(f"--hetero-configs has {n} pipelines but {flag} has {len(values)}: "
                              f"give one entry per pipeline")
    pipelines = []
    for p, (tps, layers, bsz, ch) in enumerate(zip(hetero_configs, layer_partitions, batch_sizes, chunks)):
        if len(tps) != len(layers):
            raise ConfigError(f"pipeline {p}: --hetero-configs has {len(tps)} stages but --layer-partitions "
                              f"has {len(layers)}: give one TP degree and one layer count per stage")
        for what, values in (("TP degree", tps), ("layer count", layers)):
            bad = [v for v in values if type(v) is not int or v < 1]
            if bad:
                raise ConfigError(f"pipeline {p}: every {what} must be a positive integer, got {bad[0]!r}")
        if type(bsz) is not int or bsz < 1 or type(ch) is not int or ch < 1:
            raise ConfigError(f"pipeline {p}: batch size and chunks must be positive integers, got {bsz!r} and {ch!r}")
        if bsz % ch:
            raise ConfigError(f"pipeline {p}: batch size {bsz} is not divisible by {ch} chunks: "
                              f"use a chunk count that divides {bsz}")
        pipelines.append(PipelineLayout(tuple(tps), tuple(layers), bsz, ch))
    if type(accum_iter) is not int or accum_iter < 1:
        raise ConfigError(f"--accum-iter must be a positive integer, got {accum_iter!r}")
    return TrainLayout(tuple(pipelines), accum_iter)
