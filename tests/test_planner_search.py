"""The plan search: optimal on small swarms (checked against brute force), memory limits
exact, deterministic, fast on 64 devices, and better than HexGen's hand plan on its own
example."""

from __future__ import annotations

import itertools
import math
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError
from p2pserve.planner.cost import (DTYPES, CostParams, Shard, Workload, evaluate_plan, layer_params,
                                   make_chain, stage_cost)
from p2pserve.planner.devices import KV_SHARE, GiB, Device, DeviceType, Group, Link, parse_devices
from p2pserve.planner.search import (ServingStage, best_stage_for_new_worker, plan_swarm,
                                     split_layers)
from p2pserve.planner.shapes import KNOWN_MODELS

FP16 = DTYPES["fp16"]
LLAMA_70B = KNOWN_MODELS["llama-2-70b"]
HEXGEN_DEVICES = "4xA6000@m1,2xA5000@m2,2xA4000@m3"


def tiny_model(layers=4, kv=2, group=2, head_dim=8, ffn=48, vocab=64, tie=False) -> ModelConfig:
    heads = kv * group
    return ModelConfig(name="tiny", n_layers=layers, hidden_size=heads * head_dim, n_heads=heads,
                       n_kv_heads=kv, head_dim=head_dim, intermediate_size=ffn, vocab_size=vocab,
                       tie_word_embeddings=tie)


def kind(name, memory, flops=2e9, bandwidth=4e6, link=Link(5e6, 2e-5), cpu=False) -> DeviceType:
    """A made-up device at the scale of the tiny models: milliseconds per layer."""
    return DeviceType(name, float(memory), flops, bandwidth, link, kind="cpu" if cpu else "gpu", reserved=0)


def devices_of(*items) -> list[Device]:
    """``(kind, machine)`` pairs -> devices."""
    return [Device(k, m, i) for i, (k, m) in enumerate(items)]


# --- brute force: every grouping, every chaining and order, every split ------------------------


