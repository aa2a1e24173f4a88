"""Fast paths through py-libp2p's stream stack, installed by ``p2pserve.net.host.make_host``.

A frame written on a libp2p stream goes NetStream -> YamuxStream -> Yamux -> Noise ->
TCP, each layer async, each with its own trio lock, and trio's ``Lock.acquire`` yields
to the scheduler even when the lock is free: seven scheduler turns per write, five in
yamux's reader task and four in the reading task per frame read, plus ~30 us of Python
per frame in that reader. On a CPU worker all of it runs on cores whose caches a
forward pass has just evicted: in a two-worker swarm a decode step's 2.3 KB write took
~0.4 ms and its delivery ~0.5 ms. None of those locks is contended on that path, and
trio runs one task at a time, so while every lock is free and every state is plain the
same work needs no turn in between. Each patch does that and hands anything else (a lock
held, a full window, a closing stream, a large write, a flag on a frame) to py-libp2p's
own code; the bytes on the wire do not change, so peers without them interoperate:

- ``QuickLock`` for the TCP stream's read and write locks, the yamux connection's
  stream-table and write locks, a yamux stream's window lock, a NetStream's state lock.
- ``NetStream.write``: a write that fits the yamux send window and one Noise message is
  framed, encrypted and written to the socket directly: no scheduler turn when the
  kernel takes it whole (``_send_all``).
- ``NetStream.read``: bytes in the stream's yamux buffer are returned at once; otherwise
  the read waits on the stream's event (the one turn it needs) and looks again.
- Noise transport reads: one socket read of up to 64 KiB for the 2-byte length and the
  message (usually several), instead of one exact read each; and a message that is one
  plain yamux DATA frame for an open stream goes straight to that stream (``_Demux``).
- Yamux receive-window credit: in one update per 64 KiB read (``_defer_credit``).

``python bench/hop.py`` (2-core VM, loopback): decode-step frame round trip 0.57-0.62 ms
without these (``P2PSERVE_FASTIO=0``), 0.29-0.36 ms with them (raw TCP 0.16-0.17 ms); a
1.18 MB prefill message 6.1-6.5 -> 4.1-4.9 ms. ``P2PSERVE_FASTIO=0`` in the environment
leaves py-libp2p untouched. Anything this was not written against (a class or attribute
missing: another py-libp2p) is left alone too, with a log line saying so.
"""

from __future__ import annotations

import logging
import os
import struct
import weakref

import trio

log = logging.getLogger("p2pserve.net.host")

NOISE_READ = 64 * 1024  # bytes asked of the socket per Noise read
MAX_DEFERRED_CREDIT = 64 * 1024  # bytes of yamux receive window a reader may hold back
_installed = False
# how often each fast path ran, for tests and curious readers
stats = {"fast_writes": 0, "fast_reads": 0, "demuxed": 0}


