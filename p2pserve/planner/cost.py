"""An analytic cost model of a plan: time to first token, per-token latency, throughput, memory.

Every decoder layer is the same, so a stage's time and memory are *affine* in its layer
count ``n``: ``fixed + per_layer * n`` (``Affine``). ``stage_cost`` computes the two
coefficients for one TP group; ``Chain`` strings stages into a pipeline and adds the
hops between machines; ``evaluate_plan`` turns replicas and their layer splits into the
figures the planner optimises and the CLI prints.

The model, per decoder layer on a stage's TP leader (rank 0 holds the largest shard):
- compute is a roofline, ``max(flops / flop_rate, bytes / bandwidth)`` on the slowest
  device of the group; TP divides weights, KV heads and FFN columns as ``p2pserve.engine.tp``
  does (contiguous KV-head groups, so the leader holds ``ceil(kv_heads / tp)`` heads);
- two all-reduces of the activations: ``latency + 2 (tp-1)/tp * bytes / link_bandwidth`` each;
- a fixed software overhead (eager PyTorch dispatch), per layer and per step; per layer it is
  the device's measured ``layer_overhead`` where there is one (``measure.py``).
A decode step reads the weights once for the whole batch, and each sequence's KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Sequence

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError
from p2pserve.plan import Plan
from p2pserve.planner.devices import INTER_MACHINE, KV_SHARE, DeviceType, Group, Link


@dataclass(frozen=True)
class Dtype:
    name: str
    weight_bytes: float  # per parameter, quantisation scales included
    act_bytes: int  # activations between layers and stages
    kv_bytes: float  # per KV cache entry (its scales included)
    flops_scale: float = 1.0  # matmul rate relative to the device's fp16 figure
    # per parameter of the embedding table where it stays unquantized (None: weight_bytes);
    # a tied LM head is then a quantized copy of its own
    embed_bytes: float | None = None
    # per parameter of the LM head where it keeps more bits than the layers (None: weight_bytes)
    head_bytes: float | None = None

    @property
    def table_bytes(self) -> float:
        return self.weight_bytes if self.embed_bytes is None else self.embed_bytes

    @property
    def lm_head_bytes(self) -> float:
        return self.weight_bytes if self.head_bytes is None else self.head_bytes


# int8 and int4 are the engine's weight-only formats (engine/quant.py): fp32 activations and
# KV cache, an fp32 embedding table, an fp32 scale per output row or per 32-input block of a
# GGUF's Q8_0 (int8; counted per block, the largest cost) or an fp16 scale and minimum per
# group of at least 32 inputs (int4; counted at 32, GGUF's block, the largest cost). An int4
# stage keeps its LM head at int8 (engine.build.quantized_head), counted as int8's weights.
INT8_BYTES = 1 + 4 / 32
DTYPES = {
    "fp16": Dtype("fp16", 2, 2, 2),
    "bf16": Dtype("bf16", 2, 2, 2),
    "fp32": Dtype("fp32", 4, 4, 4, flops_scale=0.5),  # TF32 tensor cores run at half fp16 rate
    "int8": Dtype("int8", INT8_BYTES, 4, 4, flops_scale=0.5, embed_bytes=4),
    "int4": Dtype("int4", 0.5 + 4 / 32, 4, 4, flops_scale=0.5, embed_bytes=4, head_bytes=INT8_BYTES),
}


# bytes per cached key or value of a worker's --kv-dtype: an int8 cache's scale (fp32) a
# head's row counted at 64 values (the smallest head_dim of the known models, the largest cost)
KV_BYTES = {**{name: DTYPES[name].kv_bytes for name in ("fp32", "bf16", "fp16")}, "int8": 1 + 4 / 64}


def dtype_named(name: str, kv_dtype: str = "auto") -> Dtype:
    """``--dtype name`` with its KV cache in ``--kv-dtype kv_dtype`` (auto: as the dtype keeps it)."""
    try:
        precision = DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None
    if kv_dtype == "auto":
        return precision
    if kv_dtype not in KV_BYTES:
        raise ConfigError(f"unknown KV cache dtype {kv_dtype!r}: use auto or one of {', '.join(KV_BYTES)}")
    return replace(precision, kv_bytes=KV_BYTES[kv_dtype])


@dataclass(frozen=True)
class Workload:
    prompt_len: int = 512
    output_len: int = 128
    sessions: int = 1  # concurrent sessions over the whole swarm

    def __post_init__(self):
        for what in ("prompt_len", "output_len", "sessions"):
            if getattr(self, what) < 1:
                raise ConfigError(f"{what.replace('_', '-')} must be at least 1, got {getattr(self, what)}")

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.output_len

    @property
    def mean_context(self) -> float:
        """Keys a decode step attends over, averaged over the answer."""
        return self.prompt_len + self.output_len / 2


@dataclass(frozen=True)
class CostParams:
    gpu_layer_overhead: float = 30e-6  # s per layer per forward: eager kernel launches
    cpu_layer_overhead: float = 150e-6  # same on CPU, torch eager (measure.py measures 100-200 us on EPYC)
    step_overhead: float = 200e-6  # s per stage per step: framing, scheduling, Python
    network: Link = field(default=INTER_MACHINE)  # between machines
    # share of each device's memory kept free of weights for the KV cache (devices.KV_SHARE);
    # 0 where workers announce their sessions themselves (the running swarm)
    kv_share: float = KV_SHARE


@dataclass(frozen=True)
class Affine:
    fixed: float
    per_layer: float

    def at(self, n):
        """Works on ints and numpy arrays alike (same IEEE arithmetic either way)."""
        return self.fixed + self.per_layer * n


@dataclass(frozen=True)
class StageCost:
    prefill: Affine  # s: one session's whole prompt
    decode: Affine  # s: one decode step of a micro-batch
    memory: Affine  # bytes on the leader, the busiest device of the group
    available: float  # usable bytes on the smallest device of the group

    def fits(self, n: int) -> bool:
        return self.memory.at(n) <= self.available

    def max_layers(self) -> int:
        """The largest ``n`` with ``fits(n)`` (0 if not even one layer fits)."""
        if self.memory.per_layer <= 0:
            return 1 << 30
        n = max(0, math.floor((self.available - self.memory.fixed) / self.memory.per_layer))
        while self.fits(n + 1):
            n += 1
        while n > 0 and not self.fits(n):
            n -= 1
        return n


# --- the model's shape, per TP rank ---------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """What the leader of a TP group of ``tp`` holds of one layer."""

    kv_heads: int
    q_heads: int
    ffn: int

    @classmethod
    def of(cls, model: ModelConfig, tp: int) -> "Shard":
        kv = -(-model.n_kv_heads // tp)  # uneven split: the leader takes ceil
        return cls(kv, kv * model.group_size, -(-model.intermediate_size // tp))


def _float_params(model: ModelConfig) -> int:
    """A layer's parameters a quantized stage keeps in the activations' dtype: its two
    RMSNorm weights, and a mixture of experts' router."""
    return (2 + model.n_experts) * model.hidden_size


