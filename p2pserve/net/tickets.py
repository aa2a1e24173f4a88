"""Session tickets: a head's signed word that one session may run on one chain.

A head that routes a query signs (session id, the chain's hops, expiry) with its peer
key and puts the ticket in the session's 'open' frame; every stage passes it on to the
next. A stage opens a session only under a valid ticket from a head it trusts (the one
it joined through), and takes the chain, the addresses it dials included, from the
ticket and nothing else: a client cannot open sessions on workers directly, steer a
stage into dialling addresses of its choosing, or claim to be another stage's upstream.
The hop addresses are those of the workers' own signed records.

A swarm may have several heads. A head that joins through another gets a *head
certificate* from it (the new head's peer id and an expiry, signed), which it attaches to
its tickets; a stage honours a ticket signed by a head it trusts, or by a head that a head
it trusts certified.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import msgpack
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

from p2pserve.errors import P2PServeError
from p2pserve.net.protocols import Hop

TICKET_TTL = 300.0  # seconds in which the chain must be opened; sessions then run as long as they need
HEAD_CERT_TTL = 7 * 86400.0  # seconds a head certificate stays good
MAX_TICKET_BYTES = 64 * 1024
_SIGNED_PREFIX = b"p2pserve-session-ticket:"  # so this signature means nothing elsewhere
_CERT_PREFIX = b"p2pserve-head-certificate:"


class TicketError(P2PServeError):
    def __init__(self, message: str):
        super().__init__(message, "forbidden")


def sign_ticket(key_pair, session: str, chain: list[Hop], ttl: float = TICKET_TTL,
                cert: bytes | None = None) -> bytes:
    body = msgpack.packb({"session": session, "chain": [h.to_dict() for h in chain],
                          "expires_at": time.time() + ttl}, use_bin_type=True)
    envelope = {"body": body, "pubkey": key_pair.public_key.serialize(),
                "sig": key_pair.private_key.sign(_SIGNED_PREFIX + body)}
    if cert is not None:
        envelope["cert"] = cert
    return msgpack.packb(envelope, use_bin_type=True)


def sign_head_cert(key_pair, head: str, ttl: float = HEAD_CERT_TTL) -> bytes:
    """A certificate that peer ``head`` is a head of this swarm, signed by ``key_pair``'s head."""
    body = msgpack.packb({"head": head, "expires_at": time.time() + ttl}, use_bin_type=True)
    return msgpack.packb({"body": body, "pubkey": key_pair.public_key.serialize(),
                          "sig": key_pair.private_key.sign(_CERT_PREFIX + body)}, use_bin_type=True)


def _signed(blob, prefix: bytes) -> tuple[str, dict]:
    """(signer's peer id, the signed fields) of a signed envelope, or TicketError."""
    try:
        envelope = msgpack.unpackb(blob, raw=False, strict_map_key=True, max_bin_len=MAX_TICKET_BYTES)
        body, pubkey_bytes, sig = envelope["body"], envelope["pubkey"], envelope["sig"]
        pubkey = deserialize_public_key(pubkey_bytes)
        signer = ID.from_pubkey(pubkey).to_base58()
        if not isinstance(body, bytes) or not isinstance(sig, bytes) or not pubkey.verify(prefix + body, sig):
            raise TicketError("bad signature")
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
        if not isinstance(fields, dict):
            raise TicketError("not a map")
    except Exception as e:
        raise TicketError(f"malformed or badly signed {'ticket' if prefix == _SIGNED_PREFIX else 'head certificate'}"
                          f" ({e if isinstance(e, TicketError) else type(e).__name__})") from None
    return signer, {**fields, "_envelope": envelope}


def _certified(cert, signer: str, heads: Collection[str], now: float) -> bool:
    if not isinstance(cert, bytes) or len(cert) > MAX_TICKET_BYTES:
        return False
    try:
        issuer, fields = _signed(cert, _CERT_PREFIX)
    except TicketError:
        return False
    expires_at = fields.get("expires_at")
    return (issuer in heads and fields.get("head") == signer and isinstance(expires_at, (int, float))
            and expires_at > now)


def verify_ticket(blob, heads: Collection[str], session: str, *, now: float | None = None) -> list[Hop]:
    """The chain ``blob`` admits ``session`` to, or TicketError saying why it does not."""
    if not isinstance(blob, bytes) or len(blob) > MAX_TICKET_BYTES:
        raise TicketError("this worker serves only sessions with a ticket from its swarm's head")
    now = time.time() if now is None else now
    signer, fields = _signed(blob, _SIGNED_PREFIX)
    if signer not in heads and not _certified(fields["_envelope"].get("cert"), signer, heads, now):
        raise TicketError(f"session ticket signed by {signer[:64]}, which is not a head of this swarm")
    try:
        chain = [Hop.from_dict(h) for h in fields["chain"]]
        expires_at, ticket_session = float(fields["expires_at"]), fields["session"]
    except Exception as e:
        raise TicketError(f"malformed session ticket: {type(e).__name__}") from None
    if ticket_session != session:
        raise TicketError(f"the ticket is for another session than {str(session)[:64]}")
    if expires_at <= now:
        raise TicketError("session ticket expired")
    return chain
