"""The libp2p host every p2pserve peer runs: identity, transport, connections, DHT.

One choice for everyone: TCP, Noise, Yamux (mplex is slow and deadlocks under
concurrent streams), Ed25519 identities kept in a file so a peer's multiaddr survives
restarts. How to speak a p2pserve protocol on it:

    host.set_stream_handler(protocol_id("step"), handler)   # accept: handler(stream)
    stream = await host.new_stream(peer_id, [protocol_id("step")])   # open (~5 ms)

A private swarm adds a pre-shared key (``--swarm-key``, IPFS's ``swarm.key`` format): every
connection is then encrypted with it under Noise, and a peer without it fails at the
handshake. Handlers go through ``serve_protocol``, which contains whatever they raise.

`connect` once per peer (about 7 ms on loopback with the config below) and keep
connections and streams open across steps. Listening on port 0 works; the real port
is in `host_multiaddrs(host)` once `running_host` has yielded.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import socket
import tempfile
import warnings
from collections import Counter
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import libp2p
import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import create_new_key_pair as create_ed25519_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_noise_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.exceptions import RawConnError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.exceptions import UpgradeFailure

from p2pserve.errors import ConfigError, NetworkError
from p2pserve.net.records import NAMESPACE, RecordValidator, address_problem
from p2pserve.net.wire import reset_stream

log = logging.getLogger("p2pserve.host")
NOISY_LOGGERS = ("libp2p", "multiaddr", "quic", "zeroconf", "trio-websocket")
_SEED_BYTES = 32
_CLOSE_GRACE = 5.0  # seconds to close connections and listeners on the way out
PEER_ADDRESS_FORM = "/ip4/<ip>/tcp/<port>/p2p/<peer-id>"
WRITE_STALL_LIMIT = 30.0  # seconds one write may wait on the socket before its connection is given up


def quiet_libp2p_logs(verbose: bool = False) -> None:
    """Silence py-libp2p unless `verbose`. It logs routine, handled events at ERROR
    level (a refused dial: four "Failed to open TCP stream"; a DHT query to a
    client-mode peer: a seven-line "Failed to open stream"), so quiet means CRITICAL;
    p2pserve reports the failures that matter itself.

    Two of its messages bypass its own loggers: it calls ``logging.warning`` on the root
    logger in places ("Error resetting stream"), and a stream reset during cancellation
    leaves a lock's ``__aexit__`` unawaited (a RuntimeWarning). Both show up when a
    user's Ctrl-C tears a stream down, so quiet drops them too."""
    for name in NOISY_LOGGERS:
        # multiaddr's DEBUG output is thousands of lines a second: INFO is enough for it
        level = (logging.INFO if name == "multiaddr" else logging.DEBUG) if verbose else logging.CRITICAL
        logging.getLogger(name).setLevel(level)
    root = logging.getLogger()
    root.removeFilter(_LIBP2P_ON_ROOT)  # once, whatever the calls before
    if not verbose:
        root.addFilter(_LIBP2P_ON_ROOT)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning,
                                module=r"libp2p(\.|$)")


