"""NAT traversal between in-process hosts on 127.0.0.1 (net/nat.py): a head's dial-back
check and circuit relay, a reservation, and a dial through the relayed address by the
one dial every peer uses (net/host.py: dial). The NAT itself is emulated in
tests/test_netns.py; here nothing is hidden, the relay path is only forced."""

import time

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.tools.anyio_service import background_trio_service

from p2pserve.cli.worker import check_announce
from p2pserve.errors import ConfigError
from p2pserve.net.host import connect, dial, host_multiaddrs, quiet_libp2p_logs, running_host
from p2pserve.net.nat import check_reachable, reserve_slot, serving_relay, traversing_nat
from p2pserve.net.wire import protocol_id, read_frame, write_frame
from p2pserve.ranks.world import free_port

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
ECHO = protocol_id("test-echo")
SWARM_KEY = "ab" * 32

quiet_libp2p_logs()


async def echo(stream):
    await write_frame(stream, await read_frame(stream, timeout=5))
    await stream.close()


async def test_head_dials_a_reachable_worker_back_and_not_an_unreachable_address():
    with trio.fail_after(30):
        async with running_host(create_new_key_pair(), LOOPBACK) as head, serving_relay(head), \
                running_host(create_new_key_pair(), LOOPBACK) as worker:
            head_id = await connect(worker, host_multiaddrs(head)[0])
            own = host_multiaddrs(worker)[0]
            assert await check_reachable(worker, head_id, [own]) == own
            assert await check_reachable(worker, head_id, ["/ip4/127.0.0.1/tcp/1"]) is None


async def test_a_reachable_worker_announces_its_own_address_first_after_its_announced_ones(capsys):
    with trio.fail_after(30):
        async with running_host(create_new_key_pair(), LOOPBACK) as head, serving_relay(head), \
                running_host(create_new_key_pair(), LOOPBACK) as worker:
            head_addr = host_multiaddrs(head)[0]
            head_id = await connect(worker, head_addr)
            forwarded = "/ip4/127.0.0.1/tcp/1"  # announced as given, even if the check cannot reach it
            async with traversing_nat(worker, head_id, head_addr, host_multiaddrs(worker), [forwarded]) as reach:
                assert reach.addrs == [forwarded, *host_multiaddrs(worker)] and reach.relay is None
            assert f"reachable directly at {host_multiaddrs(worker)[0]}" in capsys.readouterr().err


async def _relayed_echo(swarm_key=None):
    """A worker reserves a slot on the head; a third peer dials its relayed address."""
    async with running_host(create_new_key_pair(), LOOPBACK, swarm_key) as head, serving_relay(head, swarm_key), \
            running_host(create_new_key_pair(), LOOPBACK, swarm_key) as worker, \
            running_host(create_new_key_pair(), LOOPBACK, swarm_key) as stage0:
        head_addr = host_multiaddrs(head)[0]
        head_id = await connect(worker, head_addr)
        worker.set_stream_handler(ECHO, echo)
        async with background_trio_service(CircuitV2Protocol(worker, allow_hop=False)):  # accepts relayed conns
            assert await reserve_slot(worker, head_id) > time.time() + 60
            relayed = f"{head_addr}/p2p-circuit/p2p/{worker.get_id().to_base58()}"
            peer = await dial(stage0, worker.get_id().to_base58(), [relayed])
            assert peer == worker.get_id()
            conn = stage0.get_network().connections[peer][0]
            assert any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
            stream = await stage0.new_stream(peer, [ECHO])
            await write_frame(stream, {"hidden": b"x" * 200_000})
            assert (await read_frame(stream, timeout=10))["hidden"] == b"x" * 200_000
            await stream.close()


async def test_a_peer_dials_a_worker_through_its_relay_slot_on_the_head():
    with trio.fail_after(60):
        await _relayed_echo()


async def test_relayed_connections_work_in_a_private_swarm():
    # py-libp2p's relay dial forgets the swarm key's protector; net/nat.py adds it
    with trio.fail_after(60):
        await _relayed_echo(SWARM_KEY)


