"""NAT traversal: how a worker nobody can dial still serves, with py-libp2p's own pieces.

    head (every `p2pserve bootstrap`)        worker behind a NAT
    circuit relay v2 hop  ◀──reserve────────  asks the head to dial it back (AutoNAT's
    AutoNAT dial-back     ──dial back──✗      wire format): no answer, so it reserves a
                                              slot and announces
        /ip4/<head>/tcp/<port>/p2p/<head>/p2p-circuit/p2p/<worker>
    stage 0 ──dial(that address)──▶ head ──STOP──▶ worker   (net/host.py: dial)
    DCUtR then punches a direct connection beside the relayed one, where the NATs drop
    packets nobody asked for (a NAT that resets them defeats it; docs/ARCHITECTURE.md),
    and the worker says so (`_report_upgrades`).

Where the swarm has several heads, the worker keeps a slot on a second one too and
announces both relayed addresses; a slot lost (its head died, the connection closed, a
refresh refused) is reserved again, on the same head once it answers or on another
(`RelaySlots`). Heads name the other heads they know in their plan replies.

Why not py-libp2p's AutoNAT as it ships (libp2p/host/autonat/autonat.py, 0.8.1): its
server dials back with ``host.connect`` on the host the request arrived on, which is
already connected to the requester, so every dial-back "succeeds" and every peer is
PUBLIC. `DialBackServer` keeps its protocol and message handling and dials from a host of
its own (a fresh connection, the requester's identity checked by Noise). It also drops
the server's rule that a dialled address must carry the IP the request came from: behind
a TCP proxy (the delay relay of tests/netns.py, a carrier's middlebox) that IP is the
proxy's, and a public worker would be judged private. What a requester can make a head
dial is bounded instead: a few addresses, each under a short deadline, and a dial reaches
nothing but the requester's own peer id.

What is broken in py-libp2p's relay (0.8.1) and worked around here:
- ``CircuitV2Transport.dial`` upgrades the relayed stream without the private network's
  protector, while the receiving side (``upgrade_inbound_raw_conn``) applies it: with a
  swarm key every relayed connection fails its handshake. `dial_through_relay` wraps
  the raw relayed connection itself before upgrading it.
- A transport built with the CLIENT role reserves a slot on the relay before every
  dial; the dialling side here is built without it.
- The relay's default limits (4 reservations, 8 circuits, an hour and 1 GiB a circuit)
  are a public relay's; a head passes limits for a swarm whose tokens cross it.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import click
import multiaddr
import trio
from multiaddr.protocols import P_P2P
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.tools.anyio_service import background_trio_service

from p2pserve.errors import NetworkError
from p2pserve.net.host import connect, make_host, serve_protocol

log = logging.getLogger("p2pserve.nat")

DIALBACK_TIMEOUT = 5.0   # seconds a head spends dialling back one address
DIALBACK_MAX_ADDRS = 8   # addresses a head dials back for one request
CHECK_TIMEOUT = 30.0     # seconds a worker waits for the head's verdict
RELAY_DIAL_ATTEMPTS = 3
RELAY_DIAL_BACKOFF = 0.5  # seconds before the second try, twice that before the third
RELAY_SLOTS = 2          # heads a worker behind a NAT holds a reservation on at once
RESERVE_TIMEOUT = 15.0   # seconds to reach a head and reserve a slot on it
RELAY_WATCH = 0.5        # seconds between looks at a relay's connection
RELAY_RETRY = 1.0        # seconds before a failed head is tried again, doubling ...
RELAY_RETRY_MAX = 30.0   # ... up to this
UPGRADE_WATCH = 1.0      # seconds between looks for relayed connections that DCUtR made direct
LEARN_INTERVAL = 30.0    # seconds between asking the heads held for heads that joined since
MAX_HEADS = 8            # heads a worker knows as relays
# A head relays the swarm's own traffic, for as long as a worker serves.
HEAD_RELAY_LIMITS = RelayLimits(duration=7 * 24 * 3600, data=1 << 50, max_circuit_conns=1024,
                                max_reservations=1024, reservation_ttl=3600)


def is_relayed(address: str) -> bool:
    return "/p2p-circuit" in address


# --- the head: a relay hop and a dial-back server -----------------------------------------


class DialBackServer(AutoNATService):
    """AutoNAT's server, dialling back from ``dialer`` (a host of its own, see above)."""

    def __init__(self, host, dialer):
        super().__init__(host, serve=False)
        self.dialer = dialer
        serve_protocol(host, AUTONAT_PROTOCOL_ID, self.handle_stream)  # p2pserve's per-peer stream cap

    @staticmethod
    def _filter_by_observed_ip(addrs, observed_ip):
        return [a for a in addrs if "/p2p-circuit" not in str(_maddr(a))][:DIALBACK_MAX_ADDRS]

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for addr in addrs:
            reached = False
            with trio.move_on_after(DIALBACK_TIMEOUT):
                try:
                    self.dialer.get_network().unblock_peer(peer_id)  # a failed address must not bar the next
                    await self.dialer.connect(PeerInfo(peer_id, [multiaddr.Multiaddr(addr)]))
                    reached = True
                except Exception as e:
                    log.debug("dial-back to %s at %s failed: %s", peer_id, _maddr(addr), e)
            with trio.move_on_after(DIALBACK_TIMEOUT), trio.CancelScope(shield=True):
                try:
                    await self.dialer.disconnect(peer_id)
                except Exception:
                    pass
            self.dialer.get_peerstore().clear_addrs(peer_id)
            if reached:
                return bytes(addr)
        return None