class _Libp2pOnRoot(logging.Filter):
    """Drops what py-libp2p's own files log on the root logger. A filter on a logger sees
    only the records logged on it directly, so p2pserve's loggers are never touched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(_LIBP2P_DIR)


_LIBP2P_DIR = os.path.dirname(libp2p.__file__) + os.sep
_LIBP2P_ON_ROOT = _Libp2pOnRoot()


# --- identity ---------------------------------------------------------------------------


def load_or_create_identity(path: Path) -> KeyPair:
    """The Ed25519 key pair stored in `path` (its 32-byte private seed, mode 0600),
    created on first use. The same file gives the same peer id on every start."""
    path = Path(path)
    try:
        if not path.exists():
            _create_identity_file(path)
        seed = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot use identity file {path}: {(e.strerror or str(e)).lower()}") from None
    if len(seed) != _SEED_BYTES:
        raise ConfigError(
            f"identity file {path} holds {len(seed)} bytes, expected a {_SEED_BYTES}-byte "
            "Ed25519 private key; move it away to start with a new identity"
        )
    private_key = Ed25519PrivateKey.from_bytes(seed)
    return KeyPair(private_key, private_key.get_public_key())


def _create_identity_file(path: Path) -> None:
    # Written to a temporary file and linked into place, so two processes starting at
    # once agree on one identity and nobody ever reads half a key.
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = create_ed25519_key_pair().private_key.to_bytes()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, seed)
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race; use its key
    finally:
        os.unlink(tmp)


def peer_id_of(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


_held_locks: dict[Path, int] = {}  # identity file -> the open lock file, held for the process's life


def _lock_identity(path: Path) -> bool:
    """Hold an exclusive lock on identity file ``path`` for as long as this process lives;
    False if another live process holds it (two processes must never share a peer id:
    the swarm would see one peer whose records flip between them)."""
    path = Path(path).resolve()
    if path in _held_locks:
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _held_locks[path] = fd
    return True


def pinned_identity(path: Path) -> KeyPair:
    """The identity in ``path``, held by this process; ConfigError if a live one holds it."""
    if not _lock_identity(path):
        raise ConfigError(f"identity {path} is in use by another running p2pserve process; "
                          f"give this one its own (--group-id or --identity)")
    return load_or_create_identity(path)


def own_identity(directory: Path, name: str) -> KeyPair:
    """This process's identity under ``directory``: ``name.key`` if no live process holds it,
    else the first free ``name-2.key``, ``name-3.key``… so that two workers started side by
    side are two peers."""
    for n in range(1, 65):
        path = Path(directory) / (f"{name}.key" if n == 1 else f"{name}-{n}.key")
        if _lock_identity(path):
            return load_or_create_identity(path)
    raise ConfigError(f"64 processes already hold identities {name}*.key in {directory}")


def read_peer_list(path: Path) -> frozenset[str]:
    """The peer ids in ``path``: one per line, ``#`` starts a comment; ConfigError naming a bad line."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read peer list {path}: {e}") from None
    peers = set()
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            peers.add(ID.from_base58(text).to_base58())
        except Exception:
            raise ConfigError(f"{path}, line {n}: {text[:80]!r} is not a peer id") from None
    return frozenset(peers)


SWARM_KEY_HEADER = "/key/swarm/psk/1.0.0/\n/base16/\n"


def write_swarm_key(path: Path) -> None:
    """A new random swarm key at ``path`` (mode 0600), in the format IPFS/kubo use."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(SWARM_KEY_HEADER + secrets.token_hex(32) + "\n")


def read_swarm_key(path: Path) -> str:
    """The 64 hex digits of the swarm key in ``path`` or ConfigError saying what is wrong."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read swarm key {path}: {e}") from None
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) != 3 or lines[0] != "/key/swarm/psk/1.0.0/" or lines[1] != "/base16/" \
            or not re.fullmatch(r"[0-9a-fA-F]{64}", lines[2]):
        raise ConfigError(f"{path} is not a swarm key: expected the lines /key/swarm/psk/1.0.0/, /base16/ "
                          f"and 64 hex digits (make one with `p2pserve keygen`)")
    return lines[2].lower()


# --- host -------------------------------------------------------------------------------


class CancelSafeNoise(NoiseTransport):
    """Noise whose writes go out whole even when the task writing is cancelled.

    Noise encrypts each message with the next nonce before the socket takes it (and a
    private swarm's pnet layer below it runs a stream cipher), so a write cancelled after
    that point (a timeout, a reset's grace running out, a cancelled session) leaves the
    peer a cut message or a skipped nonce: it cannot decrypt anything after it, and the
    whole connection dies with every stream on it. A write blocks, and so can be cut,
    where the socket is full, which is the normal state of a link carrying a prefill's
    activations. So the connection under Noise takes each write whole (``_WholeWrites``);
    a cancellation reaches the writer at its next checkpoint, after the message. (Yamux
    would be the natural place, but py-libp2p builds its own Yamux whatever class the
    host is given.)"""

    async def secure_inbound(self, conn):
        return await super().secure_inbound(_WholeWrites(conn))

    async def secure_outbound(self, conn, peer_id):
        return await super().secure_outbound(_WholeWrites(conn), peer_id)