def install() -> None:
    """Install every fast path this py-libp2p supports (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    if os.environ.get("P2PSERVE_FASTIO", "1") == "0":
        log.info("libp2p fast paths not installed: P2PSERVE_FASTIO=0")
        return
    try:
        from libp2p.io.exceptions import IncompleteReadError
        from libp2p.io.trio import TrioTCPStream
        from libp2p.network.connection.raw_connection import RawConnection
        from libp2p.network.stream.exceptions import StreamError
        from libp2p.network.stream.net_stream import NetStream, StreamState
        from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoisePacketReadWriter, NoiseTransportReadWriter
        from libp2p.security.secure_session import SecureSession
        from libp2p.stream_muxer.yamux import yamux as y
    except ImportError as e:
        log.info("libp2p fast paths not installed: %s", e)
        return
    known = (
        all(hasattr(NetStream, a) for a in ("read", "write"))
        and all(hasattr(y, a) for a in ("YamuxStream", "Yamux", "HEADER_SIZE", "YAMUX_HEADER_FORMAT",
                                        "TYPE_DATA", "MAX_MESSAGE_SIZE"))
        and all(n in y.YamuxStream.__init__.__code__.co_names
                for n in ("send_window", "rw_lock", "window_lock", "_pending_recv_release"))
        and all(n in y.Yamux.__init__.__code__.co_names
                for n in ("_write_lock", "streams_lock", "stream_buffers", "stream_events", "streams"))
        and all(hasattr(y.YamuxStream, a) for a in ("_grow_threshold", "_apply_autotune_epoch",
                                                     "send_window_update", "_auto_tune_and_send_window_update"))
        and all(n in TrioTCPStream.__init__.__code__.co_names for n in ("read_lock", "write_lock"))
        and all(n in NetStream.__init__.__code__.co_names for n in ("_state", "_state_lock", "muxed_stream"))
        and all(n in SecureSession._reset_internal_buffer.__code__.co_names
                for n in ("low_watermark", "high_watermark"))
        and all(hasattr(NoiseTransportReadWriter, a) for a in ("read_msg", "encrypt", "decrypt"))
    )
    if not known:
        log.info("libp2p fast paths not installed: unknown py-libp2p stream stack")
        return
    _install_window_credit(y.YamuxStream)
    _install_quick_locks(TrioTCPStream, ("read_lock", "write_lock"))
    _install_quick_locks(y.Yamux, ("streams_lock", "_write_lock"))
    _install_quick_locks(y.YamuxStream, ("window_lock",))
    _install_quick_locks(NetStream, ("_state_lock",))
    _install_noise_read(NoiseTransportReadWriter, NoisePacketReadWriter, RawConnection, IncompleteReadError,
                        SecureSession, y)
    _install_stream_io(NetStream, StreamState, StreamError, y, SecureSession, NoiseTransportReadWriter,
                       NoisePacketReadWriter, RawConnection, TrioTCPStream, MAX_PLAINTEXT_LENGTH)


# --- yamux receive-window credit -------------------------------------------------------


def _defer_credit(stream) -> bool:
    """Whether a reader may hold back the receive window it has read so far: True while
    that is under half the window and under MAX_DEFERRED_CREDIT.

    py-libp2p 0.8 writes a WINDOW_UPDATE frame back after nearly every read, however
    small (its "partial slack" branch; ``PY_YAMUX_RELEASE_ON_READ=0`` does not stop it):
    one more encrypted write at the reader and one more frame to decode at the writer,
    for every frame of a decode step. go-yamux credits the window once half of it has
    been read. Half is too much here: py-libp2p grows the window as it measures the
    round trip, and a sender without window polls every 10 ms (1.18 MB prefills took
    29 ms instead of 5 ms once 2000 decode steps had grown the window to 512 KiB). So a
    reader holds back at most 64 KiB (~27 decode-step frames), then credits all it has
    read in one update."""
    limit = min(stream._grow_threshold(), MAX_DEFERRED_CREDIT)
    return _uncredited(stream)[0] < limit


def _uncredited(stream) -> tuple[int, int]:
    """(bytes read and not yet credited to the sender, bytes buffered unread)."""
    buffered = len(stream.conn.stream_buffers.get(stream.stream_id, b""))
    return stream.target_recv_window - (stream.recv_window + buffered), buffered


async def _credit(stream) -> None:
    """Credit the sender with everything read so far, in one window update."""
    uncredited, buffered = _uncredited(stream)
    stream.recv_window += uncredited
    stream._pending_recv_release = 0
    # py-libp2p's window growth (doubling within 4 round trips), kept: it is what lets a
    # prefill fill a long, fast link
    await stream.send_window_update(uncredited + stream._apply_autotune_epoch(buffered), skip_lock=True)


def _install_window_credit(YamuxStream) -> None:
    async def credit(self, *, bytes_read: int = 0) -> None:
        if not _defer_credit(self):
            await _credit(self)

    YamuxStream._auto_tune_and_send_window_update = credit


# --- locks -----------------------------------------------------------------------------


class QuickLock:
    """A trio.Lock whose ``async with`` takes it without a scheduler turn when it is free.

    ``trio.Lock.acquire`` always yields once, even uncontended (it is a checkpoint), and
    py-libp2p takes four such locks per write and two per frame read. Taken while free,
    this one does not yield; taken while held, it waits in line as trio.Lock does (it is
    one, inside). trio.Lock cannot be subclassed, hence the wrapper."""

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    async def acquire(self) -> None:
        if self._lock.locked():
            await self._lock.acquire()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def statistics(self):
        return self._lock.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc) -> None:
        self._lock.release()


def _install_quick_locks(cls, names: tuple[str, ...]) -> None:
    """After ``cls.__init__``, replace its trio.Lock attributes ``names`` with QuickLocks."""
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for name in names:
            if type(getattr(self, name, None)) is trio.Lock:
                setattr(self, name, QuickLock())

    __init__.__wrapped__ = original
    cls.__init__ = __init__


# --- Noise -----------------------------------------------------------------------------


def _install_noise_read(NoiseTransportReadWriter, NoisePacketReadWriter, RawConnection, IncompleteReadError,
                        SecureSession, y) -> None:
    """Noise transport messages read from a buffer that one socket read of up to
    NOISE_READ bytes fills (usually holding several messages), instead of one exact read
    for the 2-byte length and another for the body; and a message that is one plain
    yamux DATA frame for an open stream delivered to that stream right here (see
    ``_Demux``). Only the transport phase is buffered: the handshake reads exactly what
    it needs, so nothing after it is ever left in a handshake buffer."""
    original = NoiseTransportReadWriter.read_msg

    async def read_msg(self, prefix_encoded: bool = False) -> bytes:
        rw = self.read_writer
        if prefix_encoded or type(rw) is not NoisePacketReadWriter or type(rw.read_write_closer) is not RawConnection:
            return await original(self, prefix_encoded)
        buf = self.__dict__.get("_p2pserve_buffer")
        if buf is None:
            buf = self._p2pserve_buffer = bytearray()
        demux = self.__dict__.get("_p2pserve_demux")
        while True:
            while len(buf) < 2:
                await _fill(rw.read_write_closer, buf, 2, IncompleteReadError)
            size = 2 + int.from_bytes(buf[:2], "big")
            while len(buf) < size:
                await _fill(rw.read_write_closer, buf, size, IncompleteReadError)
            ciphertext = bytes(buf[2:size])
            del buf[:size]
            message = self.decrypt(ciphertext)
            if demux is None or not demux.deliver(message):
                return message

    NoiseTransportReadWriter.read_msg = read_msg
    original_init = y.Yamux.__init__

    def __init__(self, secured_conn, *args, **kwargs):
        original_init(self, secured_conn, *args, **kwargs)
        # From here on every message on this connection is yamux frames: if nothing of
        # the muxer negotiation is left unread, frame boundaries can be followed exactly.
        if type(secured_conn) is SecureSession and type(secured_conn.conn) is NoiseTransportReadWriter \
                and secured_conn.low_watermark == secured_conn.high_watermark:
            secured_conn.conn._p2pserve_demux = _Demux(self, y)

    __init__.__wrapped__ = original_init
    y.Yamux.__init__ = __init__


class _Demux:
    """Plain yamux DATA frames, delivered to their stream as soon as they are decrypted.

    py-libp2p's yamux reader task spends ~30 us of Python per frame (0.16 ms on a core
    whose caches a forward pass has just evicted) on its way to appending a DATA frame's
    body to the stream's buffer and waking the stream's reader. For a message that is
    exactly one DATA frame with no flags, for an open stream, this does that append and
    wake, with the same window accounting, before the yamux reader ever sees it; anything
    else (SYN, ACK, FIN, RST, window updates, pings, a frame split over messages, a lock
    held) goes to the yamux reader as before. To know where frames start it follows every
    message it passes on (a DATA frame larger than one Noise message continues in the
    next); if a message ever does not parse, it stops for the connection."""

    __slots__ = ("conn", "remaining", "on", "y", "header")

    def __init__(self, conn, y):
        self.conn = weakref.ref(conn)
        self.remaining = 0  # bytes of a DATA body still to come in later messages
        self.on = True
        self.y = y
        self.header = struct.Struct(y.YAMUX_HEADER_FORMAT)

    def deliver(self, message: bytes) -> bool:
        """Deliver ``message`` if it is one plain DATA frame for an open stream: True if
        it was delivered, False if the yamux reader must have it."""
        if not self.on:
            return False
        y, size = self.y, self.y.HEADER_SIZE
        if self.remaining == 0 and len(message) > size:
            version, typ, flags, sid, length = self.header.unpack_from(message)
            if version == 0 and typ == y.TYPE_DATA and flags == 0 and size + length == len(message):
                conn = self.conn()
                stream = conn.streams.get(sid) if conn is not None else None
                if stream is not None and not (stream.closed or stream.recv_closed or stream.reset_received) \
                        and not conn.event_shutting_down.is_set() and not conn.streams_lock.locked() \
                        and sid in conn.stream_buffers and sid in conn.stream_events:
                    conn.stream_buffers[sid] += memoryview(message)[size:]
                    stream.recv_window = max(0, stream.recv_window - length)  # as py-libp2p clamps
                    conn.stream_events[sid].set()
                    stats["demuxed"] += 1
                    return True
        self._follow(message)
        return False

    def _follow(self, message: bytes) -> None:
        y, size, i = self.y, self.y.HEADER_SIZE, min(self.remaining, len(message))
        self.remaining -= i
        while i < len(message):
            if len(message) - i < size:  # a header split over messages: never written so
                self.on = False
                return
            _, typ, _, _, length = self.header.unpack_from(message, i)
            i += size
            if typ == y.TYPE_DATA:
                body = min(length, len(message) - i)
                i += body
                self.remaining = length - body


async def _fill(raw, buf: bytearray, need: int, IncompleteReadError) -> None:
    data = await raw.read(NOISE_READ)
    if not data:  # what py-libp2p's read_exactly raises at end of stream
        raise IncompleteReadError(f"Connection closed during read operation: expected {need} bytes but "
                                  f"received {len(buf)} bytes", expected_bytes=need, received_bytes=len(buf))
    buf += data


# --- NetStream over Yamux over Noise over TCP ------------------------------------------


def _install_stream_io(NetStream, StreamState, StreamError, y, SecureSession, NoiseTransportReadWriter,
                       NoisePacketReadWriter, RawConnection, TrioTCPStream, max_plaintext: int) -> None:
    original_read, original_write = NetStream.read, NetStream.write
    header = struct.Struct(y.YAMUX_HEADER_FORMAT)
    no_write = (StreamState.ERROR, StreamState.RESET, StreamState.CLOSE_WRITE, StreamState.CLOSE_BOTH)
    no_read = (StreamState.ERROR, StreamState.RESET)
    max_data = min(y.MAX_MESSAGE_SIZE, max_plaintext) - y.HEADER_SIZE

    def path(conn):
        """The Noise writer and TCP stream under a yamux connection, or None if it is
        built of anything else (cached on the connection)."""
        fast = conn.__dict__.get("_p2pserve_path", False)
        if fast is False:
            fast = None
            sc = getattr(conn, "secured_conn", None)
            if type(sc) is SecureSession and type(sc.conn) is NoiseTransportReadWriter:
                rw = sc.conn.read_writer
                if type(rw) is NoisePacketReadWriter and type(rw.read_write_closer) is RawConnection \
                        and type(rw.read_write_closer.stream) is TrioTCPStream:
                    fast = (sc.conn, rw.read_write_closer.stream)
            conn._p2pserve_path = fast
        return fast

    async def write(self, data) -> None:
        ys = self.muxed_stream
        n = len(data)
        if self._state in no_write or self._state_lock.locked() or type(ys) is not y.YamuxStream \
                or not 0 < n <= max_data or ys.send_closed or ys.closed or ys.send_window < n \
                or ys.rw_lock._writer_lock.value != 1 or ys.window_lock.locked():
            return await original_write(self, data)
        conn = ys.conn
        fast = path(conn)
        if fast is None or conn._write_lock.locked() or fast[1].write_lock.locked():
            return await original_write(self, data)
        noise, tcp = fast
        await trio.lowlevel.checkpoint_if_cancelled()
        stats["fast_writes"] += 1
        ys.send_window -= n
        conn._write_lock.acquire_nowait()
        tcp.write_lock.acquire_nowait()
        try:
            message = noise.encrypt(header.pack(0, y.TYPE_DATA, 0, ys.stream_id, n) + bytes(data))
            await _send_all(tcp.stream, len(message).to_bytes(2, "big") + message)
        except trio.ClosedResourceError:  # closed here, during teardown: as py-libp2p does
            return
        except trio.BrokenResourceError as error:  # as NetStream.write reports a broken connection
            self._state = StreamState.ERROR
            raise StreamError(f"Write operation failed: {error}") from error
        finally:
            tcp.write_lock.release()
            conn._write_lock.release()

    async def read(self, n=None) -> bytes:
        ys = self.muxed_stream
        if type(ys) is not y.YamuxStream or not isinstance(n, int) or n <= 0:
            return await original_read(self, n)
        conn = ys.conn
        sid = ys.stream_id
        while True:
            if self._state in no_read or self._state_lock.locked() or conn.streams_lock.locked() \
                    or conn.event_shutting_down.is_set() or conn.streams.get(sid) is not ys \
                    or ys.reset_received or ys.closed:
                return await original_read(self, n)
            buf = conn.stream_buffers.get(sid)
            if buf is None:
                return await original_read(self, n)
            if buf:
                await trio.lowlevel.checkpoint_if_cancelled()
                data = bytes(buf[:n])
                del buf[:n]
                stats["fast_reads"] += 1
                if not _defer_credit(ys):
                    await _credit(ys)
                return data
            event = conn.stream_events.get(sid)
            if ys.recv_closed or event is None:
                return await original_read(self, n)
            await event.wait()
            if conn.stream_events.get(sid) is event:
                conn.stream_events[sid] = trio.Event()

    NetStream.read, NetStream.write = read, write


async def _send_all(stream: trio.SocketStream, data: bytes) -> None:
    """``stream.send_all(data)``, without its scheduler turn when the kernel takes every
    byte at once (a decode step's frame always fits the socket buffer). The caller holds
    the TCP stream's write lock, so no other send is in progress."""
    fd = stream.socket.fileno()
    if fd == -1 or stream.socket.did_shutdown_SHUT_WR:
        return await stream.send_all(data)  # raises as trio does
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except OSError as e:
        raise trio.BrokenResourceError(f"socket write failed: {e}") from e
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:])
