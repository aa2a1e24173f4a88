"""Access control: a private swarm (pre-shared swarm key), an allow-list of workers, and one
identity per worker process on a shared machine."""

from __future__ import annotations

import socket
import struct
import time

import pytest
import trio

from p2pserve.errors import NetworkError
from p2pserve.net.host import connect, load_or_create_identity, peer_id_of, read_swarm_key, running_host
from p2pserve.net.protocols import ANNOUNCE
from p2pserve.net.records import WorkerRecord, sign_record
from p2pserve.net.wire import RemoteError, read_frame, write_frame

from p2pserve.testing.swarm import Swarm, client


async def test_a_private_swarm_admits_only_key_holders_and_listed_workers(tmp_path):
    with Swarm(tmp_path) as swarm:
        key = tmp_path / "swarm.key"
        assert swarm.cli("keygen", str(key)).returncode == 0
        # the two identities the workers will take, listed; anyone else is refused
        ids = [peer_id_of(load_or_create_identity(swarm.home / name)) for name in ("worker.key", "worker-2.key")]
        allowed = tmp_path / "workers.txt"
        allowed.write_text("# our two machines\n" + "\n".join(ids) + "\n")
        swarm.start_bootstrap("--pp-partition", "15", "15", "--swarm-key", str(key), "--allow-peers", str(allowed))
        # two workers started side by side without --group-id are two peers, both serving
        a = swarm.start_worker("--stage", "0", "--swarm-key", str(key), group_id=False)
        b = swarm.start_worker("--stage", "1", "--swarm-key", str(key), group_id=False)
        assert sorted([swarm.wait_serving(a), swarm.wait_serving(b)]) == sorted(ids)

        q = swarm.cli("query", "--peer", swarm.addr, "--swarm-key", str(key), "--max-new-tokens", "8",
                      "What is the capital of France?")
        assert q.returncode == 0 and "Paris" in q.stdout, q.stderr
        outsider = swarm.cli("query", "--peer", swarm.addr, "--max-new-tokens", "8", "Hi", timeout=60)
        assert outsider.returncode == 2 and "cannot reach" in outsider.stderr

        no_key = swarm.start_worker("--stage", "1", "--join-timeout", "1", wait=False)
        assert no_key.wait(timeout=60) == 2 and "--swarm-key does not match" in swarm.log(no_key)

        async with client(swarm.addr, read_swarm_key(key)) as c:  # holds the key, not on the list
            st = await c.wait_chains(1)
            record = WorkerRecord(**{**st["workers"][0], "peer_id": c.host.get_id().to_base58(),
                                     "expires_at": time.time() + 20})
            s = await c.host.new_stream(c.bootstrap_id, [ANNOUNCE])
            await write_frame(s, {"type": "announce", "record": sign_record(record, c.key_pair)})
            with pytest.raises(RemoteError, match="not admitted") as e:
                await read_frame(s)
            assert e.value.code == "forbidden"


def test_a_pinned_identity_in_use_is_one_clear_line(tmp_path):
    with Swarm(tmp_path) as swarm:
        swarm.start_bootstrap("--pp-partition", "15", "15")
        swarm.start_worker("--stage", "0", "--identity", str(tmp_path / "w.key"))
        second = swarm.start_worker("--stage", "1", "--identity", str(tmp_path / "w.key"), wait=False)
        assert second.wait(timeout=60) == 2
        assert "is in use by another running p2pserve process" in swarm.log(second)


def test_a_swarm_key_file_is_checked(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("/key/swarm/psk/1.0.0/\n/base16/\nabc\n")
    with pytest.raises(Exception, match="not a swarm key"):
        read_swarm_key(bad)


@pytest.mark.parametrize("ending", ["reset", "close"])
async def test_a_peer_that_drops_the_handshake_is_reported_with_the_swarm_key(tmp_path, ending):
    # A pnet peer whose key differs either waits (the timeout's message names the key) or
    # drops the connection once it has read garbage, by a reset or a close: which one is a
    # race, so each must say it.
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def drop_each_connection():
        while True:
            conn, _ = await listener.accept()
            if ending == "reset":
                await conn.recv(1)  # what is left unread, linger 0: an RST
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                await conn.recv(65536)
                conn.shutdown(socket.SHUT_WR)  # a FIN after reading what came
                await trio.sleep(0.5)
            conn.close()

    some_peer = peer_id_of(load_or_create_identity(tmp_path / "other.key"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drop_each_connection)
        async with running_host(load_or_create_identity(tmp_path / "me.key"), ["/ip4/127.0.0.1/tcp/0"]) as host:
            with pytest.raises(NetworkError, match="--swarm-key does not match") as e:
                await connect(host, f"/ip4/127.0.0.1/tcp/{port}/p2p/{some_peer}", timeout=10)
            assert "during the handshake" in str(e.value)
        nursery.cancel_scope.cancel()
    listener.close()