def _set_partitions_with_unused(items):
    """Every way to leave some items out and split the rest into unordered blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for blocks in _set_partitions_with_unused(rest):
        yield blocks  # first unused
        yield [[first]] + blocks
        for i in range(len(blocks)):
            yield blocks[:i] + [[first] + blocks[i]] + blocks[i + 1:]


def _compositions(total, parts):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0,) + cuts + (total,)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def brute_force(devices, model, workload, objective, params=CostParams(), dtype=FP16):
    """The best objective value over all plans, or None when nothing fits.

    Each replica's split is chosen to minimise its own step period: the plan's latency (the
    worst busy replica's period) and throughput (sessions over periods) only improve when
    any replica's period falls, so per-replica minima give the plan optimum.
    """
    best = None
    seen = set()
    for blocks in _set_partitions_with_unused(list(devices)):
        if not blocks:
            continue
        if any(len({d.machine for d in b}) > 1 or len(b) > model.n_kv_heads for b in blocks):
            continue
        groups = [Group(tuple(b)) for b in blocks]
        for perm in itertools.permutations(groups):
            for cut_mask in itertools.product((False, True), repeat=len(perm) - 1):
                pipes, current = [], [perm[0]]
                for g, cut in zip(perm[1:], cut_mask):
                    if cut:
                        pipes.append(tuple(current))
                        current = []
                    current.append(g)
                pipes.append(tuple(current))
                key = frozenset(pipes)
                if key in seen:
                    continue
                seen.add(key)
                b = -(-workload.sessions // len(pipes))
                splits = []
                for pipe in pipes:
                    chain = make_chain(model, dtype, pipe, workload, b, params)
                    options = [c for c in _compositions(model.n_layers, len(pipe)) if chain.fits(c)]
                    if not options:
                        break
                    splits.append(min(options, key=chain.period))
                else:
                    report = evaluate_plan(model, dtype, [list(zip(p, s)) for p, s in zip(pipes, splits)],
                                           workload, params)
                    assert report.fits
                    value = report.token_latency if objective == "latency" else -report.throughput
                    best = value if best is None else min(best, value)
    return best


def searched_value(devices, model, workload, objective, params=CostParams()):
    try:
        found = plan_swarm(devices, model, workload=workload, objective=objective, params=params)
    except ConfigError:
        return None
    assert found.exhaustive
    r = found.report
    return r.token_latency if objective == "latency" else -r.throughput


def assert_same(a, b):
    assert (a is None) == (b is None), (a, b)
    if a is not None:
        assert math.isclose(a, b, rel_tol=1e-9), (a, b)


# --- optimality ---------------------------------------------------------------------------------

LAYER = 2 * layer_params(tiny_model(), Shard.of(tiny_model(), 1))  # bytes of one fp16 layer
FAST = kind("fast", 3.2 * LAYER, bandwidth=8e6)
SLOW = kind("slow", 5.5 * LAYER, bandwidth=2e6)
SMALL = kind("small", 1.6 * LAYER, bandwidth=6e6, link=Link(5e8, 1e-6))
BOX = kind("box", 9 * LAYER, flops=1e8, bandwidth=1e6, cpu=True)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("sessions", [1, 3])
@pytest.mark.parametrize("case", [
    [(FAST, "a"), (FAST, "a"), (SLOW, "b")],
    [(FAST, "a"), (SLOW, "a"), (SMALL, "b"), (SMALL, "b")],
    [(SMALL, "a"), (SMALL, "a"), (SMALL, "a"), (BOX, "b")],
    [(FAST, "a"), (SLOW, "b"), (SMALL, "c"), (BOX, "d"), (FAST, "a")],
])
def test_search_matches_brute_force_on_small_swarms(case, sessions, objective):
    model = tiny_model(layers=5)
    devices = devices_of(*case)
    workload = Workload(prompt_len=16, output_len=8, sessions=sessions)
    expected = brute_force(devices, model, workload, objective)
    assert expected is not None
    assert_same(searched_value(devices, model, workload, objective), expected)


@st.composite
def small_instances(draw):
    kv = draw(st.sampled_from([1, 2, 3]))
    model = tiny_model(layers=draw(st.integers(1, 5)), kv=kv, group=draw(st.sampled_from([1, 2])),
                       head_dim=draw(st.sampled_from([4, 8])), ffn=draw(st.sampled_from([16, 40])),
                       vocab=draw(st.sampled_from([16, 96])), tie=draw(st.booleans()))
    workload = Workload(prompt_len=draw(st.integers(1, 16)), output_len=draw(st.integers(1, 8)),
                        sessions=draw(st.integers(1, 4)))
    params = CostParams(gpu_layer_overhead=draw(st.sampled_from([0.0, 3e-5])), step_overhead=1e-4,
                        network=draw(st.sampled_from([Link(1e5, 1e-3), Link(1e7, 1e-5)])))
    # memory for the embedding, head and activations of a one-device plan, plus 0.5 to 4 layers
    whole = stage_cost(model, FP16, (kind("probe", 1e12),), first=True, last=True, workload=workload,
                       sessions=workload.sessions, micro_batch=workload.sessions, params=params).memory
    kinds = [kind(f"k{i}", whole.fixed + draw(st.integers(whole.per_layer // 2, 4 * whole.per_layer)),
                  flops=draw(st.sampled_from([1e7, 1e9])),
                  bandwidth=draw(st.sampled_from([1e6, 4e6, 1.6e7])),
                  link=draw(st.sampled_from([Link(1e6, 1e-4), Link(1e9, 1e-6)])),
                  cpu=draw(st.booleans()))
             for i in range(draw(st.integers(1, 3)))]
    n = draw(st.integers(2, 4))
    devices = devices_of(*[(draw(st.sampled_from(kinds)), draw(st.sampled_from("ab"))) for _ in range(n)])
    return devices, model, workload, params, draw(st.sampled_from(["latency", "throughput"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_instances())
def test_search_is_optimal_on_random_small_swarms(instance):
    devices, model, workload, params, objective = instance
    expected = brute_force(devices, model, workload, objective, params)
    event(f"{len(devices)} devices, {'a plan fits' if expected is not None else 'nothing fits'}")
    assert_same(searched_value(devices, model, workload, objective, params), expected)


@st.composite
def chains(draw):
    model = tiny_model(layers=draw(st.integers(1, 9)))
    layer = 4 * model.hidden_size * model.hidden_size + 3 * model.hidden_size * model.intermediate_size
    n = draw(st.integers(1, 4))
    groups = [Group((Device(kind(f"k{i}", draw(st.integers(layer, 6 * layer)),
                                 bandwidth=draw(st.sampled_from([1e6, 3e6, 1e7]))), draw(st.sampled_from("ab")), i),))
              for i in range(n)]
    return model, groups, draw(st.integers(1, 6))


@settings(max_examples=60, deadline=None)
@given(chains())
def test_layer_split_is_the_best_of_all_splits(instance):
    model, groups, sessions = instance
    chain = make_chain(model, FP16, groups, Workload(prompt_len=8, output_len=4, sessions=sessions),
                       sessions, CostParams())
    options = [c for c in _compositions(model.n_layers, len(groups)) if chain.fits(c)]
    found = split_layers(chain, model.n_layers)
    if not options:
        assert found is None
    else:
        assert chain.fits(found) and sum(found) == model.n_layers and min(found) >= 1
        assert math.isclose(chain.period(found), min(map(chain.period, options)), rel_tol=1e-12)


# --- limits -------------------------------------------------------------------------------------


def test_memory_limits_are_honoured_to_the_byte():
    """Device memory set so that exactly 3 layers fit on the big device: the planner must put
    3 there, never 4, though the big device is twice as fast."""
    model = tiny_model(layers=6)
    probe = make_chain(model, FP16, [Group((Device(kind("p", 1e12), "a", 0),))] * 2,
                       Workload(prompt_len=8, output_len=4), 1, CostParams())
    first = probe.costs[0].memory
    exactly_three = first.at(3)  # bytes the first stage needs for 3 layers
    fast = kind("fast", exactly_three, bandwidth=8e6)
    devices = devices_of((fast, "a"), (kind("slow", 1e12, bandwidth=4e6), "a"))
    to_the_byte = CostParams(kv_share=0.0)  # no KV budget kept: the layers may take every byte
    found = plan_swarm(devices, model, workload=Workload(prompt_len=8, output_len=4), params=to_the_byte)
    [pipeline] = found.report.pipelines
    stage0 = pipeline.stages[0]
    assert stage0.group.devices[0].kind.name == "fast"
    assert stage0.n_layers == 3
    assert stage0.memory_used == exactly_three == stage0.memory_available

    # one byte less and only 2 layers fit
    devices = devices_of((kind("fast", exactly_three - 1, bandwidth=8e6), "a"),
                         (kind("slow", 1e12, bandwidth=4e6), "a"))
    found = plan_swarm(devices, model, workload=Workload(prompt_len=8, output_len=4), params=to_the_byte)
    assert [s.n_layers for s in found.report.pipelines[0].stages if s.group.devices[0].kind.name == "fast"] == [2]


def test_every_stage_fits_its_devices_in_a_large_plan():
    found = plan_swarm(parse_devices("8xA100-40G@a,4xRTX3090@b,4xT4@c"), LLAMA_70B,
                       workload=Workload(sessions=24), objective="throughput")
    for p in found.report.pipelines:
        for s in p.stages:
            assert s.memory_used <= s.memory_available


def test_tp_degree_never_exceeds_the_kv_heads():
    model = tiny_model(layers=4, kv=2, group=4)
    devices = devices_of(*[(kind("g", 10**9, bandwidth=1e6), "a")] * 6)
    for objective in ("latency", "throughput"):
        found = plan_swarm(devices, model, workload=Workload(prompt_len=4, output_len=4, sessions=6),
                           objective=objective)
        assert all(tp <= 2 for p in found.plans() for tp in p.hetero_config)
        for p in found.plans():
            p.check_model(model)


def test_a_model_larger_than_all_memory_is_refused_with_how_much_is_missing():
    with pytest.raises(ConfigError) as e:
        plan_swarm(parse_devices("2xA6000@m1"), LLAMA_70B)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("llama-2-70b (fp16) needs 128.5 GiB for weights but the devices have 95.0 GiB")
    assert "33.5 GiB missing" in msg


def test_weights_that_fit_only_without_room_for_the_cache_are_refused():
    with pytest.raises(ConfigError, match="no plan fits llama-2-70b .* lower --sessions"):
        plan_swarm(parse_devices("3xA6000@m1"), LLAMA_70B, workload=Workload(sessions=64, prompt_len=4096))


# --- behaviour ----------------------------------------------------------------------------------


def test_search_is_deterministic():
    devices = parse_devices("2xA100-80G@a,4xA6000@b,2xRTX3090@c,2xRTX3090@d,4xT4@e")
    runs = [plan_swarm(devices, LLAMA_70B, workload=Workload(sessions=16), objective="throughput")
            for _ in range(2)]
    assert runs[0] == runs[1]
    small = devices_of((FAST, "a"), (FAST, "a"), (SLOW, "b"), (SMALL, "b"))
    model = tiny_model(layers=5)
    workload = Workload(16, 8, 2)
    assert plan_swarm(small, model, workload=workload) == plan_swarm(small, model, workload=workload)


def test_64_devices_are_planned_in_under_10_seconds():
    spec = ("8xA100-80G@a,8xA100-40G@b,8xA6000@c,8xA6000@d,8xRTX3090@e,8xRTX4090@f,"
            "4xT4@g,4xL4@g,8xA4000@h")
    devices = parse_devices(spec)
    assert len(devices) == 64
    for objective, sessions in (("latency", 1), ("throughput", 512)):
        start = time.perf_counter()
        found = plan_swarm(devices, LLAMA_70B, workload=Workload(sessions=sessions), objective=objective)
        elapsed = time.perf_counter() - start
        print(f"\n64 devices, {objective}, {sessions} sessions: {elapsed:.2f} s -> "
              f"{[p.flags() for p in found.plans()]}")
        assert elapsed < 10
        assert not found.exhaustive


def test_hexgen_example_plan_fits_and_is_no_slower_than_the_hand_plan(capsys):
    devices = parse_devices(HEXGEN_DEVICES)
    workload = Workload(prompt_len=512, output_len=128, sessions=1)
    found = plan_swarm(devices, LLAMA_70B, workload=workload, objective="latency")
    mine = found.report
    assert mine.fits
    hand = evaluate_plan(LLAMA_70B, FP16, [[(Group(tuple(devices[:4])), 44), (Group(tuple(devices[4:6])), 20),
                                            (Group(tuple(devices[6:])), 16)]], workload)
    assert hand.fits
    assert mine.token_latency <= hand.token_latency
    with capsys.disabled():
        print(f"\nHexGen example, Llama-2-70B fp16 on {HEXGEN_DEVICES}, 1 session, 512+128 tokens:")
        for name, r in (("hand plan  ", hand), ("planner    ", mine)):
            flags = "; ".join(p.flags() for p in r.plans())
            print(f"  {name} {flags}: {r.token_latency * 1e3:.1f} ms/token, TTFT {r.ttft * 1e3:.1f} ms, "
                  f"{r.throughput:.1f} tokens/s")


def test_hexgen_example_throughput_plan_beats_the_hand_plan_at_16_sessions():
    devices = parse_devices(HEXGEN_DEVICES)
    workload = Workload(sessions=16)
    mine = plan_swarm(devices, LLAMA_70B, workload=workload, objective="throughput").report
    hand = evaluate_plan(LLAMA_70B, FP16, [[(Group(tuple(devices[:4])), 44), (Group(tuple(devices[4:6])), 20),
                                            (Group(tuple(devices[6:])), 16)]], workload)
    assert mine.fits and mine.throughput >= hand.throughput


def test_more_sessions_spread_over_replicas_when_one_cannot_hold_their_cache():
    devices = parse_devices("4xA100-80G@a,4xA100-80G@b")
    found = plan_swarm(devices, KNOWN_MODELS["llama-2-13b"], workload=Workload(sessions=256),
                       objective="throughput")
    assert len(found.plans()) >= 2


def test_plans_convert_to_hexgen_plans_covering_the_model():
    found = plan_swarm(parse_devices(HEXGEN_DEVICES), LLAMA_70B, workload=Workload(sessions=16),
                       objective="throughput")
    for p in found.plans():
        p.check_model(LLAMA_70B)


# --- a new worker joining a running swarm -------------------------------------------------------

A5000 = parse_devices("A5000")[0].kind
A100 = parse_devices("A100-80G")[0].kind


def test_first_worker_starts_at_layer_zero_and_takes_as_many_layers_as_fit():
    start, end, tp = best_stage_for_new_worker([], A5000, LLAMA_70B)
    first = stage_cost(LLAMA_70B, FP16, (A5000,), first=True, last=False, workload=Workload(),
                       sessions=1, micro_batch=1, params=CostParams())
    assert (start, end, tp) == (0, first.max_layers(), 1)


def test_next_worker_continues_where_the_last_one_ends():
    start, end, _ = best_stage_for_new_worker([ServingStage(0, 13, 1, A5000)], A5000, LLAMA_70B)
    assert start == 13 and end > 13


def test_worker_that_holds_the_whole_model_serves_all_of_it():
    assert best_stage_for_new_worker([], A100, KNOWN_MODELS["llama-2-7b"]) == (0, 32, 1)


def test_new_worker_fills_the_gap():
    model = KNOWN_MODELS["llama-2-7b"]
    current = [ServingStage(0, 12, 1, A5000), ServingStage(20, 32, 1, A5000)]
    assert best_stage_for_new_worker(current, A5000, model)[:2] == (12, 20)


def test_new_worker_strengthens_the_weakest_range():
    model = KNOWN_MODELS["llama-2-7b"]
    current = [ServingStage(0, 16, 1, A100), ServingStage(16, 32, 1, A5000)]
    start, end, tp = best_stage_for_new_worker(current, A5000, model)
    assert start >= 16 and end == 32


def test_new_worker_uses_its_devices_for_tp_up_to_the_kv_heads():
    assert best_stage_for_new_worker([], A5000, LLAMA_70B, n_devices=16)[2] == LLAMA_70B.n_kv_heads


def test_new_worker_too_small_for_one_layer_is_told_so():
    tiny = DeviceType("tiny", 1.0 * GiB, 1e12, 1e11, Link(1e9, 1e-5))
    with pytest.raises(ConfigError, match="cannot hold one layer"):
        best_stage_for_new_worker([], tiny, LLAMA_70B)


# --- the swarm's every device, and the KV budget -------------------------------------------------


def test_llama_70b_on_a6000s_a5000s_and_a4000s_uses_all_six_and_keeps_the_kv_budget():
    devices = parse_devices("2xA6000@m1,2xA5000@m2,2xA4000@m3")
    found = plan_swarm(devices, LLAMA_70B)
    assert found.unused == ()
    used = [d for p in found.report.pipelines for s in p.stages for d in s.group.devices]
    assert sorted(d.label for d in used) == sorted(d.label for d in devices)
    for p in found.report.pipelines:
        for s in p.stages:
            smallest = min(s.group.kinds, key=lambda k: k.memory)
            assert s.memory_used <= smallest.usable_memory - KV_SHARE * smallest.memory


def test_llama_3_8b_leaves_the_t4_idle_only_with_the_reason_in_figures():
    devices = parse_devices("2xRTX 3090@m1,1xT4@m2")
    for objective, sessions, unit in (("latency", 1, "ms per token"), ("throughput", 16, "tokens/s")):
        found = plan_swarm(devices, KNOWN_MODELS["llama-3-8b"], objective=objective, workload=Workload(sessions=sessions))
        if found.unused:
            assert [d.label for d in found.unused] == ["T4@m2"]
            why = found.why_unused["T4@m2"]
            assert why.startswith("the best plan with it (--hetero-config") and unit in why, why


def test_a_device_no_plan_can_use_says_so():
    # a 1 GiB GPU holds no layer of a 70B beside its KV budget, in any group or position
    devices = parse_devices("4xA100-80G@m1,custom(mem=1GB,tflops=1,bw=10GB/s)@m2")
    found = plan_swarm(devices, LLAMA_70B)
    assert [d.label for d in found.unused] == ["custom@m2"]
    assert found.why_unused["custom@m2"] == "no plan that uses it fits in memory"


@pytest.mark.parametrize("name", ["RTX 3090", "rtx3090", "3090", "RTX3090", "NVIDIA GeForce RTX 3090", "rtx-3090"])
def test_device_names_match_loosely(name):
    [d] = parse_devices(f"{name}@m1")
    assert d.kind.name == "RTX3090" and d.machine == "m1"


def test_an_ambiguous_device_name_names_the_candidates():
    with pytest.raises(ConfigError, match="'A100' is ambiguous: A100-40G or A100-80G"):
        parse_devices("2xA100@m1")
