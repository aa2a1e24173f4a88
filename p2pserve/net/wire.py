"""The wire format: length-prefixed msgpack frames on a libp2p stream, and tensors inside them.

A frame is a 4-byte big-endian body length followed by a msgpack map. Every read and
write has a deadline, every frame a size limit, and nothing is unpickled: a tensor
travels as {"dtype", "shape", "data": raw little-endian bytes}.

A *message* is one header frame plus, for tensors too big to ride inside it, chunk
frames that follow in order:

    header  {**msg, "tensors": {name: {"dtype", "shape", "data"}            # inline
                                name: {"dtype", "shape", "n_chunks": k}}}   # chunked
    chunk   {"tensor": name, "i": 0..k-1, "data": bytes}                     # k of them

`send_message` / `recv_message` do the splitting so callers never think about frame
sizes. A decode step's hidden state and a few-hundred-token prefill both fit inline:
one frame per hop.

Streams are duck-typed: anything with `await read(n)`, `await write(b)` and
`await reset()` (a libp2p `INetStream`, or an in-memory fake in tests). py-libp2p
signals end of stream with `StreamEOF`, an `EOFError`; any other exception from a read
or write means the stream was reset or broke.
"""

from __future__ import annotations

import math
import struct
import weakref
from typing import TYPE_CHECKING, NewType

import msgpack
import torch
import trio

from p2pserve.errors import NetworkError, P2PServeError

if TYPE_CHECKING:
    from libp2p.custom_types import TProtocol
else:  # the same NewType of str, without importing libp2p (seconds) for a name
    TProtocol = NewType("TProtocol", str)

MAX_FRAME = 8 * 2**20  # bytes of msgpack body in one frame
MAX_MESSAGE = 2**30  # bytes of tensor data in one message
DEFAULT_TIMEOUT = 30.0  # seconds, per frame

ERROR_CODES = frozenset(
    {"bad_request", "unknown_session", "unknown_model", "busy", "shape", "internal", "no_pipeline",
     "stage_failed", "forbidden", "identity_in_use"}
)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

_LENGTH = struct.Struct(">I")
READ_AHEAD = 64 * 1024  # bytes asked of a stream per read, beyond what a frame still needs
# Bytes read past the end of the last frame, waiting for the stream's next read_frame.
_read_ahead: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RESET_GRACE = 1.0  # seconds a reset may take before we give up on telling the peer


def protocol_id(name: str) -> TProtocol:
    """`/p2pserve/<name>/1.0.0`, the libp2p protocol id of one p2pserve protocol."""
    return TProtocol(f"/p2pserve/{name}/1.0.0")


# --- errors -----------------------------------------------------------------------------


class WireError(NetworkError):
    """A frame or message could not be sent or received. `code` is the error-frame code
    a server answers with when the fault was the peer's."""

    code = "bad_request"


class FrameError(WireError):
    """A frame was truncated, too large or not a msgpack map."""


class TensorError(WireError):
    """A tensor's dtype, shape or byte count is not what it claims or what was expected."""

    code = "shape"


class WireTimeout(WireError):
    """A read or write did not finish before its deadline (a frozen or overloaded peer)."""


class StreamClosed(WireError):
    """The peer closed or reset the stream between frames (or it broke under a write)."""