def layer_params(model: ModelConfig, shard: Shard, experts: float | None = None) -> float:
    """One layer's parameters on the leader; of a mixture of experts, ``experts`` of them
    (all it holds where None: what a token uses is ``n_experts_used``)."""
    h, hd = model.hidden_size, model.head_dim
    attention = h * (shard.q_heads + 2 * shard.kv_heads) * hd + shard.q_heads * hd * h  # qkv + o
    mlp = 3 * h * shard.ffn  # gate, up, down
    if model.is_moe:
        mlp *= model.n_experts if experts is None else experts
    return attention + mlp + _float_params(model)


def layer_bytes(model: ModelConfig, shard: Shard, dtype: Dtype, experts: float | None = None) -> float:
    """One layer's weights (``layer_params``'): its linear weights in ``dtype``, its norms (and
    router) in the activations' dtype (a quantized stage keeps them float)."""
    floats = _float_params(model)
    return (layer_params(model, shard, experts) - floats) * dtype.weight_bytes + floats * dtype.act_bytes


def experts_read(model: ModelConfig, tokens: int) -> float:
    """How many of a layer's experts a step of ``tokens`` tokens reads, expected where each
    token picks its ``n_experts_used`` uniformly (0 for a dense model)."""
    if not model.is_moe:
        return 0
    return model.n_experts * (1 - (1 - model.n_experts_used / model.n_experts) ** tokens)


