"""How the engine's DICOM connections are run, in and out: TCP_NODELAY, PDUs read whole, and a DUL thread that
waits for news instead of polling for it. Imported by the listener and by the forwarding processes, which need
this and not the listener's roles.

pynetdicom's DUL reactor loops: check for a primitive from the user, check the socket with a zero-timeout
select, sleep `_run_loop_delay`, again. On an idle association that is thousands of wake-ups a second: one
association kept open between images cost the engine ~16 % of a core at a 0.2 ms delay (~8 % at the default
1 ms), and the forwarding process keeps two. A longer delay makes every response wait for it instead.

`DulWait` replaces the socket check of one association's DUL, in the data transfer state (Sta6) only: with
nothing to do, it blocks in select on the socket and on a wake-up socket that the user's primitives ring (a
C-STORE-RSP or a C-FIND answer queued by the association's thread, an abort, a kill). So a PDU or a response is
handled as soon as it comes, and an idle association costs a wake-up every `WAIT_SECONDS`. Other states
(negotiation, release, closing) keep pynetdicom's own loop: they are short, and their timers need it.

`ReactorGate` does the same for the association's own thread (pynetdicom's reactor), which sleeps 1 ms and then
looks for a DIMSE message, a release or an abort, again and again: a thousand wake-ups a second per association,
and a request (a C-STORE, a C-FIND) decoded by the DUL waited up to a millisecond for the next look.

The C-STORE command sets of both directions (the forwarder's requests, the storage SCP's responses) are encoded
here by hand: pynetdicom builds and encodes a pydicom Dataset for each, a millisecond or more per image.
"""

from __future__ import annotations

import functools
import logging
import select
import socket
import struct
import threading
from typing import Any, Callable

from pynetdicom import _config, evt
from pynetdicom.events import Event
from pynetdicom.transport import AssociationSocket

from engine.tcp import quick_ack

log = logging.getLogger(__name__)

# The longest the DUL blocks without news; it then looks at its kill flag and its queues once, as pynetdicom would.
WAIT_SECONDS = 0.05
DATA_TRANSFER = "Sta6"


class DulWait:
    """Installed on one association's DUL (pynetdicom's DULServiceProvider) from EVT_CONN_OPEN; `close` at the end."""

    def __init__(self, dul: Any) -> None:
        self._dul = dul
        self._check: Callable[[], bool] = dul._is_transport_event
        self._bell, self._ringer = socket.socketpair()
        self._bell.setblocking(False)
        self._ringer.setblocking(False)
        primitives = dul.to_provider_queue
        put = primitives.put
        kill = dul.kill_dul

        def put_and_ring(item: Any, block: bool = True, timeout: float | None = None) -> None:
            put(item, block, timeout)
            self.ring()

        def kill_and_ring() -> None:
            kill()
            self.ring()

        primitives.put = put_and_ring
        dul.kill_dul = kill_and_ring
        dul._is_transport_event = self.transport_event

    def ring(self) -> None:
        try:
            self._ringer.send(b"\x00")
        except OSError:  # full (a ring is pending anyway) or closed (the association is over)
            pass

    def transport_event(self) -> bool:
        """pynetdicom's check (True: a PDU was read); when it finds nothing in Sta6, wait for news first."""
        if self._check():
            return True
        dul = self._dul
        transport = dul.socket
        if (dul.state_machine.current_state != DATA_TRANSFER or dul._kill_thread or transport is None
                or transport.socket is None or not dul.event_queue.empty() or dul.to_provider_queue.queue):
            return False
        try:
            select.select([transport.socket, self._bell], [], [], WAIT_SECONDS)
        except (OSError, ValueError):  # closed under us: pynetdicom's own check reports it on the next loop
            return False
        self._silence()
        if dul._process_recv_primitive():  # a primitive rang: its event is queued now, not after a loop's sleep
            return False
        return self._check()

    def _silence(self) -> None:
        try:
            while self._bell.recv(64):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._bell.close()
        self._ringer.close()


class ReactorGate:
    """Stands in for an association's `_reactor_checkpoint` (a threading.Event) so that its reactor waits for news.

    pynetdicom's reactor loop (Association._run_reactor): sleep 1 ms, mark itself paused and wait at the
    checkpoint, which a user's send_* exchange closes so that the reactor does not take its response; then look
    once at the DIMSE queue, for a release, an abort, a dead DUL, the idle timer. Here the wait at the checkpoint
    also waits, up to `WAIT_SECONDS`, for news: a DIMSE message or a DUL primitive queued for the association, or
    the checkpoint opened (which `kill` does too). It does not wait while either queue holds something, since the
    loop takes one message per turn. Dead DULs and idle timers are found at the next timeout, as the DUL's own
    wait does. The reactor counts as paused while it waits here, as it did at the checkpoint, so a user's
    exchange starts at once instead of spinning until the next turn.
    """

    def __init__(self, assoc: Any) -> None:
        self._open = threading.Event()
        if assoc._reactor_checkpoint.is_set():
            self._open.set()
        self._news = threading.Event()
        self._messages = assoc.dimse.msg_queue
        self._primitives = assoc.dul.to_user_queue
        for waiting in (self._messages, self._primitives):
            waiting.put = self._ringing(waiting.put)

    def _ringing(self, put: Callable[..., None]) -> Callable[..., None]:
        def put_and_ring(item: Any, block: bool = True, timeout: float | None = None) -> None:
            put(item, block, timeout)
            self._news.set()
        return put_and_ring

    def is_set(self) -> bool:
        return self._open.is_set()

    def set(self) -> None:
        self._open.set()
        self._news.set()

    def clear(self) -> None:
        self._open.clear()

    def wait(self, timeout: float | None = None) -> bool:
        if not (self._messages.queue or self._primitives.queue):
            self._news.wait(WAIT_SECONDS)
        self._news.clear()  # before the loop looks at the queues: news after this rings again
        return self._open.wait(timeout)


