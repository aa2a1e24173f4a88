"""The wire format: frames, tensors and chunked messages, on an in-memory stream and on
real libp2p streams between two hosts on 127.0.0.1."""

from contextlib import asynccontextmanager

import msgpack
import pytest
import torch
import trio

from p2pserve.net.wire import (
    MAX_FRAME,
    FrameError,
    RemoteError,
    StreamClosed,
    TensorError,
    WireError,
    WireTimeout,
    check_tensor,
    decode_tensor,
    encode_tensor,
    error_frame,
    protocol_id,
    read_frame,
    recv_message,
    send_message,
    write_frame,
    write_frames,
)


class Pipe:
    """One direction of an in-memory stream. read(n) returns at most `max_read` bytes,
    like a libp2p stream that hands over whatever has arrived."""

    def __init__(self, max_read: int = 1 << 30):
        self.buffer = bytearray()
        self.max_read = max_read
        self.closed = False
        self.was_reset = False
        self.frames_written = 0
        self.block_writes = False
        self._changed = trio.Event()

    async def write(self, data: bytes) -> None:
        if self.was_reset:
            raise ConnectionResetError("stream reset")
        if self.block_writes:  # a peer that stopped reading
            await trio.sleep_forever()
        self.buffer += data
        self.frames_written += 1
        self._wake()

    async def read(self, n: int) -> bytes:
        while not self.buffer:
            if self.was_reset:
                raise ConnectionResetError("stream reset")
            if self.closed:
                raise EOFError
            await self._changed.wait()
        data = bytes(self.buffer[: min(n, self.max_read)])
        del self.buffer[: len(data)]
        return data

    async def close(self) -> None:
        self.closed = True
        self._wake()

    async def reset(self) -> None:
        self.was_reset = True
        self._wake()

    def _wake(self):
        self._changed.set()
        self._changed = trio.Event()


def raw_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


# --- frames -----------------------------------------------------------------------------


async def test_frames_round_trip_through_a_stream_that_returns_a_few_bytes_per_read():
    pipe = Pipe(max_read=3)
    messages = [{"type": "hello", "n": 1}, {"nested": {"list": [1, 2.5, "x"], "blob": b"\x00\xff"}}]
    for msg in messages:
        await write_frame(pipe, msg)
    assert [await read_frame(pipe) for _ in messages] == messages


async def test_clean_end_of_stream_between_frames_is_stream_closed():
    pipe = Pipe()
    await write_frame(pipe, {"a": 1})
    await pipe.close()
    assert await read_frame(pipe) == {"a": 1}
    with pytest.raises(StreamClosed):
        await read_frame(pipe)


@pytest.mark.parametrize("sent", [b"\x00\x00", raw_frame(msgpack.packb({"a": "x" * 100}))[:50]])
async def test_stream_ending_mid_frame_is_a_frame_error(sent):
    pipe = Pipe()
    await pipe.write(sent)
    await pipe.close()
    with pytest.raises(FrameError, match="peer closed the stream mid-frame"):
        await read_frame(pipe)


async def test_malformed_msgpack_is_a_frame_error_and_the_stream_stays_usable():
    pipe = Pipe()
    await pipe.write(raw_frame(b"\xc1garbage"))
    await pipe.write(raw_frame(msgpack.packb([1, 2, 3])))
    await write_frame(pipe, {"next": True})
    with pytest.raises(FrameError, match="not valid msgpack"):
        await read_frame(pipe)
    with pytest.raises(FrameError, match="expected a map"):
        await read_frame(pipe)
    assert await read_frame(pipe) == {"next": True}
    assert not pipe.was_reset


async def test_oversized_frame_is_refused_without_waiting_for_its_body():
    pipe = Pipe()
    await pipe.write((1000).to_bytes(4, "big") + b"x" * 10)  # 990 bytes never come
    with trio.fail_after(1):
        with pytest.raises(FrameError, match="1000 bytes exceeds the limit of 100 bytes"):
            await read_frame(pipe, max_size=100)
    assert pipe.was_reset


class CountingPipe(Pipe):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.reads = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        return await super().read(n)


async def test_a_frame_that_arrived_whole_takes_one_read_and_bytes_read_ahead_wait_for_the_next_frame():
    """Every py-libp2p read costs yamux's locks and a window update written back."""
    pipe = CountingPipe()
    messages = [{"i": i, "pad": b"p" * 100 * i} for i in range(5)]
    await write_frames(pipe, messages)
    assert [await read_frame(pipe) for _ in messages] == messages
    assert pipe.reads == 1
    await write_frame(pipe, {"later": True})
    assert await read_frame(pipe) == {"later": True} and pipe.reads == 2


