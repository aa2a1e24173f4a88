"""The planner's cost model: shapes, roofline, TP, memory, pipelines, replicas; and the
device micro-benchmark that feeds it."""

from __future__ import annotations

import json
import math

import pytest

from p2pserve.planner.cost import (DTYPES, CostParams, Shard, Workload, combine, evaluate_plan, layer_params,
                                   make_chain, report_pipeline, stage_cost, weights_bytes)
from p2pserve.planner.devices import KV_SHARE, GiB, Device, DeviceType, Group, Link, parse_devices
from p2pserve.planner.shapes import KNOWN_MODELS
from p2pserve.engine.tp import shard_for

FP16 = DTYPES["fp16"]
LLAMA_70B = KNOWN_MODELS["llama-2-70b"]
SMOLLM = KNOWN_MODELS["smollm2-135m"]
A100 = parse_devices("A100-80G")[0].kind
NO_OVERHEAD = CostParams(gpu_layer_overhead=0.0, cpu_layer_overhead=0.0, step_overhead=0.0)


def cost(model, kinds, *, first=False, last=False, workload=Workload(), sessions=1, micro_batch=1,
         params=NO_OVERHEAD, dtype=FP16):
    return stage_cost(model, dtype, tuple(kinds), first=first, last=last, workload=workload,
                      sessions=sessions, micro_batch=micro_batch, params=params)


def group(kind, n, machine="m"):
    return Group(tuple(Device(kind, machine, i) for i in range(n)))


def test_llama_2_70b_fp16_weights_take_128_5_gib():
    assert weights_bytes(LLAMA_70B, FP16) / GiB == pytest.approx(128.5, abs=0.05)
    q4, q8 = (weights_bytes(LLAMA_70B, DTYPES[d]) for d in ("int4", "int8"))
    assert q4 < q8 < weights_bytes(LLAMA_70B, FP16)


@pytest.mark.parametrize("model", [SMOLLM, LLAMA_70B, KNOWN_MODELS["tinyllama-1.1b"]])
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_tp_leader_holds_the_largest_shard_as_the_engine_splits_it(model, tp):
    ours = Shard.of(model, tp)
    leader = shard_for(model, 0, tp)
    assert (ours.kv_heads, ours.q_heads) == (leader.n_kv_heads, leader.n_q_heads)
    assert ours.ffn == leader.ffn[1] - leader.ffn[0]
    assert all(shard_for(model, r, tp).n_kv_heads <= ours.kv_heads for r in range(tp))


def test_decode_reads_the_weights_once_at_the_memory_bandwidth():
    one = cost(LLAMA_70B, [A100])
    weights = layer_params(LLAMA_70B, Shard.of(LLAMA_70B, 1)) * 2
    # a decode step of one token is bandwidth bound: weights + this session's KV cache
    assert one.decode.per_layer == pytest.approx(weights / A100.bandwidth, rel=0.01)
    assert one.decode.per_layer > weights / A100.bandwidth


def test_tp_divides_the_weight_read_and_adds_two_all_reduces_per_layer():
    instant = DeviceType("instant", 80 * GiB, math.inf, math.inf, Link(10e9, 20e-6))
    for tp in (2, 4, 8):
        t = cost(LLAMA_70B, [instant] * tp, workload=Workload(prompt_len=8), micro_batch=3).decode.per_layer
        message = 3 * LLAMA_70B.hidden_size * 2  # three sessions' hidden states, fp16
        assert t == pytest.approx(2 * (20e-6 + 2 * (tp - 1) / tp * message / 10e9))
    one, four = cost(LLAMA_70B, [A100]).decode.per_layer, cost(LLAMA_70B, [A100] * 4).decode.per_layer
    assert one / 4 < four < one / 2


def test_uneven_tp_is_as_slow_as_its_largest_shard():
    # SmolLM2 has 3 KV heads: TP 2 gives the leader 2 of them, TP 3 one each
    instant_link = Link(math.inf, 0.0)
    kind = DeviceType("g", 8 * GiB, 1e12, 1e11, instant_link)
    t1, t2, t3 = (cost(SMOLLM, [kind] * tp).decode.per_layer for tp in (1, 2, 3))
    assert t3 < t2 < t1
    assert t2 > t1 / 2  # 2/3 of the attention on the leader, not 1/2


def test_long_prompts_are_compute_bound():
    c = cost(LLAMA_70B, [A100], workload=Workload(prompt_len=2048))
    flops = 2 * layer_params(LLAMA_70B, Shard.of(LLAMA_70B, 1)) * 2048
    assert c.prefill.per_layer >= flops / A100.flops
    assert c.prefill.per_layer < 1.5 * flops / A100.flops


def test_software_overhead_is_paid_per_layer_and_per_step():
    params = CostParams(gpu_layer_overhead=30e-6, cpu_layer_overhead=60e-6, step_overhead=200e-6)
    gpu = cost(LLAMA_70B, [A100], params=params)
    bare = cost(LLAMA_70B, [A100])
    assert gpu.decode.per_layer - bare.decode.per_layer == pytest.approx(30e-6)
    assert gpu.decode.fixed - bare.decode.fixed == pytest.approx(200e-6)
    cpu = parse_devices("cpu")[0].kind
    assert (cost(SMOLLM, [cpu], params=params).decode.per_layer
            - cost(SMOLLM, [cpu]).decode.per_layer) == pytest.approx(60e-6)


