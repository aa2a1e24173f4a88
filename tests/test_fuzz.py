"""Property-based fuzzing of every decoder that reads peers' bytes: whatever arrives, the
answer is the decoder's own typed error (or a value), never another exception.

12 properties x 1,000 cases = 12,000 cases per run, derandomized so CI sees the same ones.
"""

from __future__ import annotations

import time

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pserve.engine.generate import SamplingParams
from p2pserve.errors import ConfigError, P2PServeError
from p2pserve.net.protocols import Hop
from p2pserve.net.records import RecordError, WorkerRecord, sign_record, verify_record
from p2pserve.net.tickets import TicketError, sign_ticket, verify_ticket
from p2pserve.net.wire import WireError, decode_tensor, read_frame, recv_message

from .test_wire import Pipe

CASES = settings(max_examples=1000, derandomize=True, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# msgpack-shaped values: what a hostile peer can put in a frame
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                      max_leaves=20)
KEY = create_new_key_pair()
HEAD = KEY  # a ticket signer the stage trusts


def _feed(data: bytes) -> Pipe:
    pipe = Pipe()
    pipe.buffer += data
    pipe.closed = True
    return pipe


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@CASES
@given(st.binary(max_size=200))
def test_read_frame_of_any_bytes_is_a_frame_or_a_wire_error(data):
    async def main():
        try:
            msg = await read_frame(_feed(data), timeout=1)
        except (WireError, P2PServeError):
            return
        assert isinstance(msg, dict)

    trio.run(main)


@CASES
@given(st.dictionaries(st.text(max_size=10), values, max_size=6))
def test_recv_message_of_any_map_is_a_message_or_a_wire_error(msg):
    async def main():
        try:
            await recv_message(_feed(_frame(msgpack.packb(msg, use_bin_type=True))), timeout=1)
        except (WireError, P2PServeError):
            pass

    trio.run(main)


tensor_specs = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["float32", "bfloat16", "int64", "float8", ""]), values),
    "shape": st.one_of(st.lists(st.integers(min_value=-3, max_value=2**64 - 1), max_size=10), values),
    "data": st.one_of(st.binary(max_size=64), values),
    "n_chunks": st.one_of(st.integers(min_value=-2, max_value=2**40), values),
})


@CASES
@given(st.one_of(tensor_specs, values))
def test_decode_tensor_of_any_header_is_a_tensor_or_a_wire_error(spec):
    try:
        decode_tensor(spec)
    except WireError:
        pass


@CASES
@given(tensor_specs)
def test_a_chunked_tensor_header_is_checked_before_any_payload(spec):
    spec = {k: v for k, v in spec.items() if k != "data"}
    body = msgpack.packb({"type": "steps", "tensors": {"x": spec}}, use_bin_type=True)

    async def main():
        try:
            await recv_message(_feed(_frame(body)), timeout=1, max_message=1 << 20)
        except (WireError, P2PServeError):
            pass

    trio.run(main)


RECORD = WorkerRecord(peer_id="", addrs=["/ip4/127.0.0.1/tcp/1"], model="m", fingerprint="f", stage=0, start=0,
                      end=2, tp=1, devices=[{"name": "cpu", "memory": 1, "layer_time": 0.001}], group_id="",
                      version="0", load={"sessions": 0}, expires_at=0.0)
record_fields = st.fixed_dictionaries({name: st.one_of(st.just(getattr(RECORD, name)), values)
                                       for name in WorkerRecord.__dataclass_fields__})


@CASES
@given(record_fields)
def test_a_signed_record_with_any_fields_is_a_record_or_a_record_error(fields):
    from libp2p.peer.id import ID

    fields = {**fields, "peer_id": ID.from_pubkey(KEY.public_key).to_base58()}
    if isinstance(fields["expires_at"], float) and fields["expires_at"] == 0.0:
        fields["expires_at"] = time.time() + 20
    envelope_fields = msgpack.packb(fields, use_bin_type=True)
    blob = msgpack.packb({"record": envelope_fields, "pubkey": KEY.public_key.serialize(),
                          "sig": KEY.private_key.sign(b"p2pserve-worker-record:" + envelope_fields)},
                         use_bin_type=True)
    try:
        record = verify_record(blob)
    except RecordError:
        return
    assert 0 <= record.start < record.end and record.tp >= 1 and 1 <= len(record.devices) <= 64


