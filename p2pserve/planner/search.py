"""Choose a plan: which devices form TP groups, which groups chain into which replica, in
what order, and how many layers each stage holds.

Two levels:
- For one chain of groups in a fixed order, ``split_layers`` finds the best split of the
  layers *exactly* (the DP over contiguous splits; stage costs are convex in the layer
  count, so it reduces to a merge of slopes), memory limits as hard constraints.
- Over groupings, ``plan_swarm`` enumerates every grouping when there are few enough of
  them (``budget``), and otherwise runs a bounded, deterministic search: uniform TP
  degrees per machine, replicas balanced by memory, then a local search that drops,
  adds, moves, merges and splits groups.

Both objectives pick each replica's split to minimise its step period (the time between
two tokens of a session); the plan-level figure is the worst replica's period for
"latency" and the sum of the replicas' token rates for "throughput" (``cost.combine``).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError
from p2pserve.planner.cost import (Chain, CostParams, Dtype, PlanReport, PipelineReport, Workload, combine, dtype_named,
                   make_chain, report_pipeline, sessions_per_replica, stage_cost, weights_bytes)
from p2pserve.planner.devices import GiB, Device, DeviceType, Group

OBJECTIVES = ("latency", "throughput")
DEFAULT_BUDGET = 20_000  # arrangements of groups into chains tried exhaustively


# --- the layer split of one chain: exact ----------------------------------------------------


def split_layers(chain: Chain, n_layers: int) -> tuple[int, ...] | None:
    """The layer counts (each >= 1, memory honoured) that minimise ``chain.period``; None if
    no split fits. Exact.

    A stage's time is affine and increasing in its layer count and its memory limit caps
    the count, so the dynamic programme over contiguous splits (min over n of
    ``best[l - n] + t_s(n)``) is a min-plus convolution of convex sequences, whose
    solution is a merge of slopes: give every stage one layer, then the remaining layers
    to the stages with the cheapest layer first, each up to its cap (``fill``).

    One micro-batch (``m = 1``): the period is the round time, a sum over stages.
    Otherwise the period is ``max(sum_s t_s + hops, m * max_s t_s)``: for a cap ``B`` on the
    busiest stage let ``g(B)`` be the least sum with every ``t_s <= B``. ``g`` falls and
    ``m B`` rises with ``B``, so the optimum sits where they cross: a binary search over the
    candidate caps (the stage times themselves) finds it with O(log(S L)) fills.
    """
    S, L = chain.n_stages, n_layers
    if S > L:
        return None
    n = np.arange(L + 1)
    times = np.empty((S, L + 1))
    for s, cost in enumerate(chain.costs):
        allowed = (n >= 1) & (cost.memory.at(n) <= cost.available)
        times[s] = np.where(allowed, cost.decode.at(n), np.nan)  # nan <= cap is never true
    order = sorted(range(S), key=lambda s: (chain.costs[s].decode.per_layer, s))

    def fill(cap: float) -> tuple[float, list[int]] | None:
        """g(cap): the least total time, and its split, with every stage time <= cap."""
        limits = (times <= cap).sum(axis=1)  # allowed counts are 1..limit: time and memory grow with n
        if limits.min() < 1 or limits.sum() < L:
            return None
        counts, left = [1] * S, L - S
        for s in order:
            take = min(left, int(limits[s]) - 1)
            counts[s] += take
            left -= take
        return sum(float(times[s, c]) for s, c in enumerate(counts)), counts

    whole = fill(np.inf)
    if whole is None:
        return None
    if chain.micro_batches == 1:
        return tuple(whole[1])

    caps = np.unique(times[~np.isnan(times)])
    m, hops = chain.micro_batches, chain.decode_hops
    found: dict[int, tuple[float, list[int]] | None] = {}

    def under(i: int):
        if i not in found:
            found[i] = fill(caps[i])
        return found[i]

    def sum_dominates(i: int) -> bool:  # true on a prefix of the caps, false after
        g = under(i)
        return g is None or g[0] + hops >= m * caps[i]

    if not sum_dominates(0):
        candidates = [0]
    else:  # the last cap where the sum dominates, and the first where it no longer does
        lo, hi = 0, len(caps) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sum_dominates(mid) else (lo, mid - 1)
        candidates = [lo, lo + 1] if lo + 1 < len(caps) else [lo]
    splits = [under(i)[1] for i in candidates if under(i) is not None]
    return tuple(min(splits, key=chain.period))


# --- plans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwarmPlan:
    report: PlanReport
    unused: tuple[Device, ...]
    objective: str
    exhaustive: bool  # every grouping was tried, so the plan is optimal under the cost model
    why_unused: dict = field(default_factory=dict)  # "KIND@MACHINE" -> why the plan leaves it idle

    def plans(self):
        """One HexGen ``Plan(hetero_config, pp_partition)`` per replica."""
        return self.report.plans()


class _Planner:
    """Evaluates chains and plans, remembering every chain it has split."""

    def __init__(self, model, dtype, workload, objective, params):
        self.model, self.dtype, self.workload = model, dtype, workload
        self.objective, self.params = objective, params
        self.memo: dict[tuple, PipelineReport | None] = {}

    def pipeline(self, groups: tuple[Group, ...], sessions: int) -> PipelineReport | None:
        key = (tuple(g.signature for g in groups), sessions)
        if key not in self.memo:
            chain = make_chain(self.model, self.dtype, groups, self.workload, sessions, self.params)
            counts = split_layers(chain, self.model.n_layers)
            self.memo[key] = None if counts is None else report_pipeline(chain, counts)
        return self.memo[key]

    def plan(self, pipes: Sequence[tuple[Group, ...]]) -> PlanReport | None:
        """The plan's figures; its stage reports may name other devices of the same kinds
        (see ``relabelled``)."""
        b = sessions_per_replica(self.workload.sessions, len(pipes))
        reports = []
        for pipe in pipes:
            r = self.pipeline(pipe, b)
            if r is None:
                return None
            reports.append(r)
        return combine(reports, self.workload.sessions)

    @staticmethod
    def relabelled(report: PlanReport, pipes) -> PlanReport:
        """The same figures, each stage naming the group of ``pipes`` it stands for."""
        pipelines = tuple(replace(r, stages=tuple(replace(s, group=g) for s, g in zip(r.stages, pipe)))
                          for r, pipe in zip(report.pipelines, pipes))
        return replace(report, pipelines=pipelines)

    def rank(self, report: PlanReport, n_used: int) -> tuple:
        if self.objective == "latency":
            return (report.token_latency, report.ttft, -report.throughput, n_used)
        return (-report.throughput, report.token_latency, report.ttft, n_used)


def plan_swarm(devices: Sequence[Device], model: ModelConfig, *, dtype: str | Dtype = "fp16",
               workload: Workload = Workload(), objective: str = "latency",
               params: CostParams = CostParams(), budget: int = DEFAULT_BUDGET) -> SwarmPlan:
    """The best plan for ``devices`` under the cost model; ConfigError if nothing fits."""
    dtype = dtype_named(dtype) if isinstance(dtype, str) else dtype
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}: use latency or throughput")
    if not devices:
        raise ConfigError("no devices to plan for: give at least one, e.g. --devices 1xA100-80G@m1")
    _check_total_memory(devices, model, dtype)
    planner = _Planner(model, dtype, workload, objective, params)
    machines = _machines(devices, model.n_kv_heads)
    exhaustive = _count_arrangements(machines, budget) <= budget
    candidates = _exhaustive(machines) if exhaustive else _bounded(machines, planner, model, dtype)
    best, best_rank = None, None
    with_label: dict[str, dict[int, tuple]] = {}  # KIND@MACHINE -> devices of it used -> best (rank, report)
    for pipes in candidates:
        report = planner.plan(pipes)
        if report is None:
            continue
        rank = planner.rank(report, sum(len(g.devices) for p in pipes for g in p))
        if best_rank is None or rank < best_rank:
            best, best_rank = (report, pipes), rank
        for label, n in Counter(d.label for p in pipes for g in p for d in g.devices).items():
            slot = with_label.setdefault(label, {})
            if n not in slot or rank < slot[n][0]:
                slot[n] = (rank, report)
    if best is None:
        raise ConfigError(_nothing_fits(devices, model, dtype, workload))
    best = planner.relabelled(*best)
    used = {d for p in best.pipelines for s in p.stages for d in s.group.devices}
    unused = tuple(d for d in devices if d not in used)
    why = {}
    for label in dict.fromkeys(d.label for d in unused):
        n_used = sum(1 for d in used if d.label == label)
        more = [v for n, v in with_label.get(label, {}).items() if n > n_used]
        why[label] = _why_unused(best, min(more, key=lambda v: v[0])[1] if more else None, objective,
                                 workload, exhaustive)
    return SwarmPlan(best, unused, objective, exhaustive, why)


def _why_unused(best: PlanReport, alternative: PlanReport | None, objective: str, workload: Workload,
                exhaustive: bool) -> str:
    """Why the best plan leaves a device idle: the best plan with it, in the objective's figure."""
    if alternative is None:
        return ("no plan that uses it fits in memory" if exhaustive
                else "no plan the bounded search tried with it fits in memory")
    flags = " + ".join(p.flags() for p in alternative.plans())
    if objective == "latency":
        with_it, without = f"{alternative.token_latency * 1e3:.1f}", f"{best.token_latency * 1e3:.1f}"
        unit = "ms per token"
    else:
        with_it, without = f"{alternative.throughput:.1f}", f"{best.throughput:.1f}"
        unit = f"tokens/s at {workload.sessions} session(s)"
    if with_it == without:
        return f"with it ({flags}) the plan is no better: {with_it} {unit} either way"
    return f"the best plan with it ({flags}) predicts {with_it} {unit}, against {without} without it"