class _WholeWrites:
    """A raw connection whose writes no cancellation cuts. Their only bound is
    ``WRITE_STALL_LIMIT``: a peer that takes nothing for that long is not reading, and its
    connection is closed (a message cut by that bound could not be used anyway)."""

    def __init__(self, conn):
        self._conn = conn

    def __getattr__(self, name):
        return getattr(self._conn, name)

    async def write(self, data: bytes) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(WRITE_STALL_LIMIT) as stalled:
                await self._conn.write(data)
            if stalled.cancelled_caught:
                log.warning("a write to %s took over %g s; closing the connection",
                            self._conn.get_remote_address(), WRITE_STALL_LIMIT)
                with trio.move_on_after(_CLOSE_GRACE):
                    await self._conn.close()
                raise RawConnError(f"the connection stopped taking writes for {WRITE_STALL_LIMIT:g} s")


def make_host(key_pair: KeyPair, swarm_key: str | None = None):
    """A libp2p host (not yet listening): TCP + Noise + Yamux only, inside the private
    network of ``swarm_key`` (64 hex digits) when one is given.

    The connection config keeps py-libp2p from trying to hold 50-100 connections, and
    max_connections_per_peer=1 removes its fixed 250 ms "happy eyeballs" wait from every
    dial (the wait only ends early once the per-peer limit is reached)."""
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: CancelSafeNoise(key_pair, noise_privkey=create_noise_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=ConnectionConfig(
            min_connections=0, low_watermark=0, max_connections_per_peer=1
        ),
        psk=swarm_key,
    )


@asynccontextmanager
async def running_host(key_pair: KeyPair, listen: list[str], swarm_key: str | None = None):
    """A host listening on `listen` (e.g. ["/ip4/127.0.0.1/tcp/0"]) for the duration
    of the block. NetworkError if it cannot listen on any of them."""
    addrs = [_multiaddr(a, "listen address", "/ip4/<ip>/tcp/<port>") for a in listen]
    for addr in addrs:
        _check_port_free(addr)
    host = make_host(key_pair, swarm_key)
    async with host.run(listen_addrs=addrs):
        try:
            if not host.get_transport_addrs():
                # Swarm.listen reports failure by returning False, which host.run ignores.
                raise NetworkError(f"cannot listen on {', '.join(listen)}")
            yield host
        finally:
            # Leaving host.run() does not close the listening socket: the "stopped"
            # host would go on accepting connections and handshaking. Close it.
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_GRACE):
                await host.close()


MAX_STREAMS_PER_PEER = 512  # open streams of one protocol that one peer may hold here


def serve_protocol(host, protocol: TProtocol, handler) -> None:
    """Accept streams of ``protocol`` with ``handler(stream)``. Whatever a handler raises
    (a peer's bad input that slipped past the checks, or a bug) is logged once and resets
    that stream; it never reaches the host's nursery, which would end the process. A peer
    holding ``MAX_STREAMS_PER_PEER`` streams of ``protocol`` already has the next one reset
    unread (py-libp2p's resource manager limits streams per host, not per peer)."""
    open_streams: Counter = Counter()  # peer -> streams of this protocol being served

    async def contained(stream) -> None:
        peer = stream.muxed_conn.peer_id
        if open_streams[peer] >= MAX_STREAMS_PER_PEER:
            log.warning("peer %s holds %d streams; refusing another %s stream", peer, open_streams[peer], protocol)
            await reset_stream(stream)
            return
        open_streams[peer] += 1
        try:
            await handler(stream)
        except Exception:
            log.exception("%s handler failed on a stream from %s; stream reset", protocol, peer)
            await reset_stream(stream)
        finally:
            open_streams[peer] -= 1
            if not open_streams[peer]:
                del open_streams[peer]

    host.set_stream_handler(protocol, contained)