class RemoteError(P2PServeError):
    """The peer answered with an error frame: its code, and its message as ``message``."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code)

    def __str__(self) -> str:
        return f"peer answered {self.code}: {self.message}"


def error_frame(code: str, message: str) -> dict:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}; known codes: {sorted(ERROR_CODES)}")
    return {"type": "error", "code": code, "message": message}


def _raise_if_error(msg: dict) -> dict:
    if msg.get("type") == "error":
        raise RemoteError(str(msg.get("code", "internal")), str(msg.get("message", "")))
    return msg


# --- frames -----------------------------------------------------------------------------


async def reset_stream(stream) -> None:
    """Reset `stream`, even inside a cancelled scope, giving up after a second (a frozen
    connection must not hang the caller). Errors are ignored: the stream is dead either way."""
    _read_ahead.pop(stream, None)
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + _RESET_GRACE
        try:
            await stream.reset()
        except Exception:
            pass


async def write_frame(stream, msg: dict, timeout: float = DEFAULT_TIMEOUT, *, max_size: int = MAX_FRAME):
    """Send one frame. A frame above `max_size` is refused before a byte is sent."""
    await write_frames(stream, [msg], timeout, max_size=max_size)


async def write_frames(stream, msgs: list[dict], timeout: float = DEFAULT_TIMEOUT, *,
                       max_size: int = MAX_FRAME) -> None:
    """Send several frames in one write: the reader sees them as separate frames, but the
    muxer, Noise and the socket handle them once (0.1-0.3 ms of Python per libp2p write
    on each side). Nothing is sent if any frame is refused."""
    parts = []
    for msg in msgs:
        if not isinstance(msg, dict):
            raise TypeError(f"a frame is a dict, got {type(msg).__name__}")
        body = msgpack.packb(msg, use_bin_type=True)
        if len(body) > max_size:
            raise FrameError(f"frame of {len(body)} bytes exceeds the limit of {max_size} bytes")
        parts += (_LENGTH.pack(len(body)), body)
    await _write(stream, b"".join(parts), timeout)


writes_in_flight = 0  # writes of this process under way (a CPU pass waits for them: node/compute.py)


async def _write(stream, data: bytes, timeout: float) -> None:
    # A write cut short leaves half a frame on the stream and py-libp2p would happily
    # accept the next one after it, so any write that does not finish resets the stream.
    global writes_in_flight
    writes_in_flight += 1
    done = False
    try:
        with trio.fail_after(timeout):
            await stream.write(data)
        done = True
    except trio.TooSlowError:
        raise WireTimeout(
            f"could not write {len(data)} bytes within {timeout:g} s; the stream was reset"
        ) from None
    except Exception as e:
        raise StreamClosed(f"cannot write: the stream is closed or reset ({_describe(e)})") from e
    finally:
        writes_in_flight -= 1
        if not done:
            await reset_stream(stream)


async def read_frame(
    stream,
    timeout: float = DEFAULT_TIMEOUT,
    max_size: int = MAX_FRAME,
    *,
    raise_remote: bool = True,
) -> dict:
    """Read one frame, as a dict. An error frame raises RemoteError unless `raise_remote`
    is False. Clean end of stream before the frame starts raises StreamClosed.

    If the frame is cut short, too large, or its deadline passes mid-frame, the stream
    can no longer be read in step, so it is reset before the error is raised. A frame
    that arrived whole but is not a msgpack map leaves the stream usable."""
    reader = _FrameReader(stream)
    try:
        with trio.fail_after(timeout):
            body = await reader.read_body(max_size)
    except trio.TooSlowError:
        raise WireTimeout(
            f"no complete frame within {timeout:g} s (got {reader.got} bytes)"
        ) from None
    finally:
        if reader.partial:
            await reset_stream(stream)
    msg = _unpack(body)
    return _raise_if_error(msg) if raise_remote else msg


class _FrameReader:
    def __init__(self, stream):
        self.stream = stream
        self.got = 0  # bytes of the current frame received so far
        self.size = None  # frame length once the prefix is in
        self.done = False

    @property
    def partial(self) -> bool:
        return self.got > 0 and not self.done

    async def read_body(self, max_size: int) -> bytes:
        (self.size,) = _LENGTH.unpack(await self._read_exactly(_LENGTH.size))
        if self.size > max_size:
            raise FrameError(
                f"frame of {self.size} bytes exceeds the limit of {max_size} bytes"
            )
        body = await self._read_exactly(self.size)
        self.done = True
        return body

    async def _read_exactly(self, n: int) -> bytes:
        # Ask for more than this frame needs: a whole frame (prefix and body), or several,
        # usually come in one read, and each py-libp2p read costs a trip through yamux's
        # locks. Bytes past this frame wait in _read_ahead for the stream's next frame.
        buf = _read_ahead.pop(self.stream, None) or bytearray()
        try:
            while len(buf) < n and (chunk := await self._read(max(n - len(buf), READ_AHEAD))):
                buf += chunk
        finally:  # after a deadline or a broken stream too: what came is this frame's
            self.got += min(len(buf), n)
        if len(buf) < n:
            raise self._eof()
        if len(buf) > n:
            _read_ahead[self.stream] = buf[n:]
            del buf[n:]
        return buf

    async def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at the end of the stream."""
        try:
            return await self.stream.read(n)
        except EOFError:
            return b""
        except Exception as e:
            raise StreamClosed(f"the stream was reset or broke ({_describe(e)})") from e

    def _eof(self) -> WireError:
        if self.got == 0:
            return StreamClosed("peer closed the stream")
        if self.size is None:
            return FrameError(
                f"peer closed the stream mid-frame ({self.got} of 4 length-prefix bytes)"
            )
        return FrameError(
            f"peer closed the stream mid-frame ({self.got} of {4 + self.size} bytes)"
        )


