"""The engine's one DICOM listener (CONTRACT.md: SWF_DICOM_AET / SWF_DICOM_PORT), shared by every DICOM role.

Each role is a module with `SOP_CLASSES` (the abstract syntaxes it serves as SCP) and `dicom_handlers(e)`
returning `[(evt, handler, [args])]`; ROLES lists them. Verification and the Modality Worklist come first; MPPS
(PS3.4 F.7) and Storage (PS3.4 B) join by adding their module here. Accepting and association negotiation follow
PS3.8 9.3 / PS3.7 D.3.3 as pynetdicom implements them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from types import ModuleType
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.events import Event
from pynetdicom.transport import AssociationSocket

from engine.mwl import mpps_scp, mwl_scp, storage_scp, verification
from engine.mwl.dicom_guard import AssociationGuard, start_guarded_server
from engine.mwl.dul_wait import DulWait
from engine.tls import AddressList, server_context

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

log = logging.getLogger(__name__)

ROLES: tuple[ModuleType, ...] = (verification, mwl_scp, mpps_scp, storage_scp)
STOP_GRACE_SECONDS = 2.0


def tune_connection(event: Event) -> None:
    """EVT_CONN_OPEN, on every association in or out: TCP_NODELAY, PDUs read whole, a DUL that waits for news.

    TCP_NODELAY before the first PDU, so no response waits ~40 ms on a delayed ACK: a C-FIND answer is two
    small P-DATA-TF PDUs per match (command, then identifier); with Nagle on, the second waits until the peer
    acknowledges the first.

    pynetdicom reads a PDU 4 KiB per socket call, growing a bytearray as it goes: 128 calls and as many GIL
    hand-overs for each 512 KiB image. `read_exactly` asks the socket for everything still missing.

    The DUL thread blocks until a PDU or a primitive comes instead of polling (engine.mwl.dul_wait); the
    association's end (`end_connection`, EVT_CONN_CLOSE) closes what that needs.
    """
    transport = event.assoc.dul.socket
    if transport is None or transport.socket is None:
        return
    transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport.recv = functools.partial(read_exactly, transport)
    event.assoc.dul.swf_wait = DulWait(event.assoc.dul)
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
    if received < size:
        del buffer[received:]
    return buffer


def quiet_standard_handlers() -> None:
    """pynetdicom's "standard" handlers format an INFO/DEBUG line for every PDU and DIMSE message (decoding the
    command set to do so) even though engine.logs keeps its logger at WARNING: per image, work for nothing.
    Process-wide; read when an association is created."""
    _config.LOG_HANDLER_LEVEL = "none"


def build_ae(engine: "Engine", roles: Sequence[ModuleType] = ROLES) -> tuple[AE, list[tuple]]:
    """The AE with every role's presentation contexts, and the event handlers the roles contribute."""
    settings = engine.config.dicom
    ae = AE(ae_title=settings.ae_title)
    # AssociationGuard enforces max_associations exactly; pynetdicom's own count includes connections it is
    # rejecting at that moment, so under a flood it would refuse some of the admitted ones too.
    ae.maximum_associations = settings.max_associations * 4 + 16
    ae.maximum_pdu_size = settings.max_pdu_length
    ae.network_timeout = settings.network_timeout_seconds
    ae.acse_timeout = settings.network_timeout_seconds
    ae.dimse_timeout = settings.network_timeout_seconds
    handlers: list[tuple] = [*TUNING, *AssociationGuard(settings).handlers()]
    for role in roles:
        if not getattr(role, "enabled", lambda config: True)(engine.config):
            continue
        # a role may accept more than the uncompressed syntaxes (Storage: JPEG, JPEG 2000, RLE ... as sent)
        syntaxes = getattr(role, "TRANSFER_SYNTAXES", DEFAULT_TRANSFER_SYNTAXES)
        for sop_class in role.SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        handlers.extend(role.dicom_handlers(engine))
    return ae, handlers


async def start_dicom_server(engine: "Engine", roles: Sequence[ModuleType] = ROLES) -> Callable[[], Awaitable[None]]:
    """Start the listener in pynetdicom's threads and return the coroutine function that stops it."""
    # Process-wide pynetdicom switches: by default it decodes and pretty-prints every request and response
    # identifier for its logger, whatever the level. That is patient data in the logs and, for a large answer,
    # most of the per-response cost.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    quiet_standard_handlers()
    settings = engine.config.dicom
    ae, handlers = build_ae(engine, roles)
    tls = settings.tls
    context = server_context(tls) if tls else None
    allowed = AddressList(settings.allowed_ips)
    listeners = [((settings.host, settings.port), None if tls and tls.port else context)]
    if tls and tls.port:
        listeners.append(((settings.host, tls.port), context))
    servers = []
    for address, ssl_context in listeners:
        server = await asyncio.to_thread(start_guarded_server, ae, address, handlers, tls=ssl_context,
                                         handshake_timeout=tls.handshake_timeout_seconds if tls else 10.0,
                                         allowed=allowed)
        servers.append(server)
        log.info("dicom listener started", extra={"ae_title": settings.ae_title, "host": settings.host,
                                                  "port": server.server_address[1], "tls": ssl_context is not None})

    async def stop() -> None:
        await asyncio.to_thread(_shutdown, ae, servers)
        log.info("dicom listener stopped", extra={"ae_title": settings.ae_title})

    return stop


def _shutdown(ae: AE, servers: list) -> None:
    for server in servers:
        server.shutdown()  # no new associations
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)  # let a query in flight finish its answer
    for assoc in ae.active_associations:
        assoc.abort()
