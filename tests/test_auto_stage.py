"""`--stage auto`: workers announce their measured devices and the bootstrap tells each
joining worker where it is most useful; without plan flags it publishes what the planner
proposes for the devices announced so far."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

from p2pserve.bootstrap.planning import PENDING_TTL, Planning
from p2pserve.bootstrap.registry import Registry
from p2pserve.errors import ConfigError
from p2pserve.plan import Plan
from p2pserve.planner import measure
from p2pserve.planner.devices import GiB
from p2pserve.planner.measure import DeviceSpeed
from p2pserve.planner.swarm import auto_request, device_entries
from p2pserve.net.records import WorkerRecord
from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.weights import default_model_path, open_weights

from p2pserve.testing.reference import cached_hf_model, hf_greedy
from p2pserve.testing.swarm import Swarm, client

CONFIG = open_weights(None).config
# Small enough that no worker holds the whole model: 0.25 GiB usable beside the 1 GiB a CPU keeps
SMALL_CPU = DeviceSpeed(name="cpu (test)", flops=5e10, bandwidth=1e10, memory=1.25 * GiB, dtype="float32",
                        torch_version=torch.__version__, threads=1, layer_overhead=150e-6)
KV = ("--max-sessions", "4", "--max-seq-len", "512")
N = 16


def small_cpu_request(**kw) -> dict:
    return auto_request(SMALL_CPU, **{"n_devices": 1, "dtype": "fp32", "kv_dtype": "fp32", "max_sessions": 4,
                                      "max_seq_len": 512, **kw})


def record(peer: str, start: int, end: int, speed: DeviceSpeed = SMALL_CPU) -> WorkerRecord:
    devices = device_entries([speed], CONFIG, "fp32", "fp32", first=start == 0, last=end == CONFIG.n_layers)
    return WorkerRecord(peer, [], CONFIG.name, CONFIG.fingerprint(), -1, start, end, 1, devices, "", "0",
                        {"sessions": 0, "queue": 0}, time.time() + 30)


def planning(explicit: Plan | None = None) -> Planning:
    registry = Registry(CONFIG.name, CONFIG.fingerprint(), CONFIG.n_layers)
    return Planning(CONFIG, registry, explicit=explicit, fallback=Plan([1, 1], [15, 15]))


# --- the bootstrap's planning, without processes ------------------------------------------------


def test_workers_asking_at_once_split_the_model_instead_of_all_taking_the_same_layers():
    p = planning()
    got = [p.assign(f"w{i}", small_cpu_request()) for i in range(3)]
    ranges = [(a["start"], a["end"]) for a in got]
    assert ranges[0][0] == 0 and len(set(ranges)) == 3
    assert sorted(ranges)[-1][1] == CONFIG.n_layers  # the third one closes the gap at the end
    covered = {layer for a, b in ranges for layer in range(a, b)}
    assert covered == set(range(CONFIG.n_layers))


def test_an_assignment_counts_until_its_worker_announces_or_it_expires():
    p = planning()
    first = p.assign("w1", small_cpu_request())
    # the worker announces what it was told: its record now counts, not the pending entry
    p.registry.update(record("w1", first["start"], first["end"]))
    second = p.assign("w2", small_cpu_request())
    assert (second["start"], second["end"]) != (first["start"], first["end"])
    assert "w1" not in p.pending
    # w2 dies while loading: after PENDING_TTL its layers are missing again and go to w3
    later = time.monotonic() + PENDING_TTL + 1
    third = p.assign("w3", small_cpu_request(), now=later)
    assert (third["start"], third["end"]) == (second["start"], second["end"])


def test_a_fixed_plan_gives_auto_workers_its_stages_missing_ones_first():
    p = planning(explicit=Plan([1, 1, 1], [8, 15, 7]))
    p.registry.update(record("w1", 0, 8))
    got = [p.assign(f"w{i}", small_cpu_request()) for i in (2, 3)]
    assert sorted((a["start"], a["end"]) for a in got) == [(8, 23), (23, 30)]
    assert p.plans() == [Plan([1, 1, 1], [8, 15, 7])]


def test_a_worker_with_a_smaller_kv_cache_is_given_the_layers_its_memory_holds():
    # 16 sessions of 2048 tokens: the KV cache, not the weights, fills the small device
    tight = dict(max_sessions=16, max_seq_len=2048)
    layers = {kv: planning().assign("w1", small_cpu_request(kv_dtype=kv, **tight))["end"]
              for kv in ("fp32", "fp16", "int8")}
    assert layers["fp32"] < layers["fp16"] < layers["int8"], layers
    # a worker older than --kv-dtype names no cache dtype: its dtype's own, as before
    older = small_cpu_request(**tight)
    del older["kv_dtype"]
    assert planning().assign("w1", older)["end"] == layers["fp32"]


def test_the_published_plan_is_planned_from_the_announced_devices():
    p = planning()
    assert p.plans() == [Plan([1, 1], [15, 15])]  # nobody joined yet: the even split
    big = dataclasses.replace(SMALL_CPU, memory=16 * GiB)
    p.registry.update(record("w1", 0, 30, big))
    assert p.plans() == [Plan([1], [30])]  # one device that holds it all: no hop is faster
    p.registry.entries.clear()
    for i, (a, b) in enumerate([(0, 8), (8, 23), (23, 30)]):
        p.registry.update(record(f"w{i}", a, b))
    [plan] = p.plans()
    plan.check_model(CONFIG)
    assert plan.n_stages == 3  # three small devices: every one is needed


@pytest.mark.parametrize("bad, message", [
    ({}, "'speed' must be a measured device"),
    ({"memory": -1}, "'memory' must be a positive number"),
    ({"n_devices": 0}, "'n_devices' must be an integer in"),
    ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"kv_dtype": "fp4"}, "unknown KV cache dtype 'fp4'"),
    ({"kv_dtype": ["int8"]}, "'kv_dtype' must be a string"),
])
def test_a_malformed_auto_request_is_refused_by_name(bad, message):
    request = {**small_cpu_request(), **bad}
    if bad == {}:
        request.pop("speed")
    with pytest.raises(ConfigError, match=message):
        planning().assign("w1", request)
    reply = planning().answer({"type": "plan"}, "w1", request)
    assert reply["type"] == "error" and reply["code"] == "bad_request"


def test_a_device_too_small_for_one_layer_is_told_so():
    tiny = dataclasses.replace(SMALL_CPU, memory=1.01 * GiB)
    with pytest.raises(ConfigError, match="cannot hold one layer"):
        planning().assign("w1", auto_request(tiny, n_devices=1, dtype="fp32", kv_dtype="fp32", max_sessions=4,
                                             max_seq_len=512))


# --- a real swarm --------------------------------------------------------------------------------


def seed_device_cache(directory) -> None:
    """Every worker of this test 'measures' SMALL_CPU: the cache answers before any timing."""
    name, _ = measure.describe_device(torch.device("cpu"))
    for threads in range(1, (os.cpu_count() or 1) + 1):  # whatever torch picks in the workers
        measure.remember(dataclasses.replace(SMALL_CPU, name=name, threads=threads))
    assert (directory / "devices.json").is_file()


def start_workers_together(swarm: Swarm, n: int, *args: str, timeout: float = 60) -> list[tuple[int, int]]:
    """Start ``n`` workers at once, so that they ask the bootstrap at the same moment; wait
    (bounded) until each serves; the layer ranges they print."""
    procs = [swarm._spawn(["worker", "--peer", swarm.addr, "--group-id", f"auto{i}",
                           "--listen", "/ip4/127.0.0.1/tcp/0", *args], f"auto{i}") for i in range(n)]
    found = [swarm._wait_for(proc, log, r"serving layers (\d+)-(\d+)", timeout=timeout) for proc, log in procs]
    return [(int(m.group(1)), int(m.group(2))) for m in found]


async def test_three_auto_workers_joining_at_once_cover_the_model_and_answer_like_transformers(
        tmp_path, monkeypatch):
    from p2pserve.node.run import fetch_plan

    monkeypatch.setenv("P2PSERVE_CACHE_DIR", str(tmp_path / "cache"))
    seed_device_cache(tmp_path / "cache")
    ids = open_weights(None).tokenizer().encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap()  # no plan flags
        ranges = start_workers_together(swarm, 3, "--stage", "auto", *KV)
        assert len(set(ranges)) == 3, ranges  # nobody took the same layers as another
        assert {layer for a, b in ranges for layer in range(a, b)} == set(range(CONFIG.n_layers))
        async with client(swarm.addr) as c:
            st = await c.wait_chains(1, timeout=30)
            for w in st["workers"]:
                [entry] = w["devices"]
                assert entry["speed"]["memory"] == SMALL_CPU.memory and entry["layer_time"] > 0
            info = await fetch_plan(c.host, c.bootstrap_id)
            [plan] = [Plan.from_dict(p) for p in info["plans"]]
            plan.check_model(CONFIG)
            assert plan.n_stages == 3  # planned for three devices none of which holds the model
            answer = await c.ask(tokens=ids, params=SamplingParams(max_new_tokens=N), stop_on_eos=False)
    assert "Paris" in answer.text
    reference, _ = hf_greedy(cached_hf_model(str(default_model_path())), ids, N)
    assert answer.tokens == reference