async def test_a_frame_cut_short_after_bytes_read_ahead_still_resets_the_stream():
    pipe = Pipe()
    body = msgpack.packb({"a": 1})
    await pipe.write(raw_frame(msgpack.packb({"first": 1})) + raw_frame(body)[:6])
    assert await read_frame(pipe) == {"first": 1}
    with pytest.raises(WireTimeout, match=r"got 6 bytes"):
        await read_frame(pipe, timeout=0.05)
    assert pipe.was_reset


async def test_writer_refuses_a_frame_above_the_limit_before_sending_anything():
    pipe = Pipe()
    with pytest.raises(FrameError, match="exceeds the limit of 100 bytes"):
        await write_frame(pipe, {"data": b"x" * 200}, max_size=100)
    assert pipe.buffer == b""


async def test_several_frames_go_in_one_write_and_are_read_one_by_one():
    pipe = Pipe(max_read=5)
    messages = [{"type": "tokens", "tokens": [1, 2]}, {"type": "done", "n_tokens": 2}]
    await write_frames(pipe, messages)
    assert pipe.frames_written == 1
    assert [await read_frame(pipe) for _ in messages] == messages


async def test_write_frames_sends_nothing_if_one_frame_is_above_the_limit():
    pipe = Pipe()
    with pytest.raises(FrameError, match="exceeds the limit of 100 bytes"):
        await write_frames(pipe, [{"ok": 1}, {"data": b"x" * 200}], max_size=100)
    assert pipe.buffer == b"" and pipe.frames_written == 0


async def test_read_without_data_times_out(autojump_clock):
    pipe = Pipe()
    with pytest.raises(WireTimeout, match="no complete frame within 5 s"):
        await read_frame(pipe, timeout=5)
    assert not pipe.was_reset  # nothing of a frame was read: the stream is still in step


async def test_read_timing_out_mid_frame_resets_the_stream(autojump_clock):
    pipe = Pipe()
    await pipe.write(raw_frame(msgpack.packb({"a": 1}))[:6])
    with pytest.raises(WireTimeout):
        await read_frame(pipe, timeout=5)
    assert pipe.was_reset


async def test_write_that_cannot_finish_times_out_and_resets_the_stream(autojump_clock):
    pipe = Pipe()
    pipe.block_writes = True
    with pytest.raises(WireTimeout, match="the stream was reset"):
        await write_frame(pipe, {"a": 1}, timeout=2)
    assert pipe.was_reset


async def test_write_cancelled_from_outside_resets_the_stream(autojump_clock):
    pipe = Pipe()
    pipe.block_writes = True
    with trio.move_on_after(1):
        await write_frame(pipe, {"a": 1})
    assert pipe.was_reset


async def test_writing_to_a_reset_stream_is_stream_closed():
    pipe = Pipe()
    await pipe.reset()
    with pytest.raises(StreamClosed, match="cannot write"):
        await write_frame(pipe, {"a": 1})


async def test_error_frames_raise_remote_error_with_code_and_message():
    pipe = Pipe()
    await write_frame(pipe, error_frame("unknown_session", "no session 42"))
    await write_frame(pipe, error_frame("busy", "queue full"))
    await write_frame(pipe, error_frame("shape", "bad"))
    with pytest.raises(RemoteError) as info:
        await read_frame(pipe)
    assert (info.value.code, info.value.message) == ("unknown_session", "no session 42")
    assert await read_frame(pipe, raise_remote=False) == error_frame("busy", "queue full")
    with pytest.raises(RemoteError, match="shape: bad"):
        await recv_message(pipe)


def test_error_frame_refuses_an_unknown_code():
    with pytest.raises(ValueError, match="unknown error code"):
        error_frame("oops", "x")


def test_protocol_id():
    assert protocol_id("step") == "/p2pserve/step/1.0.0"


# --- tensors ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32])
def test_tensor_round_trips_bit_exactly(dtype):
    t = (torch.randn(2, 3, 5) * 1000).to(dtype)
    d = encode_tensor(t)
    assert d["shape"] == [2, 3, 5] and len(d["data"]) == t.numel() * t.element_size()
    back = decode_tensor(msgpack.unpackb(msgpack.packb(d)))
    assert back.dtype == dtype and torch.equal(back, t)
    back += 1  # received tensors are writable


@pytest.mark.parametrize("shape", [(), (0,), (4, 0, 2)])
def test_scalar_and_empty_tensors_round_trip(shape):
    t = torch.ones(shape)
    assert torch.equal(decode_tensor(encode_tensor(t)), t)


