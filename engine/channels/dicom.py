"""Outbound C-STORE (PS3.4 B, PS3.7 9.1.1): spooled files to a DICOM destination, one association per run.

The file goes out as it lies on disk: its dataset bytes are streamed in PDU-sized chunks, never decoded, so the
presentation context must carry the file's own transfer syntax. Each (SOP class, transfer syntax) seen is
proposed as its own context; a file needing one the open association lacks re-opens it with the larger set.
The association stays open across images and is released after `idle_release_seconds` without one.

Statuses (PS3.4 B.2.3): success and warnings (B000, B006, B007) count as stored; A7xx (out of resources), a
lost association or no answer are retried with backoff; any other refusal is final (dead, for an analyst).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt

from engine.channels.dispatcher import Attempt
from engine.config import DicomDestination
from engine.mwl.dicom_server import no_delay
from engine.mwl.storage_scp import DUL_LOOP_DELAY
from engine.tls import client_context

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context ids are odd numbers 1-255
WARNINGS = {0xB000, 0xB006, 0xB007}


class DicomSender:
    """Sends spooled Part 10 files with C-STORE; calls are sequential (one dispatcher), run in threads."""

    def __init__(self, destination: DicomDestination, *, calling_ae_title: str) -> None:
        # Process-wide pynetdicom switch: with it, send_c_store(path) streams the file's dataset bytes instead of
        # decoding and re-encoding the whole image. Only this sender sends C-STORE from a path.
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.destination = destination
        self.ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
        self.ae.acse_timeout = destination.connect_timeout_seconds
        self.ae.connection_timeout = destination.connect_timeout_seconds
        self.ae.dimse_timeout = destination.response_timeout_seconds
        self.ae.network_timeout = max(destination.response_timeout_seconds, destination.idle_release_seconds + 30)
        self.ae.maximum_pdu_size = 0  # no limit on what the PACS may send back
        self.assoc = None
        self.accepted: set[tuple[str, str]] = set()
        self.wanted: dict[tuple[str, str], None] = {}  # insertion-ordered: the most recent kept when over 128
        self.last_used = 0.0
        self.sent_files: list[Path] = []
        tls = destination.tls
        self.tls_args = (client_context(tls), tls.server_name or destination.host) if tls else None

    async def send(self, payload: bytes) -> Attempt:
        return await asyncio.to_thread(self._send, Path(payload.decode("utf-8")))

    def _send(self, path: Path) -> Attempt:
        try:
            meta = read_file_meta_info(path)
            pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except FileNotFoundError:
            return Attempt(False, error=f"spooled file missing: {path.name}", retry=False)
        except Exception as exc:
            return Attempt(False, error=f"spooled file unreadable: {exc.__class__.__name__}", retry=False)
        try:
            assoc = self._association(pair)
        except ConnectionError as exc:
            return Attempt(False, error=str(exc))
        if pair not in self.accepted:
            return Attempt(False, error=f"{self.destination.ae_title} accepts no context for SOP class {pair[0]} "
                                        f"in transfer syntax {pair[1]}", retry=False)
        try:
            status = assoc.send_c_store(path)
        except (RuntimeError, ValueError, OSError, AttributeError) as exc:
            self._drop()
            return Attempt(False, error=f"C-STORE failed: {exc.__class__.__name__}: {exc}")
        self.last_used = time.monotonic()
        code = getattr(status, "Status", None) if status else None
        if code is None:  # association aborted or DIMSE timeout: nothing is known about this image
            self._drop()
            return Attempt(False, error="no C-STORE response (association lost or timed out)")
        comment = str(status.get("ErrorComment", "") or "")
        answer = f"status 0x{code:04X}" + (f" {comment}" if comment else "")
        if code == 0x0000 or code in WARNINGS:
            self.sent_files.append(path)
            return Attempt(True, response=answer)
        if 0xA700 <= code <= 0xA7FF:
            return Attempt(False, response=answer, error=f"{self.destination.ae_title} out of resources")
        return Attempt(False, response=answer, error=f"{self.destination.ae_title} refused the image", retry=False)

    def _association(self, pair: tuple[str, str]):
        if self.assoc is not None and self.assoc.is_established and pair in self.accepted:
            return self.assoc
        self.wanted.pop(pair, None)
        self.wanted[pair] = None
        while len(self.wanted) > MAX_CONTEXTS:
            self.wanted.pop(next(iter(self.wanted)))
        self._drop(release=True)
        self.ae.requested_contexts = []
        for sop_class, syntax in self.wanted:
            self.ae.add_requested_context(sop_class, syntax)
        d = self.destination
        assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)],
                                  tls_args=self.tls_args)
        if not assoc.is_established:
            raise ConnectionError(f"association with {d.ae_title}@{d.host}:{d.port} "
                                  f"{'rejected' if assoc.is_rejected else 'failed'}")
        assoc.dul._run_loop_delay = DUL_LOOP_DELAY  # see engine.mwl.storage_scp: each response waits on it
        self.assoc = assoc
        self.accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        self.last_used = time.monotonic()
        return assoc

    def _drop(self, release: bool = False) -> None:
        assoc, self.assoc = self.assoc, None
        self.accepted = set()
        if assoc is None:
            return
        if release and assoc.is_established:
            assoc.release()
        else:
            assoc.abort()

    async def committed(self) -> None:
        """The sent rows are recorded: the spooled links of what was stored can go."""
        files, self.sent_files = self.sent_files, []
        if files and not self.destination.keep_sent_files:
            await asyncio.to_thread(_unlink, files)

    async def idle(self) -> None:
        """Nothing queued: release the association once it has been idle long enough."""
        if self.assoc is not None and time.monotonic() - self.last_used >= self.destination.idle_release_seconds:
            await asyncio.to_thread(self._drop, True)

    async def close(self) -> None:
        await asyncio.to_thread(self._drop, True)


def _unlink(files: list[Path]) -> None:
    for path in files:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