def _check_port_free(addr: multiaddr.Multiaddr) -> None:
    # py-libp2p listens with SO_REUSEPORT, so a second process on a busy port would
    # "succeed" and silently get half of the incoming connections. Refuse it here.
    try:
        ip, port = addr.value_for_protocol("ip4"), int(addr.value_for_protocol("tcp"))
    except Exception:
        return  # not ip4/tcp: let libp2p judge it
    if port == 0:
        return
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
        probe.bind((ip, port))
    except OSError as e:
        raise NetworkError(f"cannot listen on {addr}: {(e.strerror or str(e)).lower()}") from None
    finally:
        probe.close()


def host_multiaddrs(host) -> list[str]:
    """The full `/ip4/…/tcp/…/p2p/<id>` addresses others can dial this host at, with
    the real port when it listened on port 0. A host listening on 0.0.0.0 (which
    py-libp2p reports as is) is listed at this machine's outward address and 127.0.0.1."""
    addrs = []
    for addr in map(str, host.get_addrs()):
        if addr.startswith("/ip4/0.0.0.0/"):
            addrs += [addr.replace("0.0.0.0", ip, 1) for ip in _local_ipv4s()]
        else:
            addrs.append(addr)
    return addrs


def _local_ipv4s() -> list[str]:
    ips = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # picks the outward interface; sends nothing
            ips.append(s.getsockname()[0])
        except OSError:
            pass
    return [ip for ip in ips if ip != "127.0.0.1"] + ["127.0.0.1"]


def parse_peer(address: str) -> PeerInfo:
    """The peer id and address in a full multiaddr, or ConfigError saying what is wrong."""
    ma = _multiaddr(address, "peer address", PEER_ADDRESS_FORM)
    try:
        return info_from_p2p_addr(ma)
    except Exception as e:
        raise ConfigError(
            f"bad peer address {address!r}: {e}; expected {PEER_ADDRESS_FORM}"
        ) from None