def _unpack(body) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise FrameError(f"frame is not valid msgpack: {e}") from None
    if not isinstance(msg, dict):
        raise FrameError(f"frame is a msgpack {type(msg).__name__}, expected a map")
    return msg


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# --- tensors ----------------------------------------------------------------------------


def encode_tensor(t: torch.Tensor) -> dict:
    """{"dtype", "shape", "data"} with the raw little-endian element bytes."""
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise TensorError(f"cannot send a {t.dtype} tensor; supported dtypes: {', '.join(DTYPES)}")
    flat = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)  # numpy has no bfloat16; the bytes are the same
    return {"dtype": name, "shape": list(t.shape), "data": flat.numpy().tobytes()}


def decode_tensor(d: dict, *, shape=None, dtype=None) -> torch.Tensor:
    """The tensor `d` describes, after checking that it is consistent (known dtype, byte
    count matching its shape) and, when given, that it has the expected `shape` (None
    entries match any size) and `dtype` (a name or a torch.dtype)."""
    if not isinstance(d, dict):
        raise TensorError(f"a tensor is a map with dtype, shape and data, got {type(d).__name__}")
    got_dtype, got_shape = _check_header(d)
    _check_expected(got_shape, got_dtype, shape, dtype)
    data = d.get("data")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TensorError(f"tensor data must be bytes, got {type(data).__name__}")
    expected = _nbytes(got_shape, got_dtype)
    if len(data) != expected:
        raise TensorError(
            f"tensor data is {len(data)} bytes, expected {expected} for shape {got_shape} {got_dtype}"
        )
    return _tensor_from_buffer(bytearray(data), got_dtype, got_shape)


def check_tensor(t: torch.Tensor, *, shape=None, dtype=None) -> torch.Tensor:
    """`t` itself if it has the expected shape (None entries match any size) and dtype,
    else TensorError naming expected and got."""
    _check_expected(list(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype)), shape, dtype)
    return t


MAX_DIMS = 8
MAX_DIM = 2**31 - 1  # elements along one dimension


def _check_header(d: dict) -> tuple[str, list[int]]:
    dtype = d.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise TensorError(f"unknown tensor dtype {str(dtype)[:64]!r}; expected one of {', '.join(DTYPES)}")
    shape = d.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_DIM for n in shape
    ):
        raise TensorError(f"tensor shape must be a list of at most {MAX_DIMS} sizes in [0, {MAX_DIM}], "
                          f"got {str(shape)[:100]}")
    return dtype, shape


def _check_expected(got_shape: list[int], got_dtype: str, shape, dtype) -> None:
    if dtype is not None:
        want = DTYPE_NAMES.get(dtype, dtype)
        if got_dtype != want:
            raise TensorError(f"expected dtype {want}, got {got_dtype}")
    if shape is not None:
        want = list(shape)
        if len(want) != len(got_shape) or any(
            w is not None and w != g for w, g in zip(want, got_shape)
        ):
            shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
            raise TensorError(f"expected shape {shown}, got {got_shape}")


def _nbytes(shape: list[int], dtype: str) -> int:
    return math.prod(shape) * DTYPES[dtype].itemsize


def _tensor_from_buffer(buf: bytearray, dtype: str, shape: list[int]) -> torch.Tensor:
    # `buf` is ours and writable, so the tensor may share it without a copy.
    if not buf:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)


# --- messages ---------------------------------------------------------------------------

_SPEC_SLACK = 128  # msgpack bytes of one inline tensor's map besides its data and name