def _check_total_memory(devices, model, dtype) -> None:
    need = weights_bytes(model, dtype)
    have = sum(d.kind.usable_memory for d in devices)
    if need > have:
        raise ConfigError(
            f"{model.name} ({dtype.name}) needs {need / GiB:.1f} GiB for weights but the devices "
            f"have {have / GiB:.1f} GiB usable: {(need - have) / GiB:.1f} GiB missing; "
            f"add devices or use a smaller dtype (int8, int4)")


def _nothing_fits(devices, model, dtype, workload) -> str:
    have = sum(d.kind.usable_memory for d in devices)
    need = weights_bytes(model, dtype)
    return (f"no plan fits {model.name} ({dtype.name}) with {workload.sessions} session(s) of "
            f"{workload.max_len} tokens: weights take {need / GiB:.1f} GiB of the "
            f"{have / GiB:.1f} GiB usable, and the KV cache, activations, embedding and LM head "
            f"do not fit beside them in whole layers per device; lower --sessions, "
            f"--prompt-len or --output-len, or add memory")


# --- exhaustive enumeration of groupings -----------------------------------------------------


@dataclass(frozen=True)
class _Machine:
    name: str
    kinds: tuple[DeviceType, ...]  # distinct kinds, in a fixed order
    devices: tuple[tuple[Device, ...], ...]  # per kind, in spec order
    max_tp: int

    def partitions(self, limit: int | None = None) -> list[tuple[tuple[int, ...], ...]]:
        """Every multiset of TP groups (count vectors over kinds) drawn from this machine;
        devices left over are unused. Stops after ``limit`` partitions when given."""
        counts = tuple(len(d) for d in self.devices)
        parts = sorted((p for p in itertools.product(*(range(c + 1) for c in counts))
                        if 1 <= sum(p) <= self.max_tp), reverse=True)
        out: list = []

        def rec(remaining, upto, chosen):
            if limit is not None and len(out) > limit:
                return
            out.append(tuple(chosen))
            for i in range(upto, len(parts)):  # parts in non-increasing order: each multiset once
                p = parts[i]
                if all(a <= r for a, r in zip(p, remaining)):
                    rec(tuple(r - a for r, a in zip(remaining, p)), i, chosen + [p])

        rec(counts, 0, [])
        return out

    def groups(self, partition) -> list[Group]:
        taken = [0] * len(self.kinds)
        out = []
        for part in partition:
            members = []
            for k, a in enumerate(part):
                members += self.devices[k][taken[k]: taken[k] + a]
                taken[k] += a
            out.append(Group(tuple(members)))
        return out


