"""Signed worker records: what verifies, what is refused, which one the DHT keeps."""

import dataclasses
import time

import msgpack
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2pserve.net.records import (
    MAX_LIFETIME,
    MAX_RTT,
    MAX_RTTS,
    RECORD_TTL,
    RecordError,
    RecordValidator,
    WorkerRecord,
    record_key,
    sign_record,
    verify_record,
)

NOW = 1_700_000_000.0


def peer_id(key_pair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


def make_record(key_pair, **changes) -> WorkerRecord:
    record = WorkerRecord(
        peer_id=peer_id(key_pair),
        addrs=[f"/ip4/127.0.0.1/tcp/4001/p2p/{peer_id(key_pair)}"],
        model="llama-3-8b",
        fingerprint="ab12",
        stage=1,
        start=16,
        end=32,
        tp=2,
        devices=[{"name": "cpu", "memory": 2**34, "speed": 1.5}] * 2,
        group_id="g1",
        version="0.1.0",
        load={"sessions": 3, "queue": 0},
        expires_at=NOW + RECORD_TTL,
    )
    return dataclasses.replace(record, **changes)


def resign_tampered(blob: bytes, **changes) -> bytes:
    """The envelope of `blob` with record fields changed but the original signature."""
    envelope = msgpack.unpackb(blob)
    fields = msgpack.unpackb(envelope["record"]) | changes
    envelope["record"] = msgpack.packb(fields)
    return msgpack.packb(envelope)


def test_signed_record_verifies_to_the_same_record():
    key_pair = create_new_key_pair()
    record = make_record(key_pair)
    assert verify_record(sign_record(record, key_pair), now=NOW) == record


def test_record_key_is_namespaced_by_peer():
    assert record_key("12D3KooWabc") == "/p2pserve/worker/12D3KooWabc"


@pytest.mark.parametrize("changes", [{"stage": 2}, {"end": 80}, {"expires_at": NOW + 200.0}, {"load": {}}])
def test_tampered_field_breaks_the_signature(changes):
    key_pair = create_new_key_pair()
    blob = resign_tampered(sign_record(make_record(key_pair), key_pair), **changes)
    with pytest.raises(RecordError, match="invalid signature"):
        verify_record(blob, now=NOW)


def test_record_signed_by_another_key_than_its_peer_id_is_refused():
    victim, impostor = create_new_key_pair(), create_new_key_pair()
    blob = sign_record(make_record(victim), impostor)
    with pytest.raises(RecordError, match=f"claims peer {peer_id(victim)} but its key is peer {peer_id(impostor)}"):
        verify_record(blob, now=NOW)


def test_expired_record_is_refused():
    key_pair = create_new_key_pair()
    blob = sign_record(make_record(key_pair, expires_at=NOW - 5), key_pair)
    with pytest.raises(RecordError, match="expired 5.0 s ago"):
        verify_record(blob, now=NOW)


def test_record_claiming_a_far_future_expiry_is_refused():
    key_pair = create_new_key_pair()
    blob = sign_record(make_record(key_pair, expires_at=NOW + MAX_LIFETIME + 60), key_pair)
    with pytest.raises(RecordError, match="claims to live"):
        verify_record(blob, now=NOW)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\xc1", "not msgpack"),
        (msgpack.packb([1, 2]), "expected a map"),
        (msgpack.packb({"record": b"", "pubkey": b""}), "expected bytes fields"),
        (msgpack.packb({"record": msgpack.packb({"peer_id": "x"}), "pubkey": b"", "sig": b""}), "field 'addrs'"),
    ],
)
def test_malformed_blobs_are_refused(blob, message):
    with pytest.raises(RecordError, match=message):
        verify_record(blob, now=NOW)


def test_mistyped_field_is_refused_even_when_signed():
    key_pair = create_new_key_pair()
    blob = sign_record(make_record(key_pair, stage="one"), key_pair)
    with pytest.raises(RecordError, match="field 'stage' is 'one', expected int"):
        verify_record(blob, now=NOW)


def test_unreadable_public_key_is_refused():
    key_pair = create_new_key_pair()
    envelope = msgpack.unpackb(sign_record(make_record(key_pair), key_pair))
    envelope["pubkey"] = b"\x08\x01\x12\x03abc"
    with pytest.raises(RecordError, match="unreadable public key"):
        verify_record(msgpack.packb(envelope), now=NOW)