async def send_message(
    stream,
    msg: dict,
    tensors: dict[str, torch.Tensor] | None = None,
    max_size: int = MAX_FRAME,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    max_message: int = MAX_MESSAGE,
) -> None:
    """Send `msg` with `tensors`: inline in one frame when they fit, else the big ones in
    chunk frames after it. `timeout` applies to each frame."""
    if "tensors" in msg:
        raise ValueError("'tensors' is reserved in a message; pass tensors separately")
    encoded = {name: encode_tensor(t) for name, t in (tensors or {}).items()}
    total = sum(len(e["data"]) for e in encoded.values())
    if total > max_message:
        raise WireError(
            f"message carries {total} bytes of tensors, above the limit of {max_message} bytes"
        )

    specs, chunked = {}, []
    budget = max_size - len(msgpack.packb(msg, use_bin_type=True)) - _SPEC_SLACK
    for name, enc in encoded.items():
        cost = len(enc["data"]) + len(name.encode()) + 16 * len(enc["shape"]) + _SPEC_SLACK
        if cost <= budget:
            specs[name] = enc
            budget -= cost
        else:
            step = max_size - _SPEC_SLACK - len(name.encode())
            n_chunks = max(1, math.ceil(len(enc["data"]) / step))
            specs[name] = {"dtype": enc["dtype"], "shape": enc["shape"], "n_chunks": n_chunks}
            chunked.append((name, memoryview(enc["data"]), step, n_chunks))

    await write_frame(stream, {**msg, "tensors": specs}, timeout, max_size=max_size)
    for name, data, step, n_chunks in chunked:
        for i in range(n_chunks):
            chunk = {"tensor": name, "i": i, "data": data[i * step : (i + 1) * step]}
            await write_frame(stream, chunk, timeout, max_size=max_size)


async def recv_message(
    stream,
    max_size: int = MAX_FRAME,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    max_message: int = MAX_MESSAGE,
    raise_remote: bool = True,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Receive one message sent by `send_message`: (msg without "tensors", {name: tensor}).
    Each tensor is checked for consistency; checking it against what the protocol
    expects is the caller's job (`check_tensor`). `timeout` applies to each frame.
    If the message turns out bad after its header, the stream is reset (its remaining
    chunk frames would otherwise be read as the next message)."""
    msg = await read_frame(stream, timeout, max_size, raise_remote=raise_remote)
    specs = msg.pop("tensors", {})
    if not isinstance(specs, dict):
        raise FrameError(f"'tensors' must be a map of name to tensor, got {type(specs).__name__}")
    chunks_follow = any(isinstance(s, dict) and "data" not in s for s in specs.values())
    try:
        return msg, await _receive_tensors(stream, specs, max_size, timeout, max_message)
    except BaseException:
        if chunks_follow:
            await reset_stream(stream)
        raise


async def _receive_tensors(stream, specs: dict, max_size, timeout, max_message) -> dict:
    tensors, pending, total = {}, [], 0
    for name, spec in specs.items():
        if not isinstance(spec, dict):
            raise FrameError(f"tensor {name!r} is a {type(spec).__name__}, expected a map")
        if "data" in spec:
            tensors[name] = decode_tensor(spec)
            continue
        dtype, shape = _check_header(spec)
        nbytes = _nbytes(shape, dtype)
        total += nbytes
        if total > max_message:
            raise WireError(
                f"message carries more than {max_message} bytes of tensors (limit exceeded at {name!r})"
            )
        n_chunks = spec.get("n_chunks")
        if not isinstance(n_chunks, int) or not 1 <= n_chunks <= max(1, nbytes):
            raise FrameError(f"tensor {name!r} has a bad chunk count {n_chunks!r}")
        pending.append((name, dtype, shape, nbytes, n_chunks))

    for name, dtype, shape, nbytes, n_chunks in pending:
        buf = bytearray()
        for i in range(n_chunks):
            frame = await read_frame(stream, timeout, max_size)
            data = frame.get("data")
            if frame.get("tensor") != name or frame.get("i") != i or not isinstance(data, bytes):
                raise FrameError(
                    f"expected chunk {i} of tensor {name!r}, got a frame with keys {sorted(frame)}"
                )
            if len(buf) + len(data) > nbytes:
                raise FrameError(f"chunks of tensor {name!r} exceed its {nbytes} bytes")
            buf += data
        if len(buf) != nbytes:
            raise FrameError(f"tensor {name!r} arrived with {len(buf)} of its {nbytes} bytes")
        tensors[name] = _tensor_from_buffer(buf, dtype, shape)
    return tensors