def test_non_contiguous_tensor_is_sent_as_its_values():
    t = torch.arange(12.0).reshape(3, 4).T
    assert torch.equal(decode_tensor(encode_tensor(t)), t)


def test_decode_checks_expected_shape_and_dtype():
    d = encode_tensor(torch.zeros(1, 3, 576))
    assert decode_tensor(d, shape=[1, None, 576], dtype=torch.float32).shape == (1, 3, 576)
    with pytest.raises(TensorError, match=r"expected shape \[1, 1, 576\], got \[1, 3, 576\]"):
        decode_tensor(d, shape=[1, 1, 576])
    with pytest.raises(TensorError, match=r"expected shape \[\*, 576\], got \[1, 3, 576\]"):
        decode_tensor(d, shape=[None, 576])
    with pytest.raises(TensorError, match="expected dtype bfloat16, got float32"):
        decode_tensor(d, dtype="bfloat16")
    with pytest.raises(TensorError, match="expected dtype float16, got float32"):
        check_tensor(decode_tensor(d), dtype=torch.float16)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"dtype": "float64", "shape": [1], "data": b"\0" * 8}, "unknown tensor dtype 'float64'"),
        ({"dtype": "float32", "shape": [2, 2], "data": b"\0" * 12}, "12 bytes, expected 16"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, "shape must be a list"),
        ({"dtype": "float32", "shape": [1], "data": "text"}, "data must be bytes"),
        ([1, 2], "a tensor is a map"),
    ],
)
def test_decode_rejects_inconsistent_tensors(bad, message):
    with pytest.raises(TensorError, match=message):
        decode_tensor(bad)


def test_tensor_errors_carry_the_shape_error_code():
    assert TensorError("x").code == "shape" and FrameError("x").code == "bad_request"


def test_unsupported_dtype_cannot_be_sent():
    with pytest.raises(TensorError, match="cannot send a torch.float64 tensor"):
        encode_tensor(torch.zeros(2, dtype=torch.float64))


# --- messages ---------------------------------------------------------------------------


async def test_small_message_with_tensors_is_one_frame():
    pipe = Pipe()
    hidden, ids = torch.randn(1, 1, 576), torch.tensor([[5, 7]])
    await send_message(pipe, {"type": "step", "session": "s1"}, {"hidden": hidden, "ids": ids})
    assert pipe.frames_written == 1
    msg, tensors = await recv_message(pipe)
    assert msg == {"type": "step", "session": "s1"}
    assert torch.equal(tensors["hidden"], hidden) and torch.equal(tensors["ids"], ids)