@asynccontextmanager
async def serving_relay(host, swarm_key: str | None = None):
    """For the block: ``host`` relays for workers behind NATs (circuit relay v2 hop) and
    tells a worker whether it can be dialled (AutoNAT dial-back from a second host)."""
    relay = CircuitV2Protocol(host, limits=HEAD_RELAY_LIMITS, allow_hop=True)
    dialer = make_host(create_new_key_pair(), swarm_key)
    async with background_trio_service(relay), dialer.run(listen_addrs=[]):
        DialBackServer(host, dialer)
        try:
            yield relay
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await dialer.close()


# --- a worker: reachability, a reservation, hole punching ----------------------------------


class RelaySlots:
    """A worker behind a NAT keeps a reservation on up to ``slots`` of the swarm's heads at
    once, the one it joined through first: a head that dies takes only its own relayed
    address with it. Each slot is a task that reserves on the first head no other slot
    holds, refreshes the reservation, and when the connection to that head closes or a
    refresh is refused, reserves again: on the same head once it answers, else on another
    (a head that failed waits RELAY_RETRY seconds, doubling, before it is tried again).
    A slot with no head to try asks the heads held, through ``learn`` (a head's peer id ->
    the multiaddrs of the heads it names), for heads that joined the swarm since.
    ``addrs``: the relayed addresses held now, in the order of ``heads``."""

    def __init__(self, host, heads: list[tuple[ID, str]], slots: int = RELAY_SLOTS, learn=None):
        self.host = host
        self.heads = heads[:MAX_HEADS]  # (peer id, multiaddr), preferred first
        self.learn = learn
        self._learn_at = 0.0
        self.slots = slots
        self.held: dict[ID, str] = {}  # head -> this worker's relayed address through it
        self.failures: dict[ID, str] = {}  # head -> why its latest reservation failed
        self._claimed: set[ID] = set()
        self._retry_at: dict[ID, float] = {}
        self._backoff: dict[ID, float] = {}
        self._changed = trio.Event()

    @property
    def addrs(self) -> list[str]:
        return [self.held[h] for h, _ in self.heads if h in self.held]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.slots):
                nursery.start_soon(self._keep_one)

    async def changed(self) -> None:
        """Until a reservation is made or lost."""
        await self._changed.wait()

    async def settled(self) -> None:
        """Until a reservation is held or every head has failed once."""
        while not self.held and len(self.failures) < len(self.heads):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _next_head(self) -> tuple[ID, str] | None:
        now = trio.current_time()
        for head, addr in self.heads:
            if head not in self._claimed and self._retry_at.get(head, 0.0) <= now:
                return head, addr
        return None

    async def _keep_one(self) -> None:
        while True:
            try:
                await self._reserve_and_hold()
            except Exception as e:  # whatever py-libp2p raises, the slot goes on
                log.warning("relay slot: unexpected %s: %s", type(e).__name__, e)
                await trio.sleep(RELAY_RETRY)

    async def _reserve_and_hold(self) -> None:
        """One turn of a slot: a reservation on the next head to try, held until lost."""
        pick = self._next_head()
        if pick is None:
            await self._learn_heads()
            await trio.sleep(RELAY_WATCH)
            return
        head, head_addr = pick
        self._claimed.add(head)
        try:
            try:
                expires = await self._reserve(head, head_addr)
            except NetworkError as e:
                self.failures[head] = str(e)
                self._backoff[head] = min(2 * self._backoff.get(head, RELAY_RETRY / 2), RELAY_RETRY_MAX)
                self._retry_at[head] = trio.current_time() + self._backoff[head]
                log.info("%s; trying again in %g s", e, self._backoff[head])
                return
            finally:
                self._notify()
            self._backoff.pop(head, None)
            self.failures.pop(head, None)
            self.held[head] = f"{head_addr}/p2p-circuit/p2p/{self.host.get_id().to_base58()}"
            click.echo(f"behind NAT: serving through relay {self.held[head]}", err=True)
            self._notify()
            try:
                why = await self._hold(head, expires)
            finally:
                lost = self.held.pop(head)
                self._notify()
            click.echo(f"relay slot lost ({why}): no longer serving through {lost}; reserving again", err=True)
        finally:
            self._claimed.discard(head)

    async def _learn_heads(self) -> None:
        if self.learn is None or trio.current_time() < self._learn_at:
            return
        self._learn_at = trio.current_time() + LEARN_INTERVAL  # one slot asks; the others wait
        for head in list(self.held):
            named = []
            with trio.move_on_after(RESERVE_TIMEOUT):
                try:
                    named = await self.learn(head)
                except Exception as e:
                    log.info("asking head %s for the swarm's heads failed: %s", head, e)
            known = {h for h, _ in self.heads}
            for new in _heads(named, exclude=self.host.get_id()):
                if new[0] not in known and len(self.heads) < MAX_HEADS:
                    self.heads.append(new)
                    known.add(new[0])
                    log.info("learned of head %s from head %s", new[0], head)

    async def _reserve(self, head: ID, head_addr: str) -> float:
        if not self.host.get_network().connections.get(head):
            await connect(self.host, head_addr, timeout=RESERVE_TIMEOUT)
        return await reserve_slot(self.host, head)

    async def _hold(self, head: ID, expires: float) -> str:
        """Until the reservation on ``head`` is lost; why it was."""
        while True:
            # refresh at the middle of what is left, no later than a minute before expiry (and
            # not in a loop, whatever expiry a relay names)
            refresh_at = time.time() + max(5.0, min((expires - time.time()) / 2, expires - time.time() - 60))
            while time.time() < refresh_at:
                if not self.host.get_network().connections.get(head):
                    return f"the connection to relay {head} closed"
                await trio.sleep(RELAY_WATCH)
            try:
                expires = await reserve_slot(self.host, head)
            except NetworkError as e:
                return f"refresh refused: {e}"