@CASES
@given(st.one_of(st.binary(max_size=300), values, values.map(lambda v: msgpack.packb(v, use_bin_type=True))))
def test_any_record_blob_is_a_record_or_a_record_error(blob):
    try:
        verify_record(blob)
    except RecordError:
        pass


@CASES
@given(st.one_of(st.binary(max_size=300), values, values.map(lambda v: msgpack.packb(v, use_bin_type=True))))
def test_any_ticket_is_a_chain_or_a_ticket_error(blob):
    from libp2p.peer.id import ID

    with pytest.raises(TicketError):
        verify_ticket(blob, {ID.from_pubkey(HEAD.public_key).to_base58()}, "s")


@CASES
@given(st.text(max_size=70), st.floats(min_value=-10, max_value=1000), st.booleans())
def test_a_real_ticket_admits_exactly_its_session_while_fresh(session, ttl, mine):
    from libp2p.peer.id import ID

    assume(not 0 <= ttl <= 1)  # expiring while checked: either answer is right
    signer = HEAD if mine else create_new_key_pair()
    chain = [Hop("peer", ("/ip4/127.0.0.1/tcp/1",), 0, 2)]
    blob = sign_ticket(signer, session, chain, ttl=ttl)
    heads = {ID.from_pubkey(HEAD.public_key).to_base58()}
    for asked in (session, session + "x"):
        if mine and ttl > 0 and asked == session:
            assert verify_ticket(blob, heads, asked) == chain
        else:
            with pytest.raises(TicketError):
                verify_ticket(blob, heads, asked)


@CASES
@given(st.one_of(values, st.fixed_dictionaries({}, optional={
    k: st.one_of(st.integers(min_value=-5, max_value=2**64 - 1), st.floats(allow_nan=True), values)
    for k in ("temperature", "top_k", "top_p", "seed", "max_new_tokens")})))
def test_any_sampling_parameters_are_checked_parameters_or_a_config_error(d):
    try:
        p = SamplingParams.from_dict(d)
    except ConfigError:
        return
    assert type(p.top_k) is int and 0 < p.top_p <= 1 and type(p.max_new_tokens) is int


@pytest.fixture(scope="module")
def head():
    """A Bootstrap with a tokenizer and a model config, no network: for its query decoder."""
    from types import SimpleNamespace

    from p2pserve.bootstrap.server import Bootstrap
    from p2pserve.engine.weights import open_weights

    source = open_weights(None)
    host = SimpleNamespace(get_private_key=lambda: KEY.private_key, get_public_key=lambda: KEY.public_key)
    return Bootstrap(host, source.config, source.tokenizer(), [])


query_fields = st.fixed_dictionaries({}, optional={
    "type": st.one_of(st.just("query"), values), "prompt": st.one_of(st.text(max_size=30), values),
    "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                          "content": st.text(max_size=20)}), max_size=3), values),
    "tokens": st.one_of(st.lists(st.integers(min_value=-5, max_value=60000), max_size=8), values),
    "params": st.one_of(st.just({"max_new_tokens": 4}), values), "model": values, "chat": values,
    "stop_on_eos": values})


@CASES
@given(query_fields)
def test_any_query_is_a_prepared_query_or_a_typed_error(head, msg):
    try:
        prompt, params, pipeline, stop_on_eos = head.prepare(msg)
    except P2PServeError as e:
        assert e.code in ("bad_request", "unknown_model"), e
        return
    assert prompt and all(0 <= t < head.config.vocab_size for t in prompt) and isinstance(stop_on_eos, bool)


@CASES
@given(st.dictionaries(st.text(max_size=10), values, max_size=8))
def test_any_worker_record_map_is_a_record_or_a_record_error(d):
    from p2pserve.net.records import _record_from_dict

    try:
        _record_from_dict({**{k: getattr(RECORD, k) for k in WorkerRecord.__dataclass_fields__}, **d})
    except RecordError:
        pass


def test_a_record_signed_by_its_peer_still_verifies():
    from libp2p.peer.id import ID
    import dataclasses

    record = dataclasses.replace(RECORD, peer_id=ID.from_pubkey(KEY.public_key).to_base58(),
                                 expires_at=time.time() + 20)
    assert verify_record(sign_record(record, KEY)) == record
