"""Worker records: what a worker announces in the DHT, signed with its peer key.

A record says who the worker is (peer id, addresses), what it serves (model,
fingerprint, stage, layers [start, end), TP degree, devices) and how busy it is. It
carries its own expiry: the DHT keeps values for a day, far longer than a worker
lives, so a worker re-announces every RECORD_TTL / 3 and readers drop what expired.

On the wire a record is msgpack {"record": <msgpack of the fields>, "pubkey":
<libp2p protobuf public key>, "sig": <signature>}. The fields stay as the exact bytes
that were signed, so verifying never depends on re-encoding them the same way.
Anyone can check a record without trusting whoever relayed it: the public key must
hash to the claimed peer id and must have signed the bytes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import msgpack
import multiaddr
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from p2pserve.errors import P2PServeError

NAMESPACE = "p2pserve"  # the DHT namespace, the first part of every key
RECORD_TTL = 30.0  # seconds a record stays valid; workers re-announce every TTL/3
MAX_LIFETIME = 10 * RECORD_TTL  # a record claiming to live longer is refused
MAX_RECORD_BYTES = 64 * 1024
_SIGNED_PREFIX = b"p2pserve-worker-record:"  # so this signature means nothing elsewhere


class RecordError(P2PServeError):
    """A worker record is malformed, badly signed or expired."""


@dataclass
class WorkerRecord:
    peer_id: str
    addrs: list[str]
    model: str
    fingerprint: str
    stage: int
    start: int  # first layer held
    end: int  # one past the last layer held
    tp: int
    devices: list[dict]  # [{"name", "memory", "speed"}, …], one per TP rank
    group_id: str
    version: str
    load: dict  # {"sessions": n, "queue": n}
    expires_at: float  # unix time
    # round-trip seconds to the peers it pinged (node/pings.py), at most MAX_RTTS of them
    rtts: dict = field(default_factory=dict)

    @property
    def precision(self) -> tuple[str, str]:
        """What the worker computes its layers in, as it says: its weights' dtype and its KV
        cache's ("" where a worker older than --kv-dtype names none)."""
        entry = self.devices[0] if self.devices and isinstance(self.devices[0], dict) else {}
        return str(entry.get("dtype", "")), str(entry.get("kv_dtype", ""))


_FIELD_TYPES = {
    "peer_id": str,
    "addrs": list,
    "model": str,
    "fingerprint": str,
    "stage": int,
    "start": int,
    "end": int,
    "tp": int,
    "devices": list,
    "group_id": str,
    "version": str,
    "load": dict,
    "expires_at": (float, int),
}
# fields a record of an older worker may lack: read as their default
_OPTIONAL_TYPES = {"rtts": dict}
assert set(_FIELD_TYPES) | set(_OPTIONAL_TYPES) == {f.name for f in dataclasses.fields(WorkerRecord)}


def record_key(peer_id: str) -> str:
    return f"/{NAMESPACE}/worker/{peer_id}"


EPOCH = RECORD_TTL / 3  # seconds: workers provide the key of this and the next epoch


def workers_key(fingerprint: str, epoch: int) -> str:
    """The DHT provider key under which the workers of one model list themselves.

    Heads find workers through it without listing anyone's store: every worker provides
    it (Kademlia keeps each key's providers at the k peers closest to it, however many
    providers there are), and a head looks it up. It changes every ``EPOCH`` seconds:
    py-libp2p answers a provider lookup from its local cache once it holds any provider
    of a key, so a key that stays the same would hide workers that joined after the
    first lookup."""
    return f"/{NAMESPACE}/{fingerprint}/workers/{epoch}"