@dataclass
class Reachability:
    announce: list[str]       # --announce addresses: announced first whatever else holds
    listen: list[str]
    direct: str | None        # the address the head reached it at, if any
    relays: RelaySlots | None  # its reservations, if it serves through relays

    @property
    def addrs(self) -> list[str]:
        """What the worker announces now, best first (the relayed addresses change as
        reservations are lost and made)."""
        if self.direct:
            return self.announce + [a for a in self.listen if a not in self.announce]
        return self.announce + ((self.relays and self.relays.addrs) or self.listen)

    async def changed(self) -> None:
        """Until ``addrs`` changes (never, for a worker reached directly)."""
        if self.relays is None:
            await trio.sleep_forever()
        before = self.addrs
        while self.addrs == before:
            await self.relays.changed()

    @property
    def relay(self) -> str | None:
        """Its first relayed address, if it serves through a relay now."""
        return next(iter(self.relays.addrs), None) if self.relays else None


async def check_reachable(host, head: ID, addrs: list[str]) -> str | None:
    """The first of ``addrs`` at which ``head`` dialled this host back, or None."""
    client = AutoNATService(host, serve=False, confirmations=1)
    raw = [_without_p2p(a).to_bytes() for a in addrs if not is_relayed(a)]
    try:
        status, reached = await client.query_server(head, raw, timeout=CHECK_TIMEOUT)
    except Exception as e:
        log.info("dial-back check through %s failed: %s", head, e)
        return None
    if status != Message.OK or not reached:
        return None
    return f"{_maddr(reached)}/p2p/{host.get_id().to_base58()}"