def weights_bytes(model: ModelConfig, dtype: Dtype) -> float:
    """The whole model: every layer, the embedding, final norm and LM head."""
    table = model.vocab_size * model.hidden_size
    head = 0 if model.tie_word_embeddings and dtype.embed_bytes is None else table
    layers = model.n_layers * layer_bytes(model, Shard.of(model, 1), dtype)
    final_norm = model.hidden_size * dtype.act_bytes
    return layers + final_norm + head * dtype.lm_head_bytes + table * dtype.table_bytes


def kv_bytes_per_token(model: ModelConfig, shard: Shard, dtype: Dtype) -> float:
    """One token's keys and values in one layer on the leader."""
    return 2 * shard.kv_heads * model.head_dim * dtype.kv_bytes


# --- one stage -------------------------------------------------------------------------------


@lru_cache(maxsize=1 << 16)  # the search asks for the same few kinds of group many times
def stage_cost(model: ModelConfig, dtype: Dtype, kinds: tuple[DeviceType, ...], *, first: bool, last: bool,
               workload: Workload, sessions: int, micro_batch: int, params: CostParams) -> StageCost:
    """Time and memory of a TP group of devices of ``kinds`` holding ``n`` layers, as affine
    functions of ``n`` (``Group.kinds``: the order does not matter to the result).

    ``sessions`` is how many sessions this pipeline carries (their KV cache lives here);
    ``micro_batch`` how many of them one decode step processes.
    """
    tp = len(kinds)
    on_cpu = any(k.kind == "cpu" for k in kinds)
    # a CPU's figure is its fp32 rate already: there are no tensor cores to slow to TF32
    flop_rate = min(k.flops for k in kinds) * (1.0 if on_cpu else dtype.flops_scale)
    bandwidth = min(k.bandwidth for k in kinds)
    link = slowest_link(kinds)
    default = params.cpu_layer_overhead if on_cpu else params.gpu_layer_overhead
    overhead = max((k.layer_overhead for k in kinds if k.layer_overhead is not None), default=default)
    shard = Shard.of(model, tp)
    h, hd, vocab = model.hidden_size, model.head_dim, model.vocab_size
    w_bytes = layer_bytes(model, shard, dtype)
    used = model.n_experts_used or None  # experts a token computes with
    kv_token = kv_bytes_per_token(model, shard, dtype)
    # activations one token leaves behind in a layer: x, residual, normed x, qkv, gate/up, silu*up
    act_row = (3 * h + (shard.q_heads + 2 * shard.kv_heads) * hd + 3 * shard.ffn) * dtype.act_bytes

    def layer_time(batch: int, new: int, attended: float, kv_read: float) -> float:
        tokens = batch * new
        flops = 2 * layer_params(model, shard, used) * tokens + 4 * shard.q_heads * hd * new * attended * batch
        # weights once per step (a mixture's experts that its tokens pick); each sequence's
        # cache read once, new keys written once
        read = layer_bytes(model, shard, dtype, experts_read(model, tokens)) if model.is_moe else w_bytes
        moved = read + batch * (kv_read + new) * kv_token + tokens * act_row
        compute = max(flops / flop_rate, moved / bandwidth)
        all_reduce = 0.0 if tp == 1 else 2 * (
            link.latency + 2 * (tp - 1) / tp * tokens * h * dtype.act_bytes / link.bandwidth)
        return compute + all_reduce + overhead

    def step_fixed(batch: int, new: int) -> float:
        t = params.step_overhead
        if tp > 1:  # the leader broadcasts the step header and its input to the followers
            t += 2 * link.latency + batch * new * h * dtype.act_bytes / link.bandwidth
        if first:  # embedding rows gathered on the leader
            t += batch * new * h * dtype.act_bytes / bandwidth
        if last:  # final norm + LM head on the leader, last position of each sequence only
            flops = 2 * vocab * h * batch
            moved = vocab * h * dtype.lm_head_bytes + batch * vocab * 4
            t += max(flops / flop_rate, moved / bandwidth)
        return t

    p = workload.prompt_len
    prefill = Affine(step_fixed(1, p), layer_time(1, p, (p + 1) / 2, 0))
    decode = Affine(step_fixed(micro_batch, 1),
                    layer_time(micro_batch, 1, workload.mean_context, workload.mean_context))

    fixed_mem = 0.0
    if first:
        fixed_mem += vocab * h * dtype.table_bytes
    if last:
        fixed_mem += h * dtype.act_bytes  # final norm
        if not (first and model.tie_word_embeddings and dtype.embed_bytes is None):
            fixed_mem += vocab * h * dtype.lm_head_bytes
    # transient peak: a whole prompt in flight (prefills run one at a time) or a decode batch
    fixed_mem += max(p, micro_batch) * act_row
    if last:
        fixed_mem += max(1, micro_batch) * vocab * 4  # float32 logits
    fixed_mem += workload.max_len * hd * 2 * dtype.act_bytes  # rope cos/sin tables
    per_layer_mem = w_bytes + sessions * workload.max_len * kv_token  # preallocated cache slots
    return StageCost(prefill, decode, Affine(fixed_mem, per_layer_mem),
                     min(k.usable_memory - params.kv_share * k.memory for k in kinds))


