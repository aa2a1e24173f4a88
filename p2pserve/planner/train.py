"""Training layouts for a device list (``p2pserve plan --train``), from the serving cost model.

Every device becomes one rank. For each TP degree ``t`` (at most the model's KV heads),
each machine's devices are cut into TP groups of ``t`` (the rest one smaller group); for
each pipeline count ``P`` the groups are dealt to the pipelines in snake order of speed,
so pipelines come out about equally fast. Within a pipeline the layers go one at a time
to the stage that would finish soonest with one more (and still fits in memory); the
global batch's micro-batches are then dealt the same way over pipelines
(``templates.allocate``, Oobleck's rule). The best few layouts are returned.

A stage's time per micro-batch comes from ``cost.stage_cost``: its prefill of one
``seq_len`` prompt per layer, times the micro-batch's sequences, times 3 (backward costs
two forwards), plus the LM head over every position on the last stage and the
activations to the next stage. A pipeline's step is ``(micro-batches + stages - 1)``
times its slowest stage (the bubble of GPipe and 1F1B alike), and the step of the job
the slowest pipeline's plus one all-reduce of the fp32 gradients among pipelines.
Memory per rank: fp32 weights, gradients and AdamW's two moments (16 bytes a parameter),
and the activations of the micro-batches in flight (1F1B: stages after this one, plus one).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError
from p2pserve.planner.cost import DTYPES, CostParams, Shard, Workload, layer_params, stage_cost
from p2pserve.planner.devices import Device, Group
from p2pserve.train.layout import TrainLayout, check_trainable, make_layout
from p2pserve.train.templates import allocate

FP32 = DTYPES["fp32"]
TRAIN_BYTES_PER_PARAM = 16  # fp32 weight, gradient, AdamW's two moments


@dataclass(frozen=True)
class StagePlan:
    group: Group
    layers: int
    time: float  # s per micro-batch, forward and backward


@dataclass(frozen=True)
class PipelinePlan:
    stages: tuple[StagePlan, ...]
    micro_batch: int

    def time(self, micro_batches: int) -> float:
        """Step time of ``micro_batches`` micro-batches (``templates.allocate`` calls this)."""
        return (micro_batches + len(self.stages) - 1) * max(s.time for s in self.stages)


@dataclass(frozen=True)
class TrainProposal:
    pipelines: tuple[PipelinePlan, ...]
    chunks: tuple[int, ...]  # micro-batches of each pipeline
    seq_len: int
    step_time: float  # s, predicted
    sync_time: float  # s of it: the gradient all-reduce among pipelines

    @property
    def tokens_per_s(self) -> float:
        return self.layout.global_batch * self.seq_len / self.step_time

    @cached_property
    def layout(self) -> TrainLayout:
        return make_layout([[s.group.tp for s in p.stages] for p in self.pipelines],
                           [[s.layers for s in p.stages] for p in self.pipelines],
                           [c * p.micro_batch for p, c in zip(self.pipelines, self.chunks)], list(self.chunks))

    def rank_devices(self) -> list[Device]:
        """The device of each rank, in ``TrainLayout``'s rank order."""
        return [d for p in self.pipelines for s in p.stages for d in s.group.devices]

    def flags(self) -> str:
        d = self.layout.to_dict()
        return (f'--hetero-configs "{d["hetero_configs"]}" --layer-partitions "{d["layer_partitions"]}" '
                f'--global-batch-sizes {" ".join(map(str, d["global_batch_sizes"]))} '
                f'--chunks {" ".join(map(str, d["chunks"]))} --seq-len {self.seq_len}')