def tune_connection(event: Event) -> None:
    """EVT_CONN_OPEN, on every association in or out: TCP_NODELAY, PDUs read whole, a DUL that waits for news.

    TCP_NODELAY before the first PDU, so no response waits ~40 ms on a delayed ACK: a C-FIND answer is two
    small P-DATA-TF PDUs per match (command, then identifier); with Nagle on, the second waits until the peer
    acknowledges the first. The same stall hits requests from a peer that leaves Nagle on (DCMTK's tools, and
    modalities built on them, unless TCP_NODELAY=1 is in their environment): its second small write waits for
    our ACK of the first, which Linux delays. `quick_ack` after every read makes that ACK immediate: measured
    against `swf-engine serve` with DCMTK's tools, Nagle on, a findscu worklist query 76 -> 36 ms and echoscu
    72 -> 32 ms (36 and 30 ms with TCP_NODELAY=1).

    pynetdicom reads a PDU 4 KiB per socket call, growing a bytearray as it goes: 128 calls and as many GIL
    hand-overs for each 512 KiB image. `read_exactly` asks the socket for everything still missing.

    The DUL thread blocks until a PDU or a primitive comes instead of polling (DulWait, above), and so does the
    association's reactor (ReactorGate, above); the association's end (`end_connection`, EVT_CONN_CLOSE) closes
    what that needs.
    """
    transport = event.assoc.dul.socket
    if transport is None or transport.socket is None:
        return
    transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    quick_ack(transport.socket)
    transport.recv = functools.partial(read_exactly, transport)
    event.assoc.dul.swf_wait = DulWait(event.assoc.dul)
    event.assoc._reactor_checkpoint = ReactorGate(event.assoc)
    log.debug("dicom connection", extra={"peer": f"{event.address[0]}:{event.address[1]}"})


def end_connection(event: Event) -> None:
    """EVT_CONN_CLOSE, wherever tune_connection is the EVT_CONN_OPEN handler."""
    wait = getattr(event.assoc.dul, "swf_wait", None)
    if wait is not None:
        wait.close()


TUNING = [(evt.EVT_CONN_OPEN, tune_connection), (evt.EVT_CONN_CLOSE, end_connection)]


def read_exactly(transport: AssociationSocket, size: int) -> bytearray:
    """AssociationSocket.recv's contract: `size` bytes, fewer only when the peer closed; socket errors raise."""
    buffer = bytearray(size)
    with memoryview(buffer) as view:
        received = 0
        while received < size:
            count = transport.socket.recv_into(view[received:])
            if not count:
                break
            received += count
            quick_ack(transport.socket)
    if received < size:
        del buffer[received:]
    return buffer


def quiet_standard_handlers() -> None:
    """pynetdicom's "standard" handlers format an INFO/DEBUG line for every PDU and DIMSE message (decoding the
    command set to do so) even though engine.logs keeps its logger at WARNING: per image, work for nothing.
    Process-wide; read when an association is created."""
    _config.LOG_HANDLER_LEVEL = "none"


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set from (element of group 0000, value) in tag order: Implicit VR Little Endian (PS3.7 6.3.1),
    headed by its Command Group Length."""
    body = b"".join(struct.pack("<HHI", 0x0000, tag, len(value)) + value for tag, value in elements)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def uid_value(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" * (len(data) % 2)


def us_value(value: int) -> bytes:
    return struct.pack("<H", value)


def c_store_rsp(message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    """A C-STORE-RSP command set without a data set (PS3.7 9.3.1.2)."""
    return command_set([
        (0x0002, uid_value(sop_class_uid)),  # Affected SOP Class UID
        (0x0100, us_value(0x8001)),  # Command Field: C-STORE-RSP
        (0x0120, us_value(message_id)),  # Message ID Being Responded To
        (0x0800, us_value(0x0101)),  # Command Data Set Type: none
        (0x0900, us_value(status)),
        (0x1000, uid_value(sop_instance_uid)),  # Affected SOP Instance UID
    ])
