"""Who may associate with the DICOM listener: address allow-list, TLS, calling AE titles, association limits.

Refusals follow PS3.8 9.3.4 (A-ASSOCIATE-RJ): a calling AE title not listed is rejected permanent, "calling AE
title not recognized"; past a limit, rejected transient, "local limit exceeded", so the modality tries again
later while the associations already open keep being served. An address not listed, or a client failing the
TLS handshake, is closed before any PDU. Every refusal is logged with the peer.
"""

from __future__ import annotations

import copy
import logging
import ssl
import threading
from datetime import datetime

from pynetdicom import AE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from engine.config import DicomSettings
from engine.tls import AddressList, peer_subject, refusal_reason

log = logging.getLogger(__name__)

REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SOURCE_USER, SOURCE_PRESENTATION = 0x01, 0x03
CALLING_AE_NOT_RECOGNIZED, LOCAL_LIMIT_EXCEEDED = 0x03, 0x02


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the address check on accept and TLS in the connection's own thread.

    pynetdicom's own `ssl_context` runs the handshake in the accept loop: one client that connects and says
    nothing would stall every other modality, and a failed handshake would vanish without a log line.
    """

    tls_context: ssl.SSLContext | None = None
    handshake_timeout: float = 10.0
    allowed: AddressList = AddressList(())

    def verify_request(self, request, client_address) -> bool:
        if self.allowed.allows(str(client_address[0])):
            return True
        log.warning("dicom connection refused: address not allowed",
                    extra={"peer": f"{client_address[0]}:{client_address[1]}"})
        return False

    def process_request_thread(self, request, client_address) -> None:
        if self.tls_context is not None:
            try:
                request.settimeout(self.handshake_timeout)
                request = self.tls_context.wrap_socket(request, server_side=True)
                request.settimeout(None)  # as pynetdicom expects it: blocking, its own timers
            except (ssl.SSLError, OSError) as exc:
                log.warning("dicom tls handshake refused", extra={
                    "peer": f"{client_address[0]}:{client_address[1]}", "reason": refusal_reason(exc)})
                self.shutdown_request(request)
                return
            log.info("dicom tls client", extra={"peer": f"{client_address[0]}:{client_address[1]}",
                                                "subject": peer_subject(request)})
        super().process_request_thread(request, client_address)


class SupportedContexts(list):
    """The listener's presentation contexts, deep-copied for each association with their UIDs shared.

    pynetdicom deep-copies the acceptor's contexts for every association, so that its negotiation may change them.
    With the ~170 SOP classes the engine serves (Storage with 16 transfer syntaxes each), copying each pydicom UID
    took ~19 ms of the ~30 ms an association cost before its first request; every modality's C-FIND, N-CREATE and
    C-STORE association waited for it. UIDs are immutable strings: the copy shares them and copies the rest.
    """

    def __deepcopy__(self, memo: dict) -> list:
        memo.update({id(uid): uid for context in self for uid in (context.abstract_syntax, *context.transfer_syntax)})
        return [copy.deepcopy(context, memo) for context in self]


def start_guarded_server(ae: AE, address: tuple[str, int], handlers: list, *, tls: ssl.SSLContext | None,
                         handshake_timeout: float, allowed: AddressList) -> GuardedServer:
    """`ae.start_server(block=False)` with GuardedServer as the server class."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=GuardedServer)
    server.contexts = SupportedContexts(server.contexts)
    server.tls_context, server.handshake_timeout, server.allowed = tls, handshake_timeout, allowed
    name = f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    ae._servers.append(server)  # so that ae.shutdown() and active_associations include it
    return server


class AssociationGuard:
    """EVT_REQUESTED / EVT_CONN_CLOSE handlers: calling AE allow-list and exact association counts."""

    def __init__(self, settings: DicomSettings) -> None:
        self.allowed_titles = {title.strip() for title in settings.allowed_calling_ae_titles}
        self.max_total = settings.max_associations
        self.max_per_title = settings.max_associations_per_calling_ae
        self._lock = threading.Lock()
        # id(assoc) -> (assoc, calling AE title), until its connection closes
        self._admitted: dict[int, tuple[object, str]] = {}

    def handlers(self) -> list[tuple]:
        from pynetdicom import evt

        return [(evt.EVT_REQUESTED, self.admit), (evt.EVT_CONN_CLOSE, self.release)]

    def admit(self, event: Event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        refusal = None
        with self._lock:
            # a thread that ended without EVT_CONN_CLOSE (killed on shutdown, a transport error) frees its slot here
            for key in [k for k, (other, _) in self._admitted.items() if not other.is_alive()]:
                del self._admitted[key]
            if self.allowed_titles and calling not in self.allowed_titles:
                refusal = (REJECTED_PERMANENT, SOURCE_USER, CALLING_AE_NOT_RECOGNIZED, "calling AE title not allowed")
            elif len(self._admitted) >= self.max_total:
                refusal = (REJECTED_TRANSIENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED,
                           "association limit reached")
            elif self.max_per_title is not None and \
                    sum(1 for _, title in self._admitted.values() if title == calling) >= self.max_per_title:
                refusal = (REJECTED_TRANSIENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED,
                           "association limit for this calling AE title reached")
            else:
                self._admitted[id(assoc)] = (assoc, calling)
        if refusal is None:
            return
        result, source, diagnostic, reason = refusal
        log.warning("dicom association rejected: %s", reason, extra={
            "calling_ae": calling, "peer": f"{assoc.requestor.address}:{assoc.requestor.port}"})
        assoc.acse.send_reject(result, source, diagnostic)
        assoc.kill()  # as pynetdicom does after its own rejections: the RJ goes out, then the DUL stops

    def release(self, event: Event) -> None:
        with self._lock:
            self._admitted.pop(id(event.assoc), None)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._admitted)