def plan_training(model: ModelConfig, devices: list[Device], *, seq_len: int, global_batch: int,
                  micro_batch: int = 1, params: CostParams = CostParams(kv_share=0.0),
                  top: int = 3) -> list[TrainProposal]:
    """The ``top`` layouts of most predicted tokens/s using every device once, best first."""
    check_trainable(model)
    if global_batch % micro_batch:
        raise ConfigError(f"--global-batch {global_batch} is not a whole number of micro-batches of {micro_batch}")
    n_micro = global_batch // micro_batch
    found: dict[tuple, TrainProposal] = {}
    for tp in range(1, model.n_kv_heads + 1):
        groups = _tp_groups(devices, tp)
        for n_pipes in range(1, min(len(groups), n_micro) + 1):
            proposal = _proposal(model, groups, n_pipes, n_micro, micro_batch, seq_len, params)
            if proposal is not None:
                key = tuple(map(str, proposal.layout.to_dict().values()))
                found.setdefault(key, proposal)
    if not found:
        raise ConfigError(f"no training layout of {model.name} fits these {len(devices)} devices: "
                          f"add devices with more memory or shorten --seq-len")
    return sorted(found.values(), key=lambda p: -p.tokens_per_s)[:top]


def _tp_groups(devices: list[Device], tp: int) -> list[Group]:
    out = []
    for _, mine in itertools.groupby(sorted(devices, key=lambda d: (d.machine, d.index)), key=lambda d: d.machine):
        mine = list(mine)
        out += [Group(tuple(mine[i : i + tp])) for i in range(0, len(mine), tp)]
    return out


def _proposal(model, groups, n_pipes, n_micro, micro_batch, seq_len, params) -> TrainProposal | None:
    speed = {g: _stage_time(model, g, 1, micro_batch, seq_len, params, first=False, last=False) for g in groups}
    order = sorted(groups, key=lambda g: (speed[g], g.machine))
    dealt: list[list[Group]] = [[] for _ in range(n_pipes)]
    for i, g in enumerate(order):
        lap, pos = divmod(i, n_pipes)
        dealt[pos if lap % 2 == 0 else n_pipes - 1 - pos].append(g)
    pipelines = []
    for stage_groups in dealt:
        stage_groups.sort(key=lambda g: g.machine)  # hops inside a machine where it can
        pipe = _split_layers(model, stage_groups, micro_batch, seq_len, params)
        if pipe is None:
            return None
        pipelines.append(pipe)
    chunks = allocate(pipelines, n_micro)
    sync = _sync_time(model, pipelines, params)
    step = max(p.time(c) for p, c in zip(pipelines, chunks)) + sync
    return TrainProposal(tuple(pipelines), tuple(chunks), seq_len, step, sync)


def _split_layers(model, groups, micro_batch, seq_len, params) -> PipelinePlan | None:
    """Layers dealt one at a time to the stage that would finish soonest with one more."""
    n_stages = len(groups)
    if n_stages > model.n_layers:
        return None
    ends = [_ends(groups, s, params) for s in range(n_stages)]
    layers = [1] * n_stages

    def time(s, n):
        return _stage_time(model, groups[s], n, micro_batch, seq_len, params, **ends[s])

    def fits(s, n):
        return _stage_memory(model, groups[s], n, micro_batch, seq_len, n_stages - s,
                             first=ends[s]["first"], last=ends[s]["last"]) <= min(
            k.usable_memory for k in groups[s].kinds)

    if not all(fits(s, 1) for s in range(n_stages)):
        return None
    for _ in range(model.n_layers - n_stages):
        open_stages = [s for s in range(n_stages) if fits(s, layers[s] + 1)]
        if not open_stages:
            return None
        s = min(open_stages, key=lambda s: (time(s, layers[s] + 1), s))
        layers[s] += 1
    return PipelinePlan(tuple(StagePlan(g, n, time(s, n)) for s, (g, n) in enumerate(zip(groups, layers))),
                        micro_batch)


def _ends(groups: list[Group], s: int, params: CostParams) -> dict:
    """Where stage ``s`` of a pipeline of ``groups`` sits: first, last, its link to the next."""
    last = s == len(groups) - 1
    hop = None if last else groups[s].kinds[0].link if groups[s + 1].machine == groups[s].machine else params.network
    return dict(first=s == 0, last=last, hop=hop)


