"""MLLP framing, listener and client (HL7 v2.5 Appendix C: VT message FS CR)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable

from engine.tcp import quick_ack
from engine.tls import AddressList, peer_subject, refusal_reason

log = logging.getLogger(__name__)

VT, FS, CR = 0x0B, 0x1C, 0x0D
START, END = b"\x0b", b"\x1c\x0d"
WRITE_BACKLOG = 256 * 1024  # unsent ACK bytes past which the listener waits for the peer to read


def frame(payload: bytes) -> bytes:
    return START + payload + END


@dataclass(frozen=True)
class Frame:
    """One block read off the wire. `truncated` when a new VT came before FS; `oversized` past the limit."""

    payload: bytes
    truncated: bool = False
    oversized: bool = False


class FrameReader:
    """Splits a byte stream into MLLP frames; bytes outside frames are counted and dropped."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._in_frame = False
        self._oversized = False
        self._skip_cr = False
        self.junk_bytes = 0

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        if self._skip_cr and data[:1] == b"\r":
            data = data[1:]
        self._skip_cr = False
        i = 0
        while i < len(data):
            if not self._in_frame:
                start = data.find(START, i)
                if start == -1:
                    self.junk_bytes += len(data[i:].strip(b"\r\n \t\x00"))
                    break
                self.junk_bytes += len(data[i:start].strip(b"\r\n \t\x00"))
                self._in_frame, self._oversized = True, False
                self._buffer.clear()
                i = start + 1
                continue
            end = data.find(b"\x1c", i)
            restart = data.find(START, i)
            if restart != -1 and (end == -1 or restart < end):
                # The sender began a new block before ending this one: the old one is cut short.
                self._append(data[i:restart])
                frames.append(Frame(bytes(self._buffer), truncated=True, oversized=self._oversized))
                self._buffer.clear()
                self._oversized = False
                i = restart + 1
                continue
            if end == -1:
                self._append(data[i:])
                break
            self._append(data[i:end])
            frames.append(Frame(bytes(self._buffer), oversized=self._oversized))
            self._buffer.clear()
            self._in_frame = False
            i = end + 1
            if i < len(data) and data[i] == CR:
                i += 1
            elif i >= len(data):
                self._skip_cr = True
        return frames

    def _append(self, chunk: bytes) -> None:
        if self._oversized:
            return
        if len(self._buffer) + len(chunk) > self.max_bytes:
            self._oversized = True
            self._buffer.clear()
            return
        self._buffer += chunk

    @property
    def mid_frame(self) -> bool:
        return self._in_frame


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class IdleWatch:
    """Ends reads on a connection left idle for `seconds`: one timer per connection, moved on only when it
    fires, instead of a timeout armed and disarmed around every read (about 3 % of the engine's time under an
    HL7 stream). Time spent answering does not count as idle."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._reader_task: asyncio.Task | None = None
        self._expired = False
        self._timer = self._loop.call_at(self._last + seconds, self._check)

    async def read(self, reader: asyncio.StreamReader) -> bytes:
        """`reader.read`, raising TimeoutError when nothing came for `seconds`."""
        task = self._reader_task = asyncio.current_task()
        self._last = self._loop.time()
        try:
            return await reader.read(65536)
        except asyncio.CancelledError:
            # ours unless the task was cancelled from elsewhere too (the listener closing): that one wins
            if self._expired and task is not None and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            self._reader_task = None

    def _check(self) -> None:
        due = self._last + self.seconds
        if self._reader_task is None or self._loop.time() < due:
            self._timer = self._loop.call_at(max(due, self._loop.time() + 0.001), self._check)
            return
        self._expired = True
        self._reader_task.cancel()

    def cancel(self) -> None:
        self._timer.cancel()


# A handler takes one frame and the peer's address and returns the bytes to answer (None: no answer).
FrameHandler = Callable[[Frame, str], Awaitable[bytes | None]]


class MllpServer:
    """An asyncio MLLP listener; each connection is served in order, connections in parallel."""

    def __init__(self, host: str, port: int, handler: FrameHandler, *, max_bytes: int,
                 idle_timeout: float, max_connections: int, name: str = "mllp",
                 ssl_context: ssl.SSLContext | None = None, handshake_timeout: float = 10.0,
                 allowed: AddressList | None = None) -> None:
        self.host, self.port, self.handler = host, port, handler
        self.max_bytes, self.idle_timeout = max_bytes, idle_timeout
        self.name = name
        self.ssl_context, self.handshake_timeout = ssl_context, handshake_timeout
        self.allowed = allowed or AddressList(())
        self._slots = asyncio.Semaphore(max_connections)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True, limit=2**20)
        log.info("mllp listening", extra={"channel": self.name, "port": self.port, "tls": self.ssl_context is not None})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer_info = writer.get_extra_info("peername") or ("?", 0)
        peer = f"{peer_info[0]}:{peer_info[1]}"
        set_nodelay(writer)
        if self.allowed and not self.allowed.allows(str(peer_info[0])):
            log.warning("mllp connection refused: address not allowed", extra={"channel": self.name, "peer": peer})
            writer.close()
            self._connections.discard(task)
            return
        if self._slots.locked():
            log.warning("mllp connection refused: too many connections", extra={"channel": self.name, "peer": peer})
            writer.close()
            self._connections.discard(task)
            return
        async with self._slots:
            try:
                if self.ssl_context is not None and not await self._handshake(writer, peer):
                    return
                await self._conversation(reader, writer, peer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            except asyncio.CancelledError:
                # Our own shutdown (close()); ending quietly keeps asyncio's stream callback from logging
                # the cancelled connection task as an error.
                return
            except Exception:
                log.exception("mllp connection failed", extra={"channel": self.name, "peer": peer})
            finally:
                self._connections.discard(task)
                writer.close()

    async def _handshake(self, writer: asyncio.StreamWriter, peer: str) -> bool:
        # TLS after accept rather than start_server(ssl=...): asyncio drops a failed handshake silently, and a
        # refused client must be in the log with the reason.
        try:
            await writer.start_tls(self.ssl_context, ssl_handshake_timeout=self.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.warning("mllp tls handshake refused", extra={"channel": self.name, "peer": peer,
                                                              "reason": refusal_reason(exc)})
            return False
        log.info("mllp tls client", extra={"channel": self.name, "peer": peer,
                                           "subject": peer_subject(writer.get_extra_info("ssl_object"))})
        return True

    async def _conversation(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        framer = FrameReader(self.max_bytes)
        watch = IdleWatch(self.idle_timeout)
        sock = writer.get_extra_info("socket")
        try:
            while True:
                try:
                    data = await watch.read(reader)
                except TimeoutError:
                    log.info("mllp idle timeout", extra={"channel": self.name, "peer": peer})
                    return
                if not await self._answer_blocks(framer, data, writer, peer):
                    return
                if framer.mid_frame:
                    # a sender writing the start block, the message and the end block one by one, Nagle on, would
                    # wait ~40 ms for our delayed ACK before each next piece; a whole frame read needs no call
                    quick_ack(sock)
        finally:
            watch.cancel()

    async def _answer_blocks(self, framer: "FrameReader", data: bytes, writer: asyncio.StreamWriter,
                             peer: str) -> bool:
        """Answer every block completed by `data`; False when the conversation should end."""
        if not data:
            if framer.mid_frame:
                log.warning("mllp connection closed mid-frame: block dropped", extra={"channel": self.name, "peer": peer})
            return False
        for block in framer.feed(data):
            answer = await self.handler(block, peer)
            if answer is not None:
                writer.write(frame(answer))
                if writer.transport.get_write_buffer_size() > WRITE_BACKLOG:
                    # a peer that sends but does not read its ACKs: wait for it, but not forever
                    try:
                        async with asyncio.timeout(self.idle_timeout):
                            await writer.drain()
                    except TimeoutError:
                        log.warning("mllp peer does not read its acknowledgments: closing",
                                    extra={"channel": self.name, "peer": peer})
                        return False
        if framer.junk_bytes > self.max_bytes:
            log.warning("mllp peer sends bytes outside frames: closing", extra={"channel": self.name, "peer": peer})
            return False
        return True


class MllpClient:
    """One kept connection to an MLLP receiver; send waits for the answer block."""

    def __init__(self, host: str, port: int, *, connect_timeout: float, answer_timeout: float,
                 max_bytes: int = 16 * 1024 * 1024, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        self.host, self.port = host, port
        self.ssl_context, self.server_hostname = ssl_context, server_hostname
        self.connect_timeout, self.answer_timeout = connect_timeout, answer_timeout
        self.max_bytes = max_bytes
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._framer = FrameReader(max_bytes)
        self._pending: list[Frame] = []

    async def _connect(self) -> None:
        tls = {} if self.ssl_context is None else {
            "ssl": self.ssl_context, "server_hostname": self.server_hostname or self.host,
            "ssl_handshake_timeout": self.connect_timeout}
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=2**20, **tls), timeout=self.connect_timeout
        )
        set_nodelay(self._writer)
        self._framer = FrameReader(self.max_bytes)
        self._pending = []

    async def send(self, payload: bytes) -> bytes:
        """Send one message and return the answer's bytes; any failure closes the connection."""
        if self._writer is None or self._writer.is_closing():
            await self._connect()
        assert self._reader is not None and self._writer is not None
        try:
            # drain inside the timeout too: a receiver that accepts but stops reading must not hold us forever
            async with asyncio.timeout(self.answer_timeout):
                self._writer.write(frame(payload))
                await self._writer.drain()
                return await self._read_answer()
        except BaseException:
            await self.close()
            raise

    async def _read_answer(self) -> bytes:
        assert self._reader is not None
        while not self._pending:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("receiver closed the connection before answering")
            self._pending.extend(self._framer.feed(data))
        return self._pending.pop(0).payload

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is None:
            return
        if writer.transport.get_write_buffer_size():
            writer.transport.abort()  # close() flushes first: a receiver that stopped reading would hold it forever
        else:
            writer.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await writer.wait_closed()
        except (ConnectionError, OSError, TimeoutError):
            pass
