"""The planner inside a running swarm: what a worker announces about its devices, what it
asks for with ``--stage auto``, and how the bootstrap reads records back into planner
devices and stages.

A worker measures its devices (``measure_device``, cached) and puts one entry per TP rank
into its record's ``devices``::

    {"name", "memory", "dtype", "kv_dtype", "speed": DeviceSpeed.to_dict(), "layer_time"}

``layer_time`` is the cost model's seconds per layer per decode step of one session, which
the router reads to rank chains; ``speed`` lets the bootstrap plan with the worker's own
figures; ``dtype`` and ``kv_dtype`` (the KV cache's, resolved: never auto) say in what
precision its layers compute, by which the head's result checks pair like chains
(bootstrap/integrity.py). Entries come from other peers, so everything read here is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError
from p2pserve.plan import Plan
from p2pserve.planner.cost import CostParams, Dtype, Workload, dtype_named, stage_cost
from p2pserve.planner.devices import CATALOGUE, LIBP2P, Device, DeviceType
from p2pserve.planner.measure import DeviceSpeed, measure_device
from p2pserve.planner.search import ServingStage, best_stage_for_new_worker, plan_swarm

# stages of a swarm are separate peers: every hop is libp2p; a worker announces the sessions
# its KV cache holds (--max-sessions, or one at least), so no share is kept on top
SWARM = CostParams(network=LIBP2P, kv_share=0.0)
NOMINAL = CATALOGUE["cpu"]  # stands in for a device whose record carries no usable figures
MAX_DEVICES = 64  # per worker: more is a malformed request, not a machine


def measure_devices(devices: Sequence[str]) -> list[DeviceSpeed]:
    """One DeviceSpeed per entry of ``devices`` (each distinct device measured once, cached)."""
    measured: dict[str, DeviceSpeed] = {}
    for d in devices:
        if d not in measured:
            measured[d] = measure_device(d)
    return [measured[d] for d in devices]


def device_entries(speeds: Sequence[DeviceSpeed], model: ModelConfig, dtype: str, kv_dtype: str, *, first: bool,
                   last: bool, params: CostParams = SWARM) -> list[dict]:
    """The record's ``devices``: one entry per TP rank of a stage on ``speeds``, whose KV
    cache is ``kv_dtype`` (a name, auto resolved)."""
    kinds = tuple(s.device_type() for s in speeds)
    cost = stage_cost(model, dtype_named(dtype, kv_dtype), kinds, first=first, last=last, workload=Workload(),
                      sessions=1, micro_batch=1, params=params)
    return [{"name": s.name, "memory": s.memory, "dtype": dtype, "kv_dtype": kv_dtype, "speed": s.to_dict(),
             "layer_time": cost.decode.per_layer} for s in speeds]


def auto_request(speed: DeviceSpeed, *, n_devices: int, dtype: str, kv_dtype: str, max_sessions: int,
                 max_seq_len: int) -> dict:
    """What a ``--stage auto`` worker tells the bootstrap in its PLAN request."""
    return {"speed": speed.to_dict(), "memory": speed.memory, "n_devices": n_devices, "dtype": dtype,
            "kv_dtype": kv_dtype, "max_sessions": max_sessions, "max_seq_len": max_seq_len}


# --- the bootstrap's side: reading what peers sent -----------------------------------------------


def _positive(d: dict, key: str, what: str) -> float:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what}: {key!r} must be a positive number, got {value!r}")
    return float(value)


def _int_in(d: dict, key: str, lo: int, hi: int, what: str) -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{what}: {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def speed_kind(speed: object, memory: object, what: str) -> DeviceType:
    """The planner device a peer's DeviceSpeed dict describes; ConfigError if malformed."""
    if not isinstance(speed, dict) or not isinstance(speed.get("name"), str):
        raise ConfigError(f"{what}: 'speed' must be a measured device (DeviceSpeed.to_dict())")
    figures = {k: _positive(speed, k, what) for k in ("flops", "bandwidth")}
    if speed.get("layer_overhead") is not None:  # measured by newer workers only
        figures["layer_overhead"] = _positive(speed, "layer_overhead", what)
    mem = _positive({"memory": memory}, "memory", what)
    kind = DeviceSpeed(name=speed["name"][:200], memory=mem, dtype=str(speed.get("dtype", "")),
                       torch_version=str(speed.get("torch_version", "")), threads=1, **figures).device_type()
    if kind.usable_memory <= 0:
        raise ConfigError(f"{what}: {mem / 2**30:.2f} GiB is less than the {kind.reserved / 2**30:g} GiB "
                          f"a {kind.kind} keeps for itself")
    return kind


