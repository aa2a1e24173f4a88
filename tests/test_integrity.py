"""The head's result checks compare like with like: the admission probe's reference chain,
a spot check's witness and its judge compute every layer in the precision of the chain
they check (weights' dtype and KV cache's), so that an honest worker running int4 or an
int8 cache is never banned for the near ties another precision breaks the other way.
Without processes: the head's side only, its chains' answers stood in for."""

from __future__ import annotations

import dataclasses
import time


from p2pserve.bootstrap.integrity import Admission, SpotChecks, alike
from p2pserve.bootstrap.registry import Registry
from p2pserve.engine.generate import SamplingParams
from p2pserve.net.records import WorkerRecord

N = 30
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


def rec(peer: str, start: int, end: int, dtype: str = "fp32", kv_dtype: str | None = "fp32") -> WorkerRecord:
    device = {"layer_time": 1e-3, "dtype": dtype}
    if kv_dtype is not None:
        device["kv_dtype"] = kv_dtype
    return WorkerRecord(peer_id=peer, addrs=[], model="m", fingerprint="f", stage=-1, start=start, end=end, tp=1,
                        devices=[device], group_id="", version="0", load={}, expires_at=time.time() + 30, rtts={})


def registry(*records, admitted=()) -> Registry:
    r = Registry("m", "f", N)
    r.admission = True
    for x in records:
        r.update(x)
    r.admitted.update(admitted)
    return r


class Head:
    """The Bootstrap as Admission and SpotChecks use it: its registry, its tokenizer and its
    chains' answers (each peer answering with its own tokens: equal answers, equal peers)."""

    def __init__(self, reg: Registry, answers: dict[str, list[int]] | None = None):
        self.registry = reg
        self.answers = answers or {}
        self.asked: list[list[str]] = []  # the chains the head ran, by peer ids

        class Tokenizer:
            @staticmethod
            def encode_chat(messages):
                return [1, 2, 3]

        self.tokenizer = Tokenizer()

    async def _run_chain(self, chain, prompt, params, stop_on_eos, generated=()):
        peers = [h.peer_id for h in chain]
        self.asked.append(peers)
        yield next((self.answers[p] for p in peers if p in self.answers), [7] * params.max_new_tokens)


def test_a_records_precision_is_its_weights_and_its_kv_caches_dtype():
    assert rec("a", 0, N, "int4", "fp16").precision == ("int4", "fp16")
    assert rec("a", 0, N, "fp32", None).precision == ("fp32", "")  # a worker older than --kv-dtype


def test_alike_keeps_the_workers_that_compute_each_layer_as_the_chain_does():
    chain = [rec("a", 0, 10, "fp32"), rec("b", 10, N, "int4")]
    others = [rec("c", 0, 10, "fp32"), rec("d", 0, 10, "int4"), rec("e", 10, N, "int4"),
              rec("f", 10, N, "int4", "int8"), rec("g", 5, 15, "fp32"), rec("h", 0, N, "fp32")]
    assert [r.peer_id for r in alike(others, chain)] == ["c", "e"]


def test_a_spot_checks_witness_is_a_chain_alike_the_served_one_or_none():
    served = [rec("a", 0, N, "fp32")]
    int4 = rec("b", 0, N, "int4")
    reg = registry(*served, int4, admitted={"a", "b"})
    checks = SpotChecks(Head(reg), rate=1.0)
    started = []

    class Nursery:
        def start_soon(self, fn, *args):
            started.append(args[1])  # the witness chain

    checks._nursery = Nursery()
    # only an int4 chain besides the served fp32 one: it could not tell a lie from a near tie
    assert checks.witness(frozenset({"a"}), [1, 2, 3], GREEDY) is None
    assert checks.stats["no_alike_chain"] == 1 and checks.stats["no_other_chain"] == 0 and not started
    lone = SpotChecks(Head(registry(*served, admitted={"a"})), rate=1.0)  # no other chain at all
    lone._nursery = Nursery()
    assert lone.witness(frozenset({"a"}), [1, 2, 3], GREEDY) is None
    assert lone.stats["no_other_chain"] == 1 and lone.stats["no_alike_chain"] == 0 and not started
    # an fp32 chain of two workers joins: it is the witness, not the faster-looking int4 one
    reg.update(rec("c", 0, 15))
    reg.update(rec("d", 15, N))
    reg.admitted.update({"c", "d"})
    witness = checks.witness(frozenset({"a"}), [1, 2, 3], GREEDY)
    assert witness is not None and witness.peers == {"c", "d"}
    assert [r.peer_id for r in started[0]] == ["c", "d"]
    # and a judge between the two is alike them too: never the int4 chain
    assert checks._judge(frozenset({"a"}), witness.peers, witness.checked) is None
    reg.update(rec("e", 0, N))
    reg.admitted.add("e")
    assert [r.peer_id for r in checks._judge(frozenset({"a"}), witness.peers, witness.checked)] == ["e"]


