"""The engine's one DICOM listener (CONTRACT.md: SWF_DICOM_AET / SWF_DICOM_PORT), shared by every DICOM role.

Each role is a module with `SOP_CLASSES` (the abstract syntaxes it serves as SCP) and `dicom_handlers(e)`
returning `[(evt, handler, [args])]`; ROLES lists them. Verification and the Modality Worklist come first; MPPS
(PS3.4 F.7) and Storage (PS3.4 B) join by adding their module here. Accepting and association negotiation follow
PS3.8 9.3 / PS3.7 D.3.3 as pynetdicom implements them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import ModuleType
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, _config

from engine.mwl import mpps_scp, mwl_scp, storage_scp, verification
from engine.mwl.dicom_guard import AssociationGuard, start_guarded_server
from engine.mwl.dicom_transport import TUNING, quiet_standard_handlers
from engine.tls import AddressList, server_context

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

log = logging.getLogger(__name__)

ROLES: tuple[ModuleType, ...] = (verification, mwl_scp, mpps_scp, storage_scp)
STOP_GRACE_SECONDS = 2.0


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
