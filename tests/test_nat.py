"""NAT traversal between in-process hosts on 127.0.0.1 (net/nat.py): a head's dial-back
check and circuit relay, a reservation, and a dial through the relayed address by the
one dial every peer uses (net/host.py: dial). The NAT itself is emulated in
tests/test_netns.py; here nothing is hidden, the relay path is only forced."""

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from p2pserve.cli.worker import check_announce
from p2pserve.errors import ConfigError
from p2pserve.net.host import connect, dial, host_multiaddrs, quiet_libp2p_logs, running_host
from p2pserve.net.nat import check_reachable, reserve, serving_relay, traversing_nat
from p2pserve.net.wire import protocol_id, read_frame, write_frame

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
            running_host(create_new_key_pair(), LOOPBACK, swarm_key) as stage0, trio.open_nursery() as nursery:
        head_addr = host_multiaddrs(head)[0]
        head_id = await connect(worker, head_addr)
        worker.set_stream_handler(ECHO, echo)
        stop = CircuitV2Protocol(worker, allow_hop=False)
        async with background_trio_service(stop):
            transport = CircuitV2Transport(worker, stop, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT))
            relayed = await reserve(worker, head_id, head_addr, transport, nursery)
            assert relayed == f"{head_addr}/p2p-circuit/p2p/{worker.get_id().to_base58()}"
            peer = await dial(stage0, worker.get_id().to_base58(), [relayed])
            assert peer == worker.get_id()
            conn = stage0.get_network().connections[peer][0]
            assert any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
            stream = await stage0.new_stream(peer, [ECHO])
            await write_frame(stream, {"hidden": b"x" * 200_000})
            assert (await read_frame(stream, timeout=10))["hidden"] == b"x" * 200_000
            await stream.close()
        nursery.cancel_scope.cancel()


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
