"""The pipeline plan: HexGen's two flat lists, validated once at the edge.

``hetero_config`` is the tensor-parallel degree of each stage, ``pp_partition`` the
number of decoder layers each stage holds. ``Plan([2, 1], [20, 10])`` is two stages:
layers 0-19 on two TP ranks, layers 20-29 on one.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    index: int
    start: int  # first layer, inclusive
    end: int  # last layer, exclusive
    tp: int
    first_rank: int  # global rank of this stage's TP rank 0 in a one-world run

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.tp)


@dataclass(frozen=True)
class Plan:
    hetero_config: tuple[int, ...]
    pp_partition: tuple[int, ...]

    def __init__(self, hetero_config, pp_partition):
        object.__setattr__(self, "hetero_config", tuple(int(x) for x in hetero_config))
        object.__setattr__(self, "pp_partition", tuple(int(x) for x in pp_partition))
        if len(self.hetero_config) != len(self.pp_partition):
            raise ConfigError(
                f"--hetero-config has {len(self.hetero_config)} stages but --pp-partition has "
                f"{len(self.pp_partition)}: give one TP degree and one layer count per stage"
            )
        if not self.hetero_config:
            raise ConfigError("the plan has no stages: give at least one TP degree and layer count")
        for what, values in (("TP degree", self.hetero_config), ("layer count", self.pp_partition)):
            bad = [v for v in values if v < 1]
            if bad:
                raise ConfigError(f"every {what} must be a positive integer, got {bad[0]}")

    @classmethod
    def single(cls, n_layers: int) -> "Plan":
        return cls([1], [n_layers])

    @property
    def n_stages(self) -> int:
        return len(self.hetero_config)

    @property
    def world_size(self) -> int:
        return sum(self.hetero_config)

    @property
    def n_layers(self) -> int:
        return sum(self.pp_partition)

    @property
    def stages(self) -> list[Stage]:
        out, layer, rank = [], 0, 0
        for i, (tp, n) in enumerate(zip(self.hetero_config, self.pp_partition)):
            out.append(Stage(i, layer, layer + n, tp, rank))
            layer, rank = layer + n, rank + tp
        return out

    def stage_of_rank(self, rank: int) -> Stage:
        for stage in self.stages:
            if rank in stage.ranks:
                return stage
        raise ValueError(f"rank {rank} is outside a world of {self.world_size}")

    def check_model(self, config: ModelConfig) -> None:
        """Raise ConfigError unless this plan fits ``config``."""
        if self.n_layers != config.n_layers:
            raise ConfigError(
                f"--pp-partition sums to {self.n_layers} layers but {config.name} has "
                f"{config.n_layers}: make the layer counts add up to {config.n_layers}"
            )
        too_wide = [tp for tp in self.hetero_config if tp > config.n_kv_heads]
        if too_wide:
            raise ConfigError(
                f"TP degree {too_wide[0]} is above {config.name}'s {config.n_kv_heads} KV heads: "
                f"use a TP degree of at most {config.n_kv_heads}"
            )

    def flags(self) -> str:
        return (
            f"--hetero-config {' '.join(map(str, self.hetero_config))} "
            f"--pp-partition {' '.join(map(str, self.pp_partition))}"
        )

    def to_dict(self) -> dict:
        return {"hetero_config": list(self.hetero_config), "pp_partition": list(self.pp_partition)}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(d["hetero_config"], d["pp_partition"])