def test_memory_is_weights_and_cache_per_layer_plus_embedding_and_head_at_the_ends():
    workload = Workload(prompt_len=512, output_len=128)
    middle = cost(LLAMA_70B, [A100], workload=workload, sessions=4)
    shard = Shard.of(LLAMA_70B, 1)
    kv = 4 * 640 * 2 * shard.kv_heads * LLAMA_70B.head_dim * 2
    assert middle.memory.per_layer == layer_params(LLAMA_70B, shard) * 2 + kv
    embedding = LLAMA_70B.vocab_size * LLAMA_70B.hidden_size * 2
    first = cost(LLAMA_70B, [A100], workload=workload, sessions=4, first=True)
    last = cost(LLAMA_70B, [A100], workload=workload, sessions=4, last=True)
    assert first.memory.fixed - middle.memory.fixed == embedding
    assert last.memory.fixed - middle.memory.fixed > embedding  # LM head, final norm, logits
    assert middle.available == A100.memory - A100.reserved - KV_SHARE * A100.memory  # the KV budget kept free


def test_tied_embeddings_are_held_once_by_a_single_stage():
    both = cost(SMOLLM, [A100], first=True, last=True)
    first, last = cost(SMOLLM, [A100], first=True), cost(SMOLLM, [A100], last=True)
    middle = cost(SMOLLM, [A100])
    embedding = SMOLLM.vocab_size * SMOLLM.hidden_size * 2
    assert both.memory.fixed == pytest.approx(first.memory.fixed + last.memory.fixed - middle.memory.fixed - embedding)


def test_max_layers_is_the_exact_memory_limit():
    c = cost(LLAMA_70B, [A100], sessions=8)
    n = c.max_layers()
    assert c.fits(n) and not c.fits(n + 1)


def test_hops_between_machines_pay_the_network():
    net = Link(1.25e9, 0.5e-3)
    params = CostParams(network=net)
    a, b = group(A100, 1, "m1"), group(A100, 1, "m2")
    chain = make_chain(LLAMA_70B, FP16, [a, b], Workload(prompt_len=100), 1, params)
    row = LLAMA_70B.hidden_size * 2
    assert chain.decode_hops == pytest.approx((net.latency + row / net.bandwidth) + net.latency)
    assert chain.prefill_hops == pytest.approx(net.latency + 100 * row / net.bandwidth)
    same = make_chain(LLAMA_70B, FP16, [a, group(A100, 1, "m1")], Workload(), 1, params)
    assert same.decode_hops < chain.decode_hops / 10


def test_micro_batches_keep_every_stage_busy_but_a_round_bounds_the_period():
    a, b = group(A100, 1, "m1"), group(A100, 1, "m2")
    chain = make_chain(LLAMA_70B, FP16, [a, b], Workload(), 8, CostParams())
    assert chain.micro_batches == 2
    for split in ([40, 40], [60, 20], [75, 5]):
        busiest = max(c.decode.at(n) for c, n in zip(chain.costs, split))
        assert chain.period(split) == max(chain.cycle(split), 2 * busiest)
    assert chain.period([60, 20]) > chain.period([40, 40])


def test_batching_raises_throughput_far_more_than_latency():
    stages = [[(group(A100, 4), 80)]]
    one = evaluate_plan(LLAMA_70B, FP16, stages, Workload(sessions=1))
    many = evaluate_plan(LLAMA_70B, FP16, stages, Workload(sessions=32))
    assert many.throughput > 20 * one.throughput
    assert many.token_latency < 1.5 * one.token_latency


def test_sessions_fill_the_fastest_replicas_first():
    fast = report_pipeline(make_chain(LLAMA_70B, FP16, [group(A100, 4)], Workload(), 1, CostParams()), [80])
    slow_kind = parse_devices("A6000")[0].kind
    slow = report_pipeline(make_chain(LLAMA_70B, FP16, [group(slow_kind, 4)], Workload(), 1, CostParams()), [80])
    one = combine([slow, fast], sessions=1)
    assert one.token_latency == fast.token_latency and one.throughput == 1 / fast.token_latency
    two = combine([slow, fast], sessions=2)
    assert two.token_latency == slow.token_latency
    assert two.throughput == pytest.approx(1 / fast.token_latency + 1 / slow.token_latency)


def test_hexgen_hand_plan_fits_its_devices():
    devices = parse_devices("4xA6000@m1,2xA5000@m2,2xA4000@m3")
    report = evaluate_plan(LLAMA_70B, FP16, [[(Group(tuple(devices[:4])), 44), (Group(tuple(devices[4:6])), 20),
                                              (Group(tuple(devices[6:])), 16)]], Workload())
    assert report.fits
    assert [p.flags() for p in report.plans()] == ["--hetero-config 4 2 2 --pp-partition 44 20 16"]
    assert report.ttft > report.token_latency > 0


# --- measuring the local device ------------------------------------------------------------------


def test_measure_device_times_the_cpu_once_and_caches_it(tmp_path, monkeypatch):
    from p2pserve.planner import measure

    monkeypatch.setenv("P2PSERVE_CACHE_DIR", str(tmp_path))
    speed = measure.measure_device("cpu")
    assert speed.name.startswith("cpu")
    assert 1e8 < speed.flops < 1e14 and 1e8 < speed.bandwidth < 1e13 and speed.memory > GiB
    cached = json.loads((tmp_path / "devices.json").read_text())
    [key] = cached
    assert speed.torch_version in key and f"threads {speed.threads}" in key
    assert measure.measure_device("cpu") == speed
    # the second call reads the cache: a figure planted there comes back
    cached[key]["flops"] = 12345.0
    (tmp_path / "devices.json").write_text(json.dumps(cached))
    assert measure.measure_device("cpu").flops == 12345.0
    kind = speed.device_type()
    assert (kind.flops, kind.bandwidth, kind.kind) == (speed.flops, speed.bandwidth, "cpu")


def test_the_kv_budget_the_planner_keeps_is_the_workers_default_kv_memory():
    from p2pserve.node.budget import DEFAULT_SHARE

    assert KV_SHARE == DEFAULT_SHARE