def slowest_link(kinds) -> Link:
    return min((k.link for k in kinds), key=lambda link: (link.bandwidth, -link.latency))


def hop_link(a: Group, b: Group, params: CostParams) -> Link:
    """The link a stage's output crosses to reach the next stage."""
    if a.machine != b.machine:
        return params.network
    return slowest_link(a.kinds + b.kinds)


# --- one pipeline ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """A pipeline's stages in order, with everything that does not depend on the layer split.

    Decode with ``sessions`` sessions on ``S`` stages: the sessions form
    ``m = min(sessions, S)`` micro-batches of ``ceil(sessions / m)`` that chase each other
    round the pipeline. A micro-batch's next step needs its previous token, so one
    round (``cycle``: every stage, every hop, the token back to stage 0) bounds the step
    period from below; and every stage serves all ``m`` micro-batches per period, as does
    every hop's wire. Hence ``period = max(cycle, m * busiest stage, m * busiest wire)``:
    each session gets one token per period.
    """

    groups: tuple[Group, ...]
    sessions: int
    micro_batches: int
    costs: tuple[StageCost, ...]
    decode_hops: float  # s per decode round spent on links, the loop back to stage 0 included
    prefill_hops: float  # s a prompt's hidden states spend on links
    wire_busy: float  # s the busiest link carries one micro-batch

    @property
    def n_stages(self) -> int:
        return len(self.groups)

    def fits(self, counts: Sequence[int]) -> bool:
        return all(c.fits(n) for c, n in zip(self.costs, counts))

    def cycle(self, counts: Sequence[int]) -> float:
        return sum(c.decode.at(n) for c, n in zip(self.costs, counts)) + self.decode_hops

    def period(self, counts: Sequence[int]) -> float:
        busiest = max(c.decode.at(n) for c, n in zip(self.costs, counts))
        return max(self.cycle(counts), self.micro_batches * max(busiest, self.wire_busy))

    def ttft(self, counts: Sequence[int]) -> float:
        return sum(c.prefill.at(n) for c, n in zip(self.costs, counts)) + self.prefill_hops


def make_chain(model: ModelConfig, dtype: Dtype, groups: Sequence[Group], workload: Workload,
               sessions: int, params: CostParams) -> Chain:
    groups = tuple(groups)
    S = len(groups)
    m = max(1, min(sessions, S))
    mb = -(-sessions // m)
    costs = tuple(
        stage_cost(model, dtype, g.kinds, first=i == 0, last=i == S - 1, workload=workload,
                   sessions=sessions, micro_batch=mb, params=params)
        for i, g in enumerate(groups)
    )
    row = model.hidden_size * dtype.act_bytes
    hops = [hop_link(a, b, params) for a, b in zip(groups, groups[1:])]
    decode_hops = sum(h.latency + mb * row / h.bandwidth for h in hops)
    if S > 1:  # the sampled token ids go back to stage 0
        decode_hops += hop_link(groups[-1], groups[0], params).latency
    prefill_hops = sum(h.latency + workload.prompt_len * row / h.bandwidth for h in hops)
    wire_busy = max((mb * row / h.bandwidth for h in hops), default=0.0)
    return Chain(groups, sessions, m, costs, decode_hops, prefill_hops, wire_busy)


# --- a whole plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StageReport:
    group: Group
    start: int
    end: int
    memory_used: float  # bytes on the leader
    memory_available: float  # usable bytes on the group's smallest device
    decode_time: float  # s per decode step of one micro-batch
    prefill_time: float  # s for one prompt

    @property
    def n_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PipelineReport:
    stages: tuple[StageReport, ...]
    sessions: int  # provisioned sessions (KV cache slots) on this replica
    ttft: float  # s, one prompt on an idle pipeline
    token_latency: float  # s between two tokens of one session (the step period)
    throughput: float  # tokens/s with ``sessions`` sessions

    @property
    def fits(self) -> bool:
        return all(s.memory_used <= s.memory_available for s in self.stages)

    def to_plan(self) -> Plan:
        return Plan([s.group.tp for s in self.stages], [s.n_layers for s in self.stages])


@dataclass(frozen=True)
class PlanReport:
    pipelines: tuple[PipelineReport, ...]
    sessions: int  # the workload's concurrent sessions
    ttft: float  # s, the slowest replica that carries sessions
    token_latency: float  # s, the slowest replica that carries sessions
    throughput: float  # tokens/s over all replicas

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.pipelines)

    def plans(self) -> list[Plan]:
        return [p.to_plan() for p in self.pipelines]


def sessions_per_replica(sessions: int, replicas: int) -> int:
    """A least-loaded router spreads sessions evenly: no replica carries more than this."""
    return -(-sessions // replicas)


def report_pipeline(chain: Chain, counts: Sequence[int]) -> PipelineReport:
    stages, start = [], 0
    for group, cost, n in zip(chain.groups, chain.costs, counts):
        stages.append(StageReport(group, start, start + n, cost.memory.at(n), cost.available,
                                  cost.decode.at(n), cost.prefill.at(n)))
        start += n
    period = chain.period(counts)
    return PipelineReport(tuple(stages), chain.sessions, chain.ttft(counts), period,
                          chain.sessions / period)


def combine(pipelines: Sequence[PipelineReport], sessions: int) -> PlanReport:
    """The router fills the fastest replicas first, each up to the ``ceil(sessions / k)``
    sessions it was provisioned for: throughput adds up over the replicas that carry
    sessions, latency and time to first token are the worst of those."""
    per_replica = sessions_per_replica(sessions, len(pipelines))
    left, busy, throughput = sessions, [], 0.0
    for p in sorted(pipelines, key=lambda p: p.token_latency):
        carried = min(per_replica, left)
        if carried == 0:
            break
        busy.append(p)
        throughput += carried / p.token_latency
        left -= carried
    return PlanReport(tuple(pipelines), sessions, ttft=max(p.ttft for p in busy),
                      token_latency=max(p.token_latency for p in busy), throughput=throughput)


def evaluate_plan(model: ModelConfig, dtype: Dtype, pipelines: Sequence[Sequence[tuple[Group, int]]],
                  workload: Workload, params: CostParams = CostParams()) -> PlanReport:
    """Figures for replicas given as ``[[(group, n_layers), ...], ...]`` (memory not enforced:
    check ``.fits``)."""
    b = sessions_per_replica(workload.sessions, len(pipelines))
    reports = []
    for stages in pipelines:
        chain = make_chain(model, dtype, [g for g, _ in stages], workload, b, params)
        reports.append(report_pipeline(chain, [n for _, n in stages]))
    return combine(reports, workload.sessions)