async def test_tensor_three_times_the_frame_limit_is_chunked_and_rejoined():
    pipe = Pipe(max_read=10_000)
    max_size = 64 * 1024
    big = torch.randn(3 * max_size // 4 + 5)  # 3 frames' worth of float32, plus a bit
    small = torch.arange(4)
    await send_message(pipe, {"type": "prefill"}, {"big": big, "small": small}, max_size=max_size)
    assert pipe.frames_written >= 5  # header + 4 chunks
    msg, tensors = await recv_message(pipe, max_size=max_size)
    assert msg == {"type": "prefill"}
    assert torch.equal(tensors["big"], big) and torch.equal(tensors["small"], small)


async def test_message_above_the_message_limit_is_refused_on_both_sides():
    pipe = Pipe()
    with pytest.raises(WireError, match="above the limit of 1000 bytes"):
        await send_message(pipe, {}, {"t": torch.zeros(1000)}, max_message=1000)
    await send_message(pipe, {}, {"t": torch.zeros(1000)}, max_size=1024)
    with pytest.raises(WireError, match="more than 1000 bytes"):
        await recv_message(pipe, max_size=1024, max_message=1000)
    assert pipe.was_reset  # its chunks would otherwise be read as the next message


async def test_chunk_out_of_order_is_a_frame_error_and_resets_the_stream():
    pipe = Pipe()
    header = {"tensors": {"t": {"dtype": "float32", "shape": [2], "n_chunks": 2}}}
    await write_frame(pipe, header)
    await write_frame(pipe, {"tensor": "t", "i": 1, "data": b"\0" * 4})
    with pytest.raises(FrameError, match="expected chunk 0 of tensor 't'"):
        await recv_message(pipe)
    assert pipe.was_reset


async def test_reserved_tensors_key_is_refused():
    with pytest.raises(ValueError, match="reserved"):
        await send_message(Pipe(), {"tensors": 1}, {})


# --- over real libp2p streams -------------------------------------------------------------


@asynccontextmanager
async def two_connected_hosts():
    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pserve.net.host import connect, host_multiaddrs, quiet_libp2p_logs, running_host

    quiet_libp2p_logs()
    listen = ["/ip4/127.0.0.1/tcp/0"]
    with trio.fail_after(20):
        async with (
            running_host(create_new_key_pair(), listen) as server,
            running_host(create_new_key_pair(), listen) as client,
        ):
            await connect(client, host_multiaddrs(server)[0], timeout=5)
            yield server, client


ECHO = protocol_id("test-echo")


async def echo_messages(stream):
    """Echo every message back with its tensors doubled; answer a bad frame with an
    error frame, as a p2pserve server does."""
    try:
        while True:
            try:
                msg, tensors = await recv_message(stream, max_size=64 * 1024, timeout=5)
            except StreamClosed:
                return
            except WireError as e:
                await write_frame(stream, error_frame(e.code, str(e)))
                return
            doubled = {name: t * 2 for name, t in tensors.items()}
            await send_message(stream, msg, doubled, max_size=64 * 1024, timeout=5)
    except WireError:
        pass  # the client went away


async def test_messages_cross_real_libp2p_streams_in_one_frame_and_in_chunks():
    async with two_connected_hosts() as (server, client):
        server.set_stream_handler(ECHO, echo_messages)
        stream = await client.new_stream(server.get_id(), [ECHO])
        for tensor in [torch.randn(1, 1, 576), torch.randn(1, 100, 576).to(torch.bfloat16)]:
            with trio.fail_after(10):
                await send_message(stream, {"type": "step"}, {"h": tensor}, max_size=64 * 1024)
                msg, back = await recv_message(stream, max_size=64 * 1024)
            assert msg == {"type": "step"} and torch.equal(back["h"], tensor * 2)
        await stream.close()


async def test_oversized_frame_on_one_stream_leaves_the_peer_serving_other_streams():
    async with two_connected_hosts() as (server, client):
        server.set_stream_handler(ECHO, echo_messages)
        bad = await client.new_stream(server.get_id(), [ECHO])
        good = await client.new_stream(server.get_id(), [ECHO])
        with trio.fail_after(10):
            with pytest.raises(WireError):  # the server refused and reset the stream: the
                await write_frame(bad, {"blob": b"x" * (128 * 1024)}, max_size=MAX_FRAME)
                await read_frame(bad)  # reset reaches the client mid-write or at its next read
            await send_message(good, {"n": 1}, {"t": torch.ones(3)})
            msg, back = await recv_message(good)
        assert msg == {"n": 1} and torch.equal(back["t"], torch.full((3,), 2.0))


async def test_bad_request_gets_an_error_frame_over_libp2p():
    async with two_connected_hosts() as (server, client):
        server.set_stream_handler(ECHO, echo_messages)
        stream = await client.new_stream(server.get_id(), [ECHO])
        bad = {"tensors": {"h": {"dtype": "float64", "shape": [1], "data": b"\0" * 8}}}
        with trio.fail_after(10):
            await write_frame(stream, bad)
            with pytest.raises(RemoteError) as info:
                await read_frame(stream)
        assert info.value.code == "shape" and "float64" in info.value.message


async def test_peer_closing_mid_frame_is_a_frame_error_over_libp2p():
    async def half_a_frame(stream):
        await stream.write(raw_frame(msgpack.packb({"a": "x" * 1000}))[:300])
        await stream.close()

    async with two_connected_hosts() as (server, client):
        server.set_stream_handler(ECHO, half_a_frame)
        stream = await client.new_stream(server.get_id(), [ECHO])
        with trio.fail_after(10), pytest.raises(FrameError, match="mid-frame"):
            await read_frame(stream)


async def test_write_cut_short_by_its_deadline_never_lets_the_reader_see_a_spliced_frame():
    seen = []

    async def reader(stream):
        try:
            seen.append(await read_frame(stream, timeout=10, max_size=64 * 2**20))
            seen.append(await read_frame(stream, timeout=10, max_size=64 * 2**20))
        except WireError as e:
            seen.append(e)

    async with two_connected_hosts() as (server, client):
        server.set_stream_handler(ECHO, reader)
        stream = await client.new_stream(server.get_id(), [ECHO])
        with pytest.raises(WireTimeout, match="the stream was reset"):
            await write_frame(stream, {"blob": b"x" * 32 * 2**20}, timeout=0.05, max_size=64 * 2**20)
        with pytest.raises(StreamClosed):
            await write_frame(stream, {"next": 1})
        with trio.fail_after(10):
            while not seen:
                await trio.sleep(0.01)
    assert len(seen) == 1 and isinstance(seen[0], (FrameError, StreamClosed))