def _multiaddr(text: str, what: str, form: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as e:
        raise ConfigError(f"bad {what} {text!r}: {e}; expected {form}") from None


async def connect(host, address: str, timeout: float = 10.0) -> ID:
    """Connect to the peer at `address` (a full multiaddr); its peer id.
    NetworkError "cannot reach <address>: …" if that fails or takes over `timeout` s."""
    info = parse_peer(address)
    if info.peer_id not in host.get_connected_peers():
        # py-libp2p dials one TCP address per peer from everything its peerstore ever
        # learned (a restarted peer's old port included), and refuses for 60 s to redial
        # a peer whose last dial failed. An explicit connect dials exactly `address`.
        host.get_peerstore().clear_addrs(info.peer_id)
        host.get_network().unblock_peer(info.peer_id)
    with _reaching(address, timeout):
        await host.connect(info)
    return info.peer_id


# seconds a dial to one of a peer's addresses has before the next starts beside it
# (Happy Eyeballs, RFC 8305's recommended delay); a failure starts the next at once
DIAL_STAGGER = 0.25


async def dial(host, peer_id: str, addrs, timeout: float = 10.0) -> ID:
    """The one way to reach a peer named in a record or a chain: its open connection, or its
    announced addresses: the direct ones raced (the next starts when the last fails or
    after ``DIAL_STAGGER`` s; the first connection wins and the others are cancelled, so a
    dead or frozen address costs a quarter second, not ``timeout``), then the relayed ones
    (``…/p2p-circuit/p2p/<id>``, net/nat.py) through their relay, in turn. An address that
    names another peer is not dialed (``records.address_problem``): the connection returned
    is always to ``peer_id``. NetworkError naming the peer and each address's failure if
    none answers."""
    peer = ID.from_base58(peer_id)
    if host.get_network().connections.get(peer):
        return peer
    failures = []
    usable = []  # addrs, less those address_problem refuses
    for addr in addrs:
        if (problem := address_problem(addr, peer_id)) is not None:
            failures.append(problem)
        else:
            usable.append(addr)
    direct = [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in usable if "/p2p-circuit" not in a]
    if direct:
        try:
            return await _race(host, direct, timeout)
        except NetworkError as e:
            failures.append(str(e))
    for addr in usable:
        if "/p2p-circuit" in addr:  # a worker behind a NAT, reached through its relay
            from p2pserve.net.nat import dial_through_relay  # nat.py builds on this module

            try:
                return await dial_through_relay(host, addr, timeout=timeout)
            except NetworkError as e:
                failures.append(str(e))
    raise NetworkError(f"cannot reach {peer_id}: " + ("; ".join(failures) or "it announced no address"))


async def _race(host, addresses: list[str], timeout: float) -> ID:
    """Connect to one peer at the first of ``addresses`` that answers, Happy Eyeballs style.
    Each address is dialed on its own (``Swarm.dial_addr``): ``host.connect`` dials a peer
    one attempt at a time, a second waiting for the first."""
    won: list[ID] = []
    failures: dict[str, str] = {}
    # a malformed address is a ConfigError here, as connect's, not an error group of the nursery's
    infos = [parse_peer(address) for address in addresses]
    async with trio.open_nursery() as nursery:
        for address, info in zip(addresses, infos):
            failed = trio.Event()

            async def attempt(address=address, info=info, failed=failed):
                try:
                    with _reaching(address, timeout):
                        await host.get_network().dial_addr(info.addrs[0], info.peer_id)
                except NetworkError as e:
                    failures[address] = str(e)
                    failed.set()
                    return
                won.append(info.peer_id)
                nursery.cancel_scope.cancel()

            nursery.start_soon(attempt)
            with trio.move_on_after(DIAL_STAGGER):
                await failed.wait()
    if won:
        return won[0]
    raise NetworkError("; ".join(failures[a] for a in addresses))


@contextmanager
def _reaching(address: str, timeout: float):
    """Dialing ``address`` within ``timeout`` s; any failure as NetworkError "cannot reach
    <address>: <why>", the root cause named (py-libp2p wraps it several levels deep)."""
    try:
        with trio.fail_after(timeout):
            yield
    except trio.TooSlowError:
        raise NetworkError(f"cannot reach {address}: no answer within {timeout:g} s (a peer that is down "
                           f"or frozen, or {_KEY_MISMATCH})") from None
    except Exception as e:
        causes = _causes(e)
        why = _describe(causes[-1])
        if any(isinstance(c, UpgradeFailure) for c in causes):
            # A pnet peer whose key differs reads garbage and drops the connection mid-handshake,
            # by a reset or a close (or waits, the timeout above): which, depends on who reads first.
            why += f" during the handshake (a peer that speaks another protocol, or {_KEY_MISMATCH})"
        raise NetworkError(f"cannot reach {address}: {why}") from e


_KEY_MISMATCH = "a private swarm whose --swarm-key does not match"


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and what caused it, down to the root: py-libp2p wraps the OS error several levels
    deep ("unable to connect … (with exceptions)", "failed to upgrade security …")."""
    chain = [e]
    while True:
        inner = getattr(e, "errors", None) or getattr(e, "exceptions", None)  # MultiError, groups
        e = inner[-1] if inner else (e.__cause__ or e.__context__)
        if e is None or e in chain:
            return chain
        chain.append(e)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


# --- DHT --------------------------------------------------------------------------------


@asynccontextmanager
async def running_dht(host, server: bool, bootstrap_peers: list[str] = (), timeout: float = 10.0):
    """A Kademlia DHT on `host`, with the p2pserve record validator, for the block.

    `server=True` answers other peers' DHT queries and stores their records. Both
    modes work for a worker; prefer server mode everywhere: a server adds every peer
    that queries it to its routing table, client-mode ones included, and then sends
    them queries they refuse (harmless, but each costs a stream and an error log).
    Each of `bootstrap_peers` is connected to and put in the routing table at once,
    so the first put or get already reaches it."""
    dht = KadDHT(host, DHTMode.SERVER if server else DHTMode.CLIENT)
    dht.register_validator(NAMESPACE, RecordValidator())
    async with background_trio_service(dht):
        for address in bootstrap_peers:
            peer_id = await connect(host, address, timeout)
            # Identify may not have told us yet that the peer serves the DHT; we know.
            await dht.add_peer(peer_id, skip_server_mode_check=True)
        yield dht