def current_epoch(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // EPOCH)


def sign_record(record: WorkerRecord, key_pair) -> bytes:
    fields = msgpack.packb(dataclasses.asdict(record), use_bin_type=True)
    return msgpack.packb(
        {
            "record": fields,
            "pubkey": key_pair.public_key.serialize(),
            "sig": key_pair.private_key.sign(_SIGNED_PREFIX + fields),
        },
        use_bin_type=True,
    )


def verify_record(blob: bytes, *, now: float | None = None) -> WorkerRecord:
    """The record in `blob`, or RecordError saying why it cannot be trusted."""
    envelope = _unpack_map(blob, "record envelope")
    fields, pubkey_bytes, sig = (envelope.get(k) for k in ("record", "pubkey", "sig"))
    if not all(isinstance(v, bytes) for v in (fields, pubkey_bytes, sig)):
        raise RecordError("malformed record: expected bytes fields record, pubkey and sig")
    record = _record_from_dict(_unpack_map(fields, "record"))
    try:
        pubkey = deserialize_public_key(pubkey_bytes)
        signer = ID.from_pubkey(pubkey).to_base58()
    except Exception as e:
        raise RecordError(f"malformed record: unreadable public key ({e})") from None
    if signer != record.peer_id:
        raise RecordError(f"record claims peer {record.peer_id} but its key is peer {signer}")
    if not pubkey.verify(_SIGNED_PREFIX + fields, sig):
        raise RecordError(f"record of peer {record.peer_id} has an invalid signature")
    now = time.time() if now is None else now
    if record.expires_at <= now:
        raise RecordError(
            f"record of peer {record.peer_id} expired {now - record.expires_at:.1f} s ago"
        )
    if record.expires_at > now + MAX_LIFETIME:
        raise RecordError(
            f"record of peer {record.peer_id} claims to live {record.expires_at - now:.0f} s, "
            f"more than the {MAX_LIFETIME:.0f} s allowed (is its clock wrong?)"
        )
    return record


def _unpack_map(data: bytes, what: str) -> dict:
    if not isinstance(data, bytes):
        raise RecordError(f"malformed {what}: {type(data).__name__}, expected bytes")
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"malformed {what}: {len(data)} bytes, limit {MAX_RECORD_BYTES}")
    try:
        value = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise RecordError(f"malformed {what}: not msgpack ({e})") from None
    if not isinstance(value, dict):
        raise RecordError(f"malformed {what}: a msgpack {type(value).__name__}, expected a map")
    return value


def _record_from_dict(d: dict) -> WorkerRecord:
    # Fields added by newer versions are ignored; missing or mistyped ones are refused.
    for name, types in _FIELD_TYPES.items():
        value = d.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise RecordError(
                f"malformed record: field {name!r} is {value!r}, expected {_type_names(types)}"
            )
    for name, types in _OPTIONAL_TYPES.items():
        if name in d and not isinstance(d[name], types):
            raise RecordError(f"malformed record: field {name!r} is {str(d[name])[:64]!r}, "
                              f"expected {_type_names(types)}")
    record = WorkerRecord(**{name: d[name] for name in _FIELD_TYPES},
                          **{name: d[name] for name in _OPTIONAL_TYPES if name in d})
    problem = _bounds_problem(record)
    if problem:
        raise RecordError(f"malformed record of peer {record.peer_id[:64]}: {problem}")
    return record


MAX_TEXT = 256  # characters of an id, address, name or version
MAX_ITEMS = 64  # addresses or devices of one record
MAX_RTTS = 64  # peers in a record's round-trip map: the replicas of the stages before and after
MAX_RTT = 60.0  # seconds: a longer round trip is no link to route over