def predict(model: ModelConfig, layout: TrainLayout, devices: list[Device], seq_len: int,
            params: CostParams = CostParams(kv_share=0.0)) -> TrainProposal:
    """The cost model's figures for a given layout, rank ``r`` on ``devices[r]``."""
    check_trainable(model)
    if len(devices) != layout.world_size:
        raise ConfigError(f"the layout has {layout.world_size} ranks but {len(devices)} devices were given")
    ranks = iter(devices)
    pipelines = []
    for pipe in layout.pipelines:
        groups = [Group(tuple(next(ranks) for _ in range(tp))) for tp in pipe.tps]
        stages = tuple(StagePlan(g, n, _stage_time(model, g, n, pipe.micro_batch, seq_len, params,
                                                   **_ends(groups, s, params)))
                       for s, (g, n) in enumerate(zip(groups, pipe.layers)))
        pipelines.append(PipelinePlan(stages, pipe.micro_batch))
    chunks = tuple(p.chunks for p in layout.pipelines)
    sync = _sync_time(model, pipelines, params)
    return TrainProposal(tuple(pipelines), chunks, seq_len, max(p.time(c) for p, c in zip(pipelines, chunks)) + sync,
                         sync)


def _stage_time(model, group, n, micro_batch, seq_len, params, *, first, last, hop=None) -> float:
    """``hop``: the link to the next stage (None on the last)."""
    cost = stage_cost(model, FP32, group.kinds, first=first, last=last, workload=Workload(seq_len, 1, 1),
                      sessions=1, micro_batch=1, params=params)
    t = 3 * micro_batch * cost.prefill.at(n)
    if last:  # the head over every position, forward and backward (prefill counted the last one)
        flop_rate = min(k.flops for k in group.kinds) * (1.0 if group.kinds[0].kind == "cpu" else FP32.flops_scale)
        t += 3 * 2 * model.vocab_size * model.hidden_size * micro_batch * seq_len / flop_rate
    if hop is not None:  # activations out, their gradient back
        t += 2 * (hop.latency + micro_batch * seq_len * model.hidden_size * FP32.act_bytes / hop.bandwidth)
    return t


def _stage_memory(model, group, n, micro_batch, seq_len, in_flight, *, first, last) -> float:
    shard = Shard.of(model, group.tp)
    h = model.hidden_size
    params = n * layer_params(model, shard) + (model.vocab_size * h if first else 0)
    if last and not (first and model.tie_word_embeddings):
        params += model.vocab_size * h
    # what autograd keeps of one token in one layer: inputs of every matmul, norms, attention out
    act = (6 * h + (shard.q_heads + 2 * shard.kv_heads) * model.head_dim + 3 * shard.ffn) * FP32.act_bytes
    logits = model.vocab_size * 4 * 2 * micro_batch * seq_len if last else 0
    return params * TRAIN_BYTES_PER_PARAM + in_flight * micro_batch * seq_len * n * act + logits


def _sync_time(model, pipelines, params) -> float:
    """A ring all-reduce of the fp32 gradients among pipelines, over the slowest link between them."""
    if len(pipelines) == 1:
        return 0.0
    machines = {s.group.machine for p in pipelines for s in p.stages}
    link = params.network if len(machines) > 1 else min(
        (k.link for p in pipelines for s in p.stages for k in s.group.kinds), key=lambda lk: lk.bandwidth)
    grad_bytes = FP32.weight_bytes * (model.n_layers * layer_params(model, Shard.of(model, 1))
                                      + model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2))
    n = len(pipelines)
    return 2 * (n - 1) / n * grad_bytes / link.bandwidth + 2 * (n - 1) * link.latency


def describe(proposal: TrainProposal) -> list[str]:
    """Lines for the terminal: figures, the pipelines and their devices, the flags."""
    lines = [f"{proposal.tokens_per_s:.1f} tokens/s predicted ({proposal.step_time * 1e3:.1f} ms a step, "
             f"{proposal.sync_time * 1e3:.1f} ms of it the gradient sum among pipelines)"]
    for i, (p, c) in enumerate(zip(proposal.pipelines, proposal.chunks)):
        stages = ", ".join(f"{s.group.label} {s.layers} layers" for s in p.stages)
        lines.append(f"  pipeline {i}: {c * p.micro_batch} sequences in {c} micro-batches; {stages}")
    ranks = proposal.rank_devices()
    lines.append("  ranks: " + ", ".join(f"{r} {d.label}" for r, d in enumerate(ranks)))
    lines.append(f"  p2pserve train {proposal.flags()}")
    return lines
