"""1,200 malformed, truncated, oversized and wrong-typed frames over every protocol of a
running bootstrap and two workers; afterwards every process is alive and a real query is
answered exactly as transformers answers it."""

from __future__ import annotations

import random
import time

import msgpack
import trio
from libp2p.peer.id import ID

from p2pserve.engine.generate import SamplingParams
from p2pserve.net.host import connect
from p2pserve.net.protocols import ANNOUNCE, LINK, PLAN, QUERY, SESSION, STATUS
from p2pserve.net.wire import read_frame

from p2pserve.testing.reference import chat_references
from p2pserve.testing.swarm import client

FRAMES_PER_PROTOCOL = 200
PROMPT = "Name three colours."
N = 12


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def _junk(rng: random.Random):
    """A msgpack value of a type a field should not have."""
    return rng.choice([None, True, -1, 2**63, 2**64 - 1, 1.5, float("nan"), float("inf"), "x" * rng.randint(0, 300),
                       b"\x00" * rng.randint(0, 50), [], [1, "a", None], {}, {"a": [1, {"b": 2}]}, [[[[[]]]]]])


def _plausible(kind: str, rng: random.Random) -> dict:
    """A frame that looks like the protocol's own, with some fields replaced by junk."""
    base = {
        "query": {"type": "query", "prompt": "hi", "params": {"max_new_tokens": 4}, "model": None},
        "announce": {"type": "announce", "record": b"\x81\xa1a\x01"},
        "plan": {"type": "plan", "auto": {"speed": {}, "memory": 1, "n_devices": 1}},
        "status": {"type": "status"},
        "open": {"type": "open", "session": "s", "chain": [{"peer_id": "p", "addrs": [], "start": 0, "end": 1}],
                 "index": 0, "params": {}, "prompt": [1, 2], "ticket": b"t"},
        "steps": {"type": "steps", "id": 1, "items": [{"session": "s", "start": 0}],
                  "tensors": {"x": {"dtype": "float32", "shape": [1, 576], "data": b"\x00" * 4 * 576}}},
    }[kind]
    msg = dict(base)
    for key in rng.sample(sorted(msg), rng.randint(1, len(msg))):
        msg[key] = _junk(rng)
    if rng.random() < 0.3:
        msg[rng.choice(["tensors", "x", "generated", "stop_on_eos"])] = _junk(rng)
    return msg


def _attack(kind: str, rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.2:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))  # noise
    if roll < 0.3:
        return rng.randint(2**24, 2**32 - 1).to_bytes(4, "big") + b"x" * 10  # oversized prefix
    if roll < 0.45:
        data = _frame(msgpack.packb(_plausible(kind, rng), use_bin_type=True))
        return data[: rng.randint(1, len(data) - 1)]  # truncated
    if roll < 0.55:
        return _frame(msgpack.packb(_junk(rng), use_bin_type=True))  # not a map
    return _frame(msgpack.packb(_plausible(kind, rng), use_bin_type=True))  # wrong types inside


async def test_a_thousand_bad_frames_kill_nothing_and_the_answer_stays_exact(swarm2):
    ids, reference = chat_references([PROMPT], N)[PROMPT]
    rng = random.Random(16)
    sent, refused = 0, 0
    async with client(swarm2.addr) as c:
        st = await c.wait_chains(1)
        workers = {w["start"]: w for w in st["workers"]}
        for w in workers.values():
            addr = w["addrs"][0]
            await connect(c.host, addr if "/p2p/" in addr else f"{addr}/p2p/{w['peer_id']}")
        targets = [(c.bootstrap_id, QUERY, "query"), (c.bootstrap_id, ANNOUNCE, "announce"),
                   (c.bootstrap_id, PLAN, "plan"), (c.bootstrap_id, STATUS, "status")]
        for w in workers.values():
            peer = ID.from_base58(w["peer_id"])
            targets += [(peer, SESSION, "open"), (peer, LINK, "steps")]
        limit = trio.CapacityLimiter(16)

        async def one(peer, protocol, kind):
            nonlocal sent, refused
            async with limit:
                try:
                    s = await c.host.new_stream(peer, [protocol])
                    await s.write(_attack(kind, rng))
                    sent += 1
                    await s.close()  # the far side sees the end at once, instead of waiting out a timeout
                    with trio.move_on_after(10):
                        await read_frame(s, timeout=10)
                except Exception:
                    refused += 1  # an error frame, a reset: what a bad frame should get

        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            for peer, protocol, kind in targets:
                for _ in range(FRAMES_PER_PROTOCOL):
                    nursery.start_soon(one, peer, protocol, kind)
        elapsed = time.monotonic() - t0
        assert sent >= 1000, (sent, refused)
        for proc, log in swarm2.procs:
            assert proc.poll() is None, f"{log.name} died:\n{log.read_text()[-3000:]}"
            # every bad frame met a check: none reached a handler's last-resort guard
            assert "handler failed" not in log.read_text(), log.read_text()[-3000:]
        st = await c.status()
        assert len(st["workers"]) == 2 and len(st["chains"]) == 1
        answer = await c.ask(tokens=ids, params=SamplingParams(max_new_tokens=N), stop_on_eos=False)
        assert answer.tokens == reference
        print(f"{sent} frames over {len(targets)} protocols in {elapsed:.1f} s, {refused} refused; "
              f"0 processes died; the answer after them is exact")