async def test_a_newcomer_no_admitted_chain_is_alike_is_admitted_unprobed():
    founders = [rec("a", 0, 15), rec("b", 15, N)]
    newcomer = rec("n", 15, N, "fp32", "int8")  # the same weights, an int8 KV cache
    head = Head(registry(*founders, newcomer, admitted={"a", "b"}))
    admission = Admission(head)
    await admission._probe(newcomer, [founders[0], newcomer])
    assert "n" in head.registry.admitted and head.asked == []


async def test_a_newcomer_is_probed_against_an_alike_chain_and_banned_for_lying():
    founders = [rec("a", 0, 15), rec("b", 15, N), rec("c", 15, N, "int4")]
    liar = rec("n", 15, N)
    head = Head(registry(*founders, liar, admitted={"a", "b", "c"}), answers={"n": [9] * 8, "c": [8] * 8})
    admission = Admission(head)
    for _ in range(2):  # two prompts answered unlike the swarm: banned
        await admission._probe(liar, [founders[0], liar])
    # the reference was the fp32 chain a-b every time, never a-c (int4, which answers otherwise)
    assert all(chain in (["a", "b"], ["a", "n"]) for chain in head.asked), head.asked
    assert "n" not in head.registry.admitted and head.registry.banned("n")


def test_a_record_wider_than_the_model_is_not_alike_and_not_walked():
    chain = [rec("a", 0, N)]
    t0 = time.monotonic()
    assert alike([rec("x", 0, 10**12)], chain) == []  # a hostile range: refused at once
    assert time.monotonic() - t0 < 1.0


def test_a_head_pinned_to_dtypes_refuses_workers_of_any_other():
    """``bootstrap --worker-dtype``: a record whose weights run another dtype is refused
    where records arrive (its announce stream and the DHT alike: ``record_problem``), by name."""
    from types import SimpleNamespace

    from p2pserve.bootstrap.server import Bootstrap

    config = SimpleNamespace(name="m", n_layers=N, fingerprint=lambda: "f")
    pinned = SimpleNamespace(config=config, worker_dtypes=frozenset({"fp32", "bf16"}))
    assert Bootstrap.record_problem(pinned, rec("a", 0, N, "bf16")) is None
    code, message = Bootstrap.record_problem(pinned, rec("b", 0, N, "int4"))
    assert code == "forbidden" and "bf16, fp32" in message and "not int4" in message
    code, message = Bootstrap.record_problem(pinned, dataclasses.replace(rec("c", 0, N), devices=[]))
    assert code == "forbidden" and "unnamed" in message  # a record that names no dtype
    assert Bootstrap.record_problem(SimpleNamespace(config=config, worker_dtypes=None), rec("b", 0, N, "int4")) is None


async def test_a_refused_worker_logs_the_heads_reason_once_and_beats_on(autojump_clock, caplog):
    """The head answers a record it refuses with an error frame on the announce stream; the
    worker logs it once a reason (control characters replaced), not once a heartbeat."""
    from types import SimpleNamespace

    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pserve.net.protocols import HEARTBEAT
    from p2pserve.net.wire import error_frame, read_frame, write_frame
    from p2pserve.node import announce

    from .test_wire import Pipe

    class Duplex:
        def __init__(self):
            self.sent, self.answers = Pipe(), Pipe()

        async def write(self, data):
            await self.sent.write(data)

        async def read(self, n):
            return await self.answers.read(n)

        async def reset(self):
            await self.sent.reset()

    stream = Duplex()
    for message in ("not int4\x1b[31m", "not int4\x1b[31m", "not int8"):
        await write_frame(stream.answers, error_frame("forbidden", message))

    async def new_stream(peer, protocols):
        return stream

    caplog.set_level("WARNING", logger="p2pserve.worker")
    with trio.move_on_after(5 * HEARTBEAT):
        await announce._beat(SimpleNamespace(new_stream=new_stream), create_new_key_pair(), "head",
                             lambda: rec("w", 0, N, "int4"), announce._Refusals())
    said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert said == ["head head refused this worker's record (forbidden): not int4?[31m",
                    "head head refused this worker's record (forbidden): not int8"]
    assert (await read_frame(stream.sent))["type"] == "announce"
    assert stream.sent.frames_written >= 5  # it beats on: the head may take it once its operator changes the pin