async def reserve_slot(host, relay: ID) -> float:
    """One RESERVE on ``relay`` (a new reservation, or the refresh of the one held); when it
    expires (unix seconds). NetworkError if the relay refuses or does not answer.

    Sent here rather than through ``CircuitV2Transport.reserve``, whose own refresher keeps
    trying a relay that is gone and tells nobody (RelaySlots notices and moves on)."""
    try:
        with trio.fail_after(RESERVE_TIMEOUT):
            stream = await host.new_stream(relay, [HOP_PROTOCOL_ID])
            try:
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                reply = await read_delimited_msg(stream, HopMessage)
            finally:
                with trio.move_on_after(1):
                    await stream.close()
    except Exception as e:
        raise NetworkError(f"cannot reserve a slot on relay {relay}: {e or type(e).__name__}") from None
    if reply.status != StatusCode.OK:
        raise NetworkError(f"relay {relay} refused a reservation (status {reply.status}; "
                           f"is it a p2pserve head of this swarm?)")
    return float(reply.reservation.expire) if reply.HasField("reservation") else time.time() + 60


@asynccontextmanager
async def traversing_nat(host, head: ID, head_addr: str, listen_addrs: list[str], announce: list[str] = (),
                         other_heads: list[str] = (), learn_heads=None):
    """For the block: this worker accepts relayed connections and punches holes (DCUtR);
    yields its `Reachability` after a line on stderr says what it found. Addresses in
    ``announce`` (port-forwarded ones) come first whatever the check finds. Not reachable
    directly, it keeps reservations on the head and on one of ``other_heads`` (multiaddrs
    of the swarm's other heads; ``learn_heads`` asks a head for more, `RelaySlots`) for the
    whole block."""
    stop = CircuitV2Protocol(host, allow_hop=False)  # accepts connections relayed to us
    async with background_trio_service(stop), background_trio_service(DCUtRProtocol(host)), \
            trio.open_nursery() as nursery:
        nursery.start_soon(_report_upgrades, host)
        announce = list(announce)
        direct = await check_reachable(host, head, announce + listen_addrs)
        relays = None
        if direct:
            click.echo(f"reachable directly at {direct}", err=True)
        else:
            relays = RelaySlots(host, [(head, head_addr)] + _heads(other_heads, exclude=head), learn=learn_heads)
            nursery.start_soon(relays.run)
            await relays.settled()
            if not relays.held:
                click.echo(f"not reachable directly and no relay slot ({'; '.join(relays.failures.values())}): "
                           f"announcing {', '.join(announce + listen_addrs)} until a head takes a reservation",
                           err=True)
        yield Reachability(announce, list(listen_addrs), direct, relays)
        nursery.cancel_scope.cancel()  # the reservations' keepers