def record_kinds(record) -> list[DeviceType]:
    """The devices a worker record announces, one per TP rank; the nominal CPU for an entry
    without usable figures (an older worker, a malformed entry)."""
    entries = record.devices if isinstance(record.devices, list) else []
    kinds = []
    for i in range(max(1, record.tp)):
        entry = entries[i] if i < len(entries) and isinstance(entries[i], dict) else {}
        try:
            kinds.append(speed_kind(entry.get("speed"), entry.get("memory"), f"record of {record.peer_id}"))
        except (ConfigError, TypeError, ValueError):
            kinds.append(NOMINAL)
    return kinds


def serving_stage(record) -> ServingStage:
    """A record as the stage it serves; a TP group runs at its slowest rank's pace."""
    slowest = min(record_kinds(record), key=lambda k: (k.bandwidth, k.flops, k.usable_memory))
    return ServingStage(record.start, record.end, record.tp, slowest)


@dataclass(frozen=True)
class AutoRequest:
    """A ``--stage auto`` worker's request, checked."""

    device: DeviceType
    n_devices: int
    dtype: str
    max_sessions: int
    max_seq_len: int
    kv_dtype: str = "auto"  # a request from a worker older than --kv-dtype names none

    @property
    def precision(self) -> Dtype:
        """The dtype's bytes, its KV cache's at ``kv_dtype``'s."""
        return dtype_named(self.dtype, self.kv_dtype)

    @classmethod
    def parse(cls, d: object) -> "AutoRequest":
        what = "--stage auto request"
        if not isinstance(d, dict):
            raise ConfigError(f"{what}: expected a map of the worker's device figures")
        dtype = d.get("dtype")
        if not isinstance(dtype, str):
            raise ConfigError(f"{what}: 'dtype' must be a string such as fp32")
        kv_dtype = d.get("kv_dtype", "auto")
        if not isinstance(kv_dtype, str):
            raise ConfigError(f"{what}: 'kv_dtype' must be a string such as fp16")
        dtype_named(dtype, kv_dtype)
        return cls(speed_kind(d.get("speed"), d.get("memory"), what), _int_in(d, "n_devices", 1, MAX_DEVICES, what),
                   dtype, _int_in(d, "max_sessions", 1, 4096, what), _int_in(d, "max_seq_len", 16, 1 << 20, what),
                   kv_dtype)

    @property
    def workload(self) -> Workload:
        """What the worker provisions: ``max_sessions`` KV-cache slots of ``max_seq_len``."""
        prompt = self.max_seq_len // 2
        return Workload(prompt, self.max_seq_len - prompt, self.max_sessions)


def assign_stage(serving: Sequence[ServingStage], request: AutoRequest, model: ModelConfig, *,
                 plan: Plan | None = None, params: CostParams = SWARM) -> tuple[int, int, int]:
    """``(start, end, tp)`` for a joining worker: where it adds the most to the swarm's weakest
    layers (``best_stage_for_new_worker``); with a fixed ``plan``, one of the plan's stages."""
    candidates = None
    if plan is not None:
        stages = [(s.start, s.end, s.tp) for s in plan.stages]
        candidates = [s for s in stages if s[2] == request.n_devices] or stages
    return best_stage_for_new_worker(serving, request.device, model, n_devices=request.n_devices,
                                     dtype=request.precision, workload=request.workload, params=params,
                                     candidates=candidates)


def plan_for_records(records: Sequence, model: ModelConfig, *, dtype: str = "fp32",
                     workload: Workload = Workload(), params: CostParams = SWARM) -> list[Plan]:
    """What the planner proposes for the devices the workers of ``records`` announce: each
    worker is its own machine (a TP group never spans two workers). ConfigError if they
    cannot hold the model."""
    devices: list[Device] = []
    for r in sorted(records, key=lambda r: r.peer_id):
        devices += [Device(kind, r.peer_id, len(devices) + i) for i, kind in enumerate(record_kinds(r))]
    return plan_swarm(devices, model, dtype=dtype, workload=workload, params=params).plans()