def _machines(devices: Sequence[Device], max_tp: int) -> list[_Machine]:
    by_machine: dict[str, dict[DeviceType, list[Device]]] = {}
    for d in devices:
        by_machine.setdefault(d.machine, {}).setdefault(d.kind, []).append(d)
    return [_Machine(name, tuple(kinds), tuple(tuple(v) for v in kinds.values()), max_tp)
            for name, kinds in by_machine.items()]


def _sets_of_sequences(g: int) -> int:
    """Ways to arrange g distinct groups into an unordered set of non-empty ordered chains."""
    if g == 0:
        return 0
    return sum(math.comb(g - 1, k - 1) * math.factorial(g) // math.factorial(k) for k in range(1, g + 1))


def _count_arrangements(machines: list[_Machine], budget: int) -> int:
    """How many plans ``_exhaustive`` would yield (or ``budget + 1`` if more)."""
    n_devices = sum(len(d) for m in machines for d in m.devices)
    if _sets_of_sequences(n_devices) > budget:  # all singletons alone are that many
        return budget + 1
    by_groups = {0: 1}  # number of groups -> ways to choose them across machines
    for machine in machines:
        parts = machine.partitions(limit=budget)
        if len(parts) > budget:
            return budget + 1
        sizes: dict[int, int] = {}
        for p in parts:
            sizes[len(p)] = sizes.get(len(p), 0) + 1
        merged: dict[int, int] = {}
        for a, x in by_groups.items():
            for b, y in sizes.items():
                merged[a + b] = merged.get(a + b, 0) + x * y
        by_groups = merged
    return sum(ways * _sets_of_sequences(g) for g, ways in by_groups.items())


def _exhaustive(machines: list[_Machine]) -> Iterable[tuple[tuple[Group, ...], ...]]:
    """Every plan: per machine a multiset of groups, then every way to chain all the chosen
    groups into replicas (each chain in every order). Plans that differ only by swapping
    interchangeable groups are yielded once."""
    for choice in itertools.product(*(m.partitions() for m in machines)):
        groups = [g for m, part in zip(machines, choice) for g in m.groups(part)]
        if not groups:
            continue
        seen: set = set()  # choices differ in their groups, so duplicates only arise within one
        ids: dict[tuple, int] = {}
        for g in groups:
            ids.setdefault(g.signature, len(ids))
        for pipes in _arrange(groups):
            key = tuple(sorted(tuple(ids[g.signature] for g in p) for p in pipes))
            if key not in seen:
                seen.add(key)
                yield pipes


def _arrange(groups: list[Group], i: int = 0, pipes: tuple = ()):
    if i == len(groups):
        yield pipes
        return
    g = groups[i]
    for p, pipe in enumerate(pipes):
        for pos in range(len(pipe) + 1):
            new = pipe[:pos] + (g,) + pipe[pos:]
            yield from _arrange(groups, i + 1, pipes[:p] + (new,) + pipes[p + 1:])
    yield from _arrange(groups, i + 1, pipes + ((g,),))


# --- bounded search for large swarms ----------------------------------------------------------

LOCAL_SEARCH_ROUNDS = 25
LOCAL_SEARCH_STARTS = 3


@lru_cache(maxsize=4096)
def _strength(g: Group) -> tuple:
    """Decode is bound by memory bandwidth: a group's strength is its aggregate bandwidth."""
    return (g.tp * min(k.bandwidth for k in g.kinds), g.tp * min(k.usable_memory for k in g.kinds))


def _memory(g: Group) -> float:
    return g.tp * min(k.usable_memory for k in g.kinds)


def _chunked(machines: list[_Machine], tp: int | None) -> list[Group]:
    """Each machine's devices of one kind in groups of ``tp`` (the rest in a smaller group);
    ``tp=None``: each machine's devices, of all kinds, in as few groups as the KV heads allow."""
    out = []
    for m in machines:
        if tp is None:
            devs = sorted((d for ds in m.devices for d in ds), key=lambda d: (-d.kind.bandwidth, d.index))
            out += [Group(tuple(devs[i: i + m.max_tp])) for i in range(0, len(devs), m.max_tp)]
            continue
        for devs in m.devices:
            size = min(tp, m.max_tp)
            out += [Group(devs[i: i + size]) for i in range(0, len(devs), size)]
    return out


def _ordered(pipe: Iterable[Group], machine_order: dict[str, int]) -> tuple[Group, ...]:
    """Groups of one machine next to each other (one network hop per machine), strongest
    machine first, strongest group first within it."""
    pipe = list(pipe)
    strength = [_strength(g) for g in pipe]
    best: dict[str, tuple] = {}
    for g, st in zip(pipe, strength):
        best[g.machine] = max(best.get(g.machine, st), st)

    def key(i):
        g = pipe[i]
        top = best[g.machine]
        return (-top[0], -top[1], machine_order[g.machine], -strength[i][0], -strength[i][1],
                g.devices[0].index)

    return tuple(pipe[i] for i in sorted(range(len(pipe)), key=key))


def _bounded(machines, planner: _Planner, model, dtype) -> Iterable[tuple[tuple[Group, ...], ...]]:
    machine_order = {m.name: i for i, m in enumerate(machines)}
    seeds = _seeds(machines, planner, weights_bytes(model, dtype), machine_order)
    yield from seeds
    ranked = []
    for pipes in seeds:
        report = planner.plan(pipes)
        if report is not None:
            ranked.append((planner.rank(report, sum(g.tp for p in pipes for g in p)), len(ranked), pipes))
    ranked.sort(key=lambda r: (r[0], r[1]))
    all_devices = [d for m in machines for devs in m.devices for d in devs]
    for _, _, pipes in ranked[:LOCAL_SEARCH_STARTS]:
        yield _local_search(pipes, all_devices, planner, machine_order, machines[0].max_tp)


def _seeds(machines, planner: _Planner, need: float, machine_order) -> list[tuple[tuple[Group, ...], ...]]:
    """Starting points, for each uniform TP degree (and for whole machines as groups): one
    replica on the strongest groups that hold the model (and on more of them); k replicas
    built greedily, strongest first; k replicas balanced by memory."""
    largest = max(len(d) for m in machines for d in m.devices)
    max_tp = machines[0].max_tp
    tps = sorted({t for t in (1, 2, 4, 8, 16, 32, 64) if t <= min(largest, max_tp)}
                 | {min(len(d), max_tp) for m in machines for d in m.devices})
    seeds: list[tuple[tuple[Group, ...], ...]] = []
    for tp in tps + [None]:
        groups = sorted(_chunked(machines, tp), key=lambda g: tuple(-x for x in _strength(g)))
        k_max = max(1, min(len(groups), int(sum(_memory(g) for g in groups) // need)))
        for size in range(1, len(groups) + 1):
            if sum(_memory(g) for g in groups[:size]) >= need:
                seeds.append((_ordered(groups[:size], machine_order),))
        for k in range(2, k_max + 1):
            greedy = _greedy_replicas(groups, k, planner, need, machine_order)
            if greedy:
                seeds.append(greedy)
            for pipes in (_balance(groups, k), _balance_machines(groups, k, machine_order)):
                if pipes:
                    seeds.append(tuple(_ordered(p, machine_order) for p in pipes))
    return seeds


def _greedy_replicas(groups: list[Group], k: int, planner: _Planner, need: float, machine_order):
    """k replicas, each the shortest run of the strongest remaining groups that fits."""
    b = sessions_per_replica(planner.workload.sessions, k)
    remaining, pipes = list(groups), []
    for _ in range(k):
        size, held = 0, 0.0
        while size < len(remaining) and held < need:
            held += _memory(remaining[size])
            size += 1
        while size <= len(remaining) and held >= need:
            pipe = _ordered(remaining[:size], machine_order)
            if planner.pipeline(pipe, b) is not None:
                break
            size += 1
        else:
            return None
        pipes.append(pipe)
        remaining = remaining[size:]
    return tuple(pipes)


def _balance(groups: list[Group], k: int) -> list[list[Group]]:
    """Longest-processing-time: biggest group first, into the replica with the least memory."""
    pipes: list[list[Group]] = [[] for _ in range(k)]
    for g in sorted(groups, key=lambda g: -_memory(g)):
        min(pipes, key=lambda p: sum(_memory(x) for x in p)).append(g)
    return pipes if all(pipes) else []


def _balance_machines(groups: list[Group], k: int, machine_order) -> list[list[Group]]:
    """Same, whole machines at a time: no replica crosses a machine boundary it need not."""
    blocks: dict[str, list[Group]] = {}
    for g in groups:
        blocks.setdefault(g.machine, []).append(g)
    if len(blocks) < k:
        return []
    pipes: list[list[Group]] = [[] for _ in range(k)]
    for name in sorted(blocks, key=lambda n: (-sum(_memory(g) for g in blocks[n]), machine_order[n])):
        min(pipes, key=lambda p: sum(_memory(x) for x in p)).extend(blocks[name])
    return pipes if all(pipes) else []


def _local_search(pipes, all_devices, planner: _Planner, machine_order, max_tp):
    """Hill-climb from ``pipes`` to the best of its neighbours until none is better."""
    def n_used(ps):
        return sum(g.tp for p in ps for g in p)

    current = tuple(pipes)
    rank = planner.rank(planner.plan(current), n_used(current))
    for _ in range(LOCAL_SEARCH_ROUNDS):
        best_next, best_rank = None, rank
        for nxt in _neighbours(current, all_devices, machine_order, max_tp):
            r = planner.plan(nxt)
            if r is None:
                continue
            nr = planner.rank(r, n_used(nxt))
            if nr < best_rank:
                best_next, best_rank = nxt, nr
        if best_next is None:
            break
        current, rank = best_next, best_rank
    return current


def _neighbours(pipes, all_devices, machine_order, max_tp):
    used = {d for p in pipes for g in p for d in g.devices}
    unused = [d for d in all_devices if d not in used]
    spare: dict[tuple, list[Device]] = {}  # (machine, kind) -> unused devices
    for d in unused:
        spare.setdefault((d.machine, d.kind), []).append(d)

    def with_pipe(i, groups):
        out = list(pipes)
        if groups:
            out[i] = _ordered(groups, machine_order)
        else:
            del out[i]
        return tuple(out)

    for i, pipe in enumerate(pipes):
        others = pipes[:i] + pipes[i + 1:]
        if others:
            yield others  # drop a whole replica
        yield pipes[:i] + (tuple(reversed(pipe)),) + pipes[i + 1:]
        for j, g in enumerate(pipe):
            rest = pipe[:j] + pipe[j + 1:]
            if rest:
                yield with_pipe(i, rest)  # drop a group
            for k in range(len(pipes)):  # move it to another replica
                if k != i and rest:
                    moved = list(with_pipe(i, rest))
                    moved[k] = _ordered(pipes[k] + (g,), machine_order)
                    yield tuple(moved)
            if g.tp > 1:  # split it in two
                half = g.tp // 2
                yield with_pipe(i, rest + (Group(g.devices[:half]), Group(g.devices[half:])))
            for h in rest:  # merge with a group of the same machine
                if h.machine == g.machine and g.tp + h.tp <= max_tp and pipe.index(h) > j:
                    merged = tuple(x for x in rest if x is not h) + (Group(g.devices + h.devices),)
                    yield with_pipe(i, merged)
        for (machine, _), devs in spare.items():  # add a group of unused devices
            for size in sorted({1, min(len(devs), max_tp)}):
                yield with_pipe(i, pipe + (Group(tuple(devs[:size])),))
            for j, g in enumerate(pipe):  # or widen a group with them
                if g.machine == machine and g.tp < max_tp:
                    widened = Group(g.devices + tuple(devs[: max_tp - g.tp]))
                    yield with_pipe(i, pipe[:j] + pipe[j + 1:] + (widened,))
    if unused:  # a new replica from the unused devices, one group per machine and kind
        new = tuple(Group(tuple(devs[:max_tp])) for devs in spare.values())
        yield pipes + (_ordered(new, machine_order),)


# --- a new worker joining a running swarm -------------------------------------------------------


@dataclass(frozen=True)
class ServingStage:
    """A stage the swarm already serves, as its DHT record tells: layers [start, end), TP, device."""

    start: int
    end: int
    tp: int
    device: DeviceType


def best_stage_for_new_worker(current_stages: Sequence[ServingStage], device: DeviceType,
                              model: ModelConfig, *, n_devices: int = 1, dtype: str | Dtype = "fp16",
                              workload: Workload = Workload(), params: CostParams = CostParams(),
                              candidates: Sequence[tuple[int, int, int]] | None = None) -> tuple[int, int, int]:
    """The ``(start, end, tp)`` a new worker with ``n_devices`` of ``device`` should serve.

    As Petals' servers choose blocks: each layer's capacity is the summed token rate of
    the stages that hold it; the swarm's throughput is its weakest layer's capacity. The
    new stage is the layer range that maximises the sorted vector of capacities (leximin):
    gaps first, then the weakest layers. Chains join stages end to start, so the range
    starts at an existing stage boundary (or 0) and ends at one (or L), or where the
    worker's memory runs out, which makes a new boundary for the next worker.

    ``candidates``: the only ``(start, end, tp)`` ranges allowed (a fixed plan's stages).
    """
    dtype = dtype_named(dtype) if isinstance(dtype, str) else dtype
    L, b = model.n_layers, workload.sessions

    def costs(kind: DeviceType, tp: int):
        return {(first, last): stage_cost(model, dtype, (kind,) * tp, first=first, last=last, workload=workload,
                                          sessions=b, micro_batch=b, params=params)
                for first in (False, True) for last in (False, True)}

    def rate(table, start, end):
        return b / table[(start == 0, end == L)].decode.at(end - start)

    capacity = np.zeros(L)
    tables: dict[tuple, dict] = {}
    for s in current_stages:
        table = tables.setdefault((s.device, s.tp), costs(s.device, s.tp))
        capacity[s.start:s.end] += rate(table, s.start, s.end)
    tp = max(1, min(n_devices, model.n_kv_heads))
    fixed = candidates is not None
    if candidates is None:
        own = tables.setdefault((device, tp), costs(device, tp))
        candidates = _ranges_from_boundaries(current_stages, L, tp,
                                             lambda start, n: own[(start == 0, start + n == L)].fits(n))
    best, best_key = None, None
    for start, end, c_tp in candidates:
        table = tables.setdefault((device, c_tp), costs(device, c_tp))
        if not table[(start == 0, end == L)].fits(end - start):
            continue
        after = capacity.copy()
        after[start:end] += rate(table, start, end)
        key = tuple(np.sort(after))
        if best_key is None or key > best_key:
            best, best_key = (start, end, c_tp), key
    if best is None and fixed:
        smallest = min(candidates, key=lambda c: c[1] - c[0], default=None)
        raise ConfigError(
            f"{tp}x{device.name} ({device.usable_memory / GiB:.2f} GiB usable) cannot hold any stage of the "
            f"plan (the smallest is layers {smallest[0]}-{smallest[1]})" if smallest else "the plan has no stages")
    if best is None:
        table = costs(device, tp)
        need = table[(False, False)].memory.at(1)
        raise ConfigError(
            f"{tp}x{device.name} cannot hold one layer of {model.name} ({dtype.name}): a layer with "
            f"its KV cache needs {need / GiB:.2f} GiB per device, {device.usable_memory / GiB:.2f} GiB usable")
    return best


def _ranges_from_boundaries(current_stages: Sequence[ServingStage], L: int, tp: int, fits) -> list[tuple[int, int, int]]:
    """Chains join stages end to start: a new range starts at an existing boundary (or 0) and
    ends at one (or L), or where the worker's memory runs out (``fits(start, n)``)."""
    boundaries = sorted({0, L} | {s.start for s in current_stages} | {s.end for s in current_stages})
    out = []
    for start in boundaries[:-1]:
        fit = max((n for n in range(1, L - start + 1) if fits(start, n)), default=0)
        ends = {e for e in boundaries if start < e <= start + fit} | ({start + fit} if fit else set())
        out += [(start, end, tp) for end in sorted(ends)]
    return out