def test_announce_takes_dialable_multiaddrs_without_a_peer_id():
    assert check_announce(("/ip4/203.0.113.7/tcp/4001",)) == ("/ip4/203.0.113.7/tcp/4001",)
    with pytest.raises(ConfigError, match="--announce 'example.org:4001': expected a multiaddr"):
        check_announce(("example.org:4001",))
    with pytest.raises(ConfigError, match="without /p2p/<peer-id>"):
        check_announce(("/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWGzh8hXbGGM7dRtpmMhJ3KnnfnVzy8YwPMBo6W9Ehk9Rv",))


async def _until(condition, what: str, timeout: float = 20.0) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"no {what} within {timeout:g} s")


async def test_a_worker_behind_nat_serves_through_another_head_when_its_head_dies(capsys):
    """Two heads; a worker the dial-back check cannot reach (it claims to listen where nobody
    does) reserves a slot on both and announces both relayed addresses. The head it joined
    through is killed: its relayed address leaves the announced ones, and a stage dialling
    the worker's addresses reaches it through the other head. The head comes back at the
    same address: the worker reserves there again and is reached through it."""
    key_a, port_a = create_new_key_pair(), free_port()
    head_a = trio.CancelScope()

    async def run_head(key, listen, scope=None, *, task_status):
        with scope or trio.CancelScope():
            async with running_host(key, [listen]) as head, serving_relay(head):
                task_status.started(host_multiaddrs(head)[0])
                await trio.sleep_forever()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, \
                running_host(create_new_key_pair(), LOOPBACK) as worker, \
                running_host(create_new_key_pair(), LOOPBACK) as stage0:
            addr_a = await nursery.start(run_head, key_a, f"/ip4/127.0.0.1/tcp/{port_a}", head_a)
            addr_b = await nursery.start(run_head, create_new_key_pair(), LOOPBACK[0])
            worker.set_stream_handler(ECHO, echo)
            wid = worker.get_id().to_base58()
            via_a, via_b = f"{addr_a}/p2p-circuit/p2p/{wid}", f"{addr_b}/p2p-circuit/p2p/{wid}"
            head_id = await connect(worker, addr_a)
            async with traversing_nat(worker, head_id, addr_a, ["/ip4/127.0.0.1/tcp/1"],
                                      other_heads=[addr_b]) as reach:
                await _until(lambda: len(reach.addrs) == 2, "both reservations")
                assert reach.addrs == [via_a, via_b] and reach.direct is None

                changed = trio.Event()

                async def note_change():
                    await reach.changed()  # what wakes the worker's DHT put (node/announce.py)
                    changed.set()

                nursery.start_soon(note_change)
                head_a.cancel()  # the head the worker joined through dies
                await _until(lambda: reach.addrs == [via_b], "the lost reservation noticed")
                await _until(changed.is_set, "Reachability.changed()", timeout=1)
                peer = await dial(stage0, wid, [via_a, via_b])  # the record's addresses, dead head first
                stream = await stage0.new_stream(peer, [ECHO])
                await write_frame(stream, {"through": "b"})
                assert await read_frame(stream, timeout=10) == {"through": "b"}
                await stream.close()

                await nursery.start(run_head, key_a, f"/ip4/127.0.0.1/tcp/{port_a}")  # back, same address
                await _until(lambda: reach.addrs == [via_a, via_b], "a reservation on the head that came back")
                async with running_host(create_new_key_pair(), LOOPBACK) as stage0b:
                    peer = await dial(stage0b, wid, [via_a])
                    stream = await stage0b.new_stream(peer, [ECHO])
                    await write_frame(stream, {"through": "a"})
                    assert await read_frame(stream, timeout=10) == {"through": "a"}
                    await stream.close()
            nursery.cancel_scope.cancel()
    err = capsys.readouterr().err
    assert f"behind NAT: serving through relay {via_b}" in err
    assert f"no longer serving through {via_a}; reserving again" in err
    assert err.count(f"behind NAT: serving through relay {via_a}") == 2