async def _report_upgrades(host) -> None:
    """A line on stderr when a peer this host is connected to through a relay gets a direct
    connection too: DCUtR punched a hole (or dialled the peer directly, its step 0). New
    streams take the direct one; DCUtR closes the relayed one a minute later."""
    relayed: set[ID] = set()
    upgraded: set[ID] = set()
    while True:
        connections = host.get_network().connections
        for peer in (relayed | upgraded) - set(connections):  # gone: a new relayed connection counts again
            relayed.discard(peer)
            upgraded.discard(peer)
        for peer, conns in list(connections.items()):
            try:
                addrs = [str(a) for c in conns for a in c.get_transport_addresses()]
            except Exception:  # a connection closing under us: next time
                continue
            if any(is_relayed(a) for a in addrs):
                relayed.add(peer)
            direct = [a for a in addrs if not is_relayed(a)]
            if peer in relayed and direct and peer not in upgraded:
                upgraded.add(peer)
                # an address py-libp2p could not see may come from the peer's own list: 0.0.0.0
                at = next((f" at {a}" for a in direct if "/ip4/0.0.0.0/" not in a), "")
                click.echo(f"upgraded to a direct connection to {peer}{at} (DCUtR; it was relayed)", err=True)
        await trio.sleep(UPGRADE_WATCH)


def _heads(addrs: list[str], exclude: ID) -> list[tuple[ID, str]]:
    heads = []
    for a in addrs:
        try:
            peer = ID.from_base58(multiaddr.Multiaddr(a).get_peer_id())
        except Exception:
            log.info("ignoring head address %r: not a multiaddr with /p2p/<peer-id>", a)
            continue
        if peer != exclude and all(peer != h for h, _ in heads):
            heads.append((peer, a))
    return heads


# --- dialling a relayed address -----------------------------------------------------------


async def dial_through_relay(host, address: str, timeout: float) -> ID:
    """Connect to the peer at relayed ``address`` (<relay>/p2p-circuit/p2p/<peer>); its id."""
    ma = multiaddr.Multiaddr(address)
    # the dialling side reserves nothing: no CLIENT role (see the module's notes)
    transport = CircuitV2Transport(host, CircuitV2Protocol(host), RelayConfig(roles=RelayRole.STOP))
    try:
        relay_ma, peer = transport.parse_circuit_ma(ma)
        relay = ID.from_base58(relay_ma.get_peer_id())
    except Exception as e:
        raise NetworkError(f"bad relayed address {address!r}: {e}; expected "
                           f"/ip4/<ip>/tcp/<port>/p2p/<relay-id>/p2p-circuit/p2p/<peer-id>") from None
    if not host.get_network().connections.get(relay):
        await connect(host, str(relay_ma), timeout=timeout)
    failure = None
    with trio.move_on_after(timeout):
        for attempt in range(RELAY_DIAL_ATTEMPTS):
            try:
                raw = await transport.dial_peer_info(PeerInfo(peer, [ma]), relay_info=PeerInfo(relay, [relay_ma]))
                psk = getattr(host.get_network(), "psk", None)
                if psk:  # the transport's own dial forgets this (see the module's notes)
                    raw = new_protected_conn(raw, psk)
                await host.upgrade_outbound_connection(raw, peer)
                return peer
            except Exception as e:
                # py-libp2p's relay dial now and then fails at once with an empty "Failed
                # to establish relay connection" that a second try does not meet
                failure = f"{e or type(e).__name__}"
                log.info("relayed dial to %s failed (try %d): %s", peer, attempt + 1, failure)
                await trio.sleep(RELAY_DIAL_BACKOFF * (attempt + 1))
    raise NetworkError(f"cannot reach {address}: " + (failure or f"no answer through the relay within {timeout:g} s"))


def _maddr(raw) -> multiaddr.Multiaddr:
    return multiaddr.Multiaddr(bytes(raw)) if isinstance(raw, (bytes, bytearray)) else multiaddr.Multiaddr(raw)


def _without_p2p(address: str) -> multiaddr.Multiaddr:
    ma = multiaddr.Multiaddr(address)
    try:
        return ma.decapsulate_code(P_P2P) if ma.get_peer_id() else ma
    except Exception:
        return ma