def test_validator_accepts_a_fresh_record_only_under_its_own_key():
    key_pair = create_new_key_pair()
    record = make_record(key_pair, expires_at=time.time() + RECORD_TTL)
    blob = sign_record(record, key_pair)
    validator = RecordValidator()
    validator.validate(record_key(record.peer_id), blob)
    with pytest.raises(RecordError, match="foreign key"):
        validator.validate(record_key("12D3KooWsomeoneelse"), blob)
    with pytest.raises(RecordError):
        validator.validate(record_key(record.peer_id), b"junk")


def test_validator_selects_the_record_that_expires_last_and_never_an_invalid_one():
    key_pair = create_new_key_pair()
    now = time.time()
    older = sign_record(make_record(key_pair, expires_at=now + 10), key_pair)
    newer = sign_record(make_record(key_pair, expires_at=now + 25), key_pair)
    expired = sign_record(make_record(key_pair, expires_at=now - 1), key_pair)
    key = record_key(peer_id(key_pair))
    validator = RecordValidator()
    assert validator.select(key, [older, newer]) == 1
    assert validator.select(key, [newer, older]) == 0
    assert validator.select(key, [b"junk", expired, older]) == 2


def test_round_trip_times_travel_in_the_signed_record():
    key_pair = create_new_key_pair()
    record = make_record(key_pair, rtts={"12D3KooWnext": 0.012, "12D3KooWprev": 3})
    assert verify_record(sign_record(record, key_pair), now=NOW).rtts == record.rtts


def test_a_record_of_an_older_worker_without_round_trip_times_is_read_with_none():
    key_pair = create_new_key_pair()
    fields = dataclasses.asdict(make_record(key_pair))
    del fields["rtts"]
    packed = msgpack.packb(fields)
    blob = msgpack.packb({"record": packed, "pubkey": key_pair.public_key.serialize(),
                          "sig": key_pair.private_key.sign(b"p2pserve-worker-record:" + packed)})
    assert verify_record(blob, now=NOW).rtts == {}


@pytest.mark.parametrize("rtts, message", [
    ([0.1], "field 'rtts'"),
    ({f"12D3KooW{i}": 0.01 for i in range(MAX_RTTS + 1)}, "rtts must map at most"),
    ({"12D3KooWx": "fast"}, "rtts must map"),
    ({"12D3KooWx": True}, "rtts must map"),
    ({"12D3KooWx": -0.001}, "rtts must map"),
    ({"12D3KooWx": float("nan")}, "rtts must map"),
    ({"12D3KooWx": MAX_RTT + 1}, "rtts must map"),
    ({"12D3KooWx": {"nested": 1}}, "rtts must map"),
    ({7: 0.01}, "not msgpack"),  # msgpack itself refuses a map keyed by an int
    ({"": 0.01}, "rtts must map"),
    ({"x" * 300: 0.01}, "rtts must map"),
])
def test_round_trip_maps_that_are_too_long_or_mistyped_are_refused(rtts, message):
    key_pair = create_new_key_pair()
    blob = sign_record(make_record(key_pair, rtts=rtts), key_pair)
    with pytest.raises(RecordError, match=message):
        verify_record(blob, now=NOW)


def test_a_record_whose_address_names_another_peer_is_refused():
    """Its signer could otherwise send whoever dials it, and a pipeline's activations, to a
    third peer: the record's own id is the only one its addresses may name."""
    key_pair, other = create_new_key_pair(), peer_id(create_new_key_pair())
    me = peer_id(key_pair)
    relay = peer_id(create_new_key_pair())
    fine = [f"/ip4/10.0.0.1/tcp/4001", f"/ip4/10.0.0.1/tcp/4001/p2p/{me}",
            f"/ip4/10.0.0.2/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{me}"]
    assert verify_record(sign_record(make_record(key_pair, addrs=fine), key_pair), now=NOW).addrs == fine
    for addrs, message in [
        ([f"/ip4/10.0.0.1/tcp/4001/p2p/{other}"], f"names peer {other}, not {me}"),
        ([f"/ip4/10.0.0.2/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{other}"], f"names peer {other}"),
        ([f"/ip4/10.0.0.2/tcp/4001/p2p/{relay}/p2p-circuit"], "does not name the peer behind the relay"),
        (["/ip4/not-an-ip/tcp/1"], "is not a multiaddr"),
    ]:
        blob = sign_record(make_record(key_pair, addrs=fine[:1] + addrs), key_pair)
        with pytest.raises(RecordError, match=message):
            verify_record(blob, now=NOW)