async def test_a_worker_behind_nat_takes_a_second_slot_on_a_head_that_joined_later(monkeypatch):
    """The worker knew one head; a slot with nothing to do asks the head held for the heads it
    names (node/run.py asks with a plan request) and reserves on the newcomer."""
    from p2pserve.net import nat

    monkeypatch.setattr(nat, "LEARN_INTERVAL", 0.2)
    named: list[str] = []
    asked = []

    async def learn(head):
        asked.append(head)
        return list(named)

    async def run_head(*, task_status):
        async with running_host(create_new_key_pair(), LOOPBACK) as head, serving_relay(head):
            task_status.started(host_multiaddrs(head)[0])
            await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, running_host(create_new_key_pair(), LOOPBACK) as worker:
            addr_a = await nursery.start(run_head)
            head_id = await connect(worker, addr_a)
            wid = worker.get_id().to_base58()
            async with traversing_nat(worker, head_id, addr_a, ["/ip4/127.0.0.1/tcp/1"], learn_heads=learn) as reach:
                assert reach.addrs == [f"{addr_a}/p2p-circuit/p2p/{wid}"]
                addr_b = await nursery.start(run_head)  # a head joins the swarm; head A names it from now on
                named.append(addr_b)
                await _until(lambda: len(reach.addrs) == 2, "slot on the new head")
                assert reach.addrs[1] == f"{addr_b}/p2p-circuit/p2p/{wid}" and set(asked) == {head_id}
            nursery.cancel_scope.cancel()


async def test_a_worker_puts_its_record_in_the_dht_at_once_when_its_addresses_change():
    """node/announce.py: heads that know a NAT'd worker only from the DHT learn of a lost
    relay slot at once, not an epoch later."""
    from p2pserve.net.records import EPOCH, WorkerRecord
    from p2pserve.node.announce import _refresh_dht

    key = create_new_key_pair()
    record = WorkerRecord(peer_id=ID.from_pubkey(key.public_key).to_base58(), addrs=["/ip4/127.0.0.1/tcp/1"],
                          model="m", fingerprint="f" * 16, stage=0, start=0, end=1, tp=1, devices=[{"name": "cpu"}],
                          group_id="", version="0", load={}, expires_at=time.time() + 30)
    puts = []

    class FakeDHT:
        async def put_value(self, key, value):
            puts.append(trio.current_time())

        async def provide(self, key):
            pass

    changes = trio.Event()

    async def addrs_changed():
        await changes.wait()

    with trio.fail_after(EPOCH / 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_refresh_dht, FakeDHT(), key, lambda: record, addrs_changed)
            await _until(lambda: len(puts) == 1, "first put")
            changes.set()
            await _until(lambda: len(puts) >= 2, "put after the change", timeout=2)
            nursery.cancel_scope.cancel()


def test_a_head_names_the_heads_that_joined_through_it_to_its_workers():
    """The plan reply's other_heads: where a worker behind a NAT reserves its second slot."""
    from types import SimpleNamespace

    from p2pserve.bootstrap.server import MAX_OTHER_HEADS, Bootstrap
    from p2pserve.engine.weights import open_weights
    from p2pserve.node.run import other_heads

    key = create_new_key_pair()
    host = SimpleNamespace(get_private_key=lambda: key.private_key, get_public_key=lambda: key.public_key,
                           get_id=lambda: ID.from_pubkey(key.public_key))
    source = open_weights(None)
    node = Bootstrap(host, source.config, source.tokenizer(), [])
    peer = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
    node.note_head(peer, ["/ip4/1.2.3.4/tcp/5/p2p/" + "x" * 46, f"/ip4/10.0.0.2/tcp/4001/p2p/{peer}"])
    node.note_head("someone", "not a list")
    assert other_heads(node.plan_info()) == [f"/ip4/10.0.0.2/tcp/4001/p2p/{peer}"]
    for i in range(MAX_OTHER_HEADS + 2):
        node.note_head(f"h{i}", [f"/ip4/10.0.0.{i}/tcp/1/p2p/h{i}"])
    assert len(node.other_heads) == MAX_OTHER_HEADS and peer not in node.other_heads
    assert other_heads({"other_heads": [1, "x" * 600, "/ip4/1.2.3.4/tcp/1/p2p/a"]}) == ["/ip4/1.2.3.4/tcp/1/p2p/a"]
    assert other_heads({"other_heads": "nope"}) == [] and other_heads({}) == []