def _number_ok(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _scalar_ok(value) -> bool:
    return value is None or _number_ok(value) or (isinstance(value, str) and len(value) <= MAX_TEXT)


def _bounds_problem(r: WorkerRecord) -> str | None:
    """What is out of bounds in a well-typed record (None if nothing): a record is checked
    whole when it is accepted, so nothing that uses one needs to check it again."""
    texts = [r.peer_id, r.model, r.fingerprint, r.group_id, r.version]
    if any(len(s) > MAX_TEXT for s in texts):
        return f"a text field is longer than {MAX_TEXT} characters"
    if not 0 <= r.start < r.end:
        return f"layers {r.start}-{r.end} are not a range 0 <= start < end"
    if r.stage < -1 or r.tp < 1:  # stage -1: layers chosen outside the plan (--layers, --stage auto)
        return f"stage {r.stage} and TP degree {r.tp} must be >= -1 and >= 1"
    if len(r.addrs) > MAX_ITEMS or not all(isinstance(a, str) and 0 < len(a) <= MAX_TEXT for a in r.addrs):
        return "addrs must be at most 64 multiaddr strings"
    for address in r.addrs:
        if (problem := address_problem(address, r.peer_id)) is not None:
            return problem
    if not 1 <= len(r.devices) <= MAX_ITEMS or not all(isinstance(d, dict) for d in r.devices):
        return "devices must be 1 to 64 maps, one per TP rank"
    for device in r.devices:
        for key, value in device.items():
            nested = isinstance(value, dict) and len(value) <= MAX_ITEMS and all(
                isinstance(k, str) and _scalar_ok(v) for k, v in value.items())
            if not isinstance(key, str) or not (_scalar_ok(value) or nested):
                return f"device field {str(key)[:32]!r} must be a non-negative number, a short text or a map of them"
    if len(r.load) > MAX_ITEMS or not all(isinstance(k, str) and _number_ok(v) for k, v in r.load.items()):
        return "load must map names to non-negative numbers"
    if len(r.rtts) > MAX_RTTS or not all(
            isinstance(k, str) and 0 < len(k) <= MAX_TEXT and _number_ok(v) and v <= MAX_RTT
            for k, v in r.rtts.items()):
        return f"rtts must map at most {MAX_RTTS} peer ids to round-trip seconds in [0, {MAX_RTT:g}]"
    return None


def address_problem(address: str, peer_id: str) -> str | None:
    """Why ``address`` is no way to reach ``peer_id`` (None if it is one): not a multiaddr,
    or one that names another peer (its last ``/p2p/`` id; a relayed address's is the peer
    behind the relay). A signed record or a chain that named a third peer would send its
    dialers' connections, and a pipeline's activations, to a peer nobody chose."""
    try:
        named = multiaddr.Multiaddr(address).get_peer_id()
    except Exception:
        return f"address {address[:80]!r} is not a multiaddr"
    if named is not None and named != peer_id:
        return f"address {address[:80]!r} names peer {named}, not {peer_id}"
    if named is None and "/p2p-circuit" in address:
        return f"relayed address {address[:80]!r} does not name the peer behind the relay"
    return None


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


class RecordValidator(Validator):
    """The KadDHT validator of the "p2pserve" namespace: a value is stored or returned
    only if it is a valid, unexpired worker record under its own peer's key."""

    def validate(self, key: str, value: bytes) -> None:
        record = verify_record(value)
        if key != record_key(record.peer_id):
            raise RecordError(f"record of peer {record.peer_id} stored under foreign key {key}")

    def select(self, key: str, values: list[bytes]) -> int:
        """Index of the record that expires last; invalid ones never win."""
        best, best_expiry = 0, float("-inf")
        for i, value in enumerate(values):
            try:
                expiry = verify_record(value).expires_at
            except RecordError:
                continue
            if expiry > best_expiry:
                best, best_expiry = i, expiry
        return best


# --- records in a running KadDHT (libp2p.kad_dht.KadDHT) ---------------------------------


async def announce(dht, blob: bytes) -> None:
    """Store a signed record under its peer's key, locally and at the closest DHT servers."""
    record = verify_record(blob)
    await dht.put_value(record_key(record.peer_id), blob)


async def provide_worker(dht, fingerprint: str) -> None:
    """List this peer among the workers of ``fingerprint`` for this epoch and the next."""
    epoch = current_epoch()
    for e in (epoch, epoch + 1):
        await dht.provide(workers_key(fingerprint, e))


async def find_workers(dht, fingerprint: str, limit: int = 4096) -> list[str]:
    """Peer ids of the workers of ``fingerprint`` that listed themselves this epoch."""
    return [info.peer_id.to_base58() for info in
            await dht.find_providers(workers_key(fingerprint, current_epoch()), count=limit)]


async def fetch_record(dht, peer_id: str) -> WorkerRecord | None:
    """The current record of `peer_id`, or None if the DHT has no valid one.

    KadDHT.get_value answers from the local store first and never checks it, so a stale
    copy cached here would hide a fresh one elsewhere for a day: drop it and ask again."""
    key = record_key(peer_id)
    for _ in range(2):
        blob = await dht.get_value(key)
        if blob is None:
            return None
        try:
            return verify_record(blob)
        except RecordError:
            if not dht.value_store.remove(key.encode()):
                return None
    return None


def stored_records(dht, *, now: float | None = None) -> list[WorkerRecord]:
    """Every valid worker record held in this node's own DHT store.

    Kademlia cannot list keys across the network; a DHT server close to the keys (in a
    small swarm, the bootstrap holds every record: workers put to all of their closest
    servers) can list what it stores. Reads KadDHT's store directly."""
    prefix = f"/{NAMESPACE}/worker/".encode()
    records = []
    for key, (entry, _validity) in list(dht.value_store.store.items()):
        if key.startswith(prefix):
            try:
                records.append(verify_record(entry.value, now=now))
            except RecordError:
                pass
    return records
