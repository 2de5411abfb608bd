"""Outbound C-STORE (PS3.4 B, PS3.7 9.1.1): spooled files to a DICOM destination, one association per run.

The file goes out as it lies on disk: its dataset bytes are streamed in PDU-sized chunks, never decoded, so the
presentation context must carry the file's own transfer syntax. Each (SOP class, transfer syntax) seen is
proposed as its own context; a file needing one the open association lacks re-opens it with the larger set.
The association stays open across images and is released after `idle_release_seconds` without one.

Each destination's association lives in a forwarding process of its own. pynetdicom sends a 512 KiB image as
some thirty PDUs, each built and sent in Python; in the engine's process that work took the GIL from the
listener receiving the next images (about a fifth of their rate). The dispatcher stays here, with the journal:
the forwarding process only sends a file and answers with the outcome. It ends when asked, or when the engine
is gone (its pipe closes); one that dies or hangs is replaced, and the image it held is retried.

Statuses (PS3.4 B.2.3): success and warnings (B000, B006, B007) count as stored; A7xx (out of resources), a
lost association or no answer are retried with backoff; any other refusal is final (dead, for an analyst).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing.process
import queue
import struct
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Iterator

from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from engine.channels.attempt import Attempt
from engine.channels.worker_process import STOP_SECONDS, end_worker, spawn_worker
from engine.config import DicomDestination
from engine.mwl.dicom_transport import TUNING, command_set, quiet_standard_handlers, uid_value, us_value
from engine.store.spool import Spool
from engine.tls import client_context

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context ids are odd numbers 1-255
WARNINGS = {0xB000, 0xB006, 0xB007}


class DicomSender:
    """The dispatcher's side: hands each file to the destination's forwarding process and waits for the outcome.

    Calls are sequential (one dispatcher per destination); each blocks a worker thread, not the event loop.
    The dispatcher lets arrivals collect for `gather_seconds` and hands them over as one run: a series
    arriving image by image then costs the engine one journal query, one hand-over and one commit per run
    rather than per image. Store-and-forward can wait that long; the modality was answered already.
    """

    gather_seconds = 0.05
    send_while_recording = True  # see DestinationDispatcher._record

    def __init__(self, destination: DicomDestination, *, calling_ae_title: str) -> None:
        self.destination = destination
        self.calling_ae_title = calling_ae_title
        self.sent_files: list[Path] = []
        self._process: multiprocessing.process.BaseProcess | None = None
        self._pipe: Connection | None = None
        self._lock = threading.Lock()
        # the longest one image (or a release) may take in the forwarding process before it counts as hung
        self._deadline = (destination.connect_timeout_seconds * 2 + destination.response_timeout_seconds
                          + destination.idle_release_seconds + 30)
        # started now: importing pynetdicom there takes about a second, which the first image should not wait for
        with self._lock:
            self._started()

    async def send(self, payload: bytes) -> Attempt:
        return (await self.send_many([payload]))[0]

    async def send_many(self, payloads: list[bytes]) -> list[Attempt]:
        """Send the files; one outcome per file, in order, up to the last one tried (none after a failure but
        those already in flight on another association)."""
        paths = [payload.decode("utf-8") for payload in payloads]
        attempts = await asyncio.to_thread(self._send_files, paths)
        self.sent_files += [Path(path) for path, attempt in zip(paths, attempts) if attempt.ok]
        return attempts

    def take_sent(self) -> list[Path]:
        """The files sent since the last call: the dispatcher records them as sent, then calls `committed`."""
        files, self.sent_files = self.sent_files, []
        return files

    async def committed(self, files: list[Path]) -> None:
        """These files' rows are recorded as sent: the spooled links of what was stored can go."""
        if files and not self.destination.keep_sent_files:
            await asyncio.to_thread(Spool.remove, files)

    async def idle(self) -> None:
        """Nothing queued: the forwarding process releases the association once it has been idle long enough."""
        if self._process is not None:
            await asyncio.to_thread(self._release_if_idle)

    async def close(self) -> None:
        await asyncio.to_thread(self._stop)

    def _send_files(self, paths: list[str]) -> list[Attempt]:
        """The forwarding process answers each file as it is done, in order, then None for the end of the run."""
        attempts: list[Attempt] = []
        with self._lock:
            try:
                pipe = self._started()
                pipe.send(("send", paths))
                while (attempt := self._answer(pipe)) is not None:
                    attempts.append(attempt)
            except (EOFError, OSError) as exc:  # it died (killed, out of memory): the next run starts another
                self._stop_process(kill=True)
                attempts.append(Attempt(False, error=f"the forwarding process ended ({exc.__class__.__name__}); "
                                                     "it was restarted"))
            except TimeoutError:
                self._stop_process(kill=True)
                attempts.append(Attempt(False, error="the forwarding process did not answer in time; "
                                                     "it was restarted"))
        return attempts[:len(paths)]

    def _release_if_idle(self) -> None:
        with self._lock:
            if self._pipe is None:
                return
            try:
                self._pipe.send(("idle", None))
                self._answer(self._pipe)
            except (EOFError, OSError, TimeoutError):
                self._stop_process(kill=True)

    def _answer(self, pipe: Connection):
        if not pipe.poll(self._deadline):
            raise TimeoutError
        return pipe.recv()

    def _started(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._pipe is not None:
            return self._pipe
        self._stop_process(kill=True)
        self._process, self._pipe = spawn_worker(forward, f"forward-{self.destination.name}", self.destination,
                                                 self.calling_ae_title)
        return self._pipe

    def _stop(self) -> None:
        with self._lock:
            if self._process is None:
                return
            try:
                assert self._pipe is not None
                self._pipe.send(("close", None))
                self._pipe.poll(STOP_SECONDS)
            except (EOFError, OSError):
                pass
            self._stop_process(kill=False)

    def _stop_process(self, *, kill: bool) -> None:
        process, pipe = self._process, self._pipe
        self._process = self._pipe = None
        end_worker(process, pipe, kill=kill)


def forward(pipe: Connection, destination: DicomDestination, calling_ae_title: str, log_level: int) -> None:
    """The forwarding process: answer each request on `pipe` until asked to close or the engine is gone."""
    from engine import logs

    logs.setup(logging.getLevelName(log_level))
    quiet_standard_handlers()
    links = [CStoreLink(destination, calling_ae_title=calling_ae_title) for _ in range(destination.associations)]
    free: queue.SimpleQueue[CStoreLink] = queue.SimpleQueue()
    for link in links:
        free.put(link)
    with concurrent.futures.ThreadPoolExecutor(len(links), thread_name_prefix="c-store") as pool:
        try:
            while True:
                try:
                    kind, argument = pipe.recv()
                except (EOFError, OSError):
                    return  # the engine ended (or was killed): nothing more will be asked
                try:
                    if kind == "send":
                        assert argument is not None
                        for attempt in _send_run(pool, free, argument, destination.name):
                            pipe.send(attempt)
                        pipe.send(None)  # the run is over
                    elif kind == "idle":
                        for link in links:
                            link.idle()
                        pipe.send(None)
                    else:
                        pipe.send(None)
                        return
                except OSError:
                    return  # the engine went away while this run was sent: it sends the run again itself
        finally:
            for link in links:
                link.close()


def _send_run(pool: concurrent.futures.Executor, free: "queue.SimpleQueue[CStoreLink]", paths: list[str],
              destination: str) -> Iterator[Attempt]:
    """Each file on whichever association is free, outcomes in the files' order; none started after a failure.

    A PACS answers a C-STORE only once it has stored the image: with one association the engine would wait
    out each of those in turn. Files already in flight when one fails are still reported (sent or not).
    """
    failed = threading.Event()

    def send(path: str) -> Attempt | None:
        if failed.is_set():
            return None
        link = free.get()
        try:
            attempt = _send_file(link, path, destination)
        finally:
            free.put(link)
        if not attempt.ok:
            failed.set()
        return attempt

    for future in [pool.submit(send, path) for path in paths]:
        attempt = future.result()
        if attempt is None:
            break  # not started, behind a failure; files start in order, so none after it started either
        yield attempt


def _send_file(link: "CStoreLink", path: str, destination: str) -> Attempt:
    try:
        return link.send(Path(path))
    except Exception as exc:  # a defect costs a retry of this image, not the process
        log.error("C-STORE failed", exc_info=True, extra={"destination": destination})
        link.close()
        return Attempt(False, error=f"C-STORE failed: {exc.__class__.__name__}")


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set, medium priority, data set present (PS3.7 9.3.1.1, Implicit VR Little Endian)."""
    return command_set([
        (0x0002, uid_value(sop_class_uid)),  # Affected SOP Class UID
        (0x0100, us_value(0x0001)),  # Command Field: C-STORE-RQ
        (0x0110, us_value(message_id)),  # Message ID
        (0x0700, us_value(0x0000)),  # Priority: medium
        (0x0800, us_value(0x0001)),  # Command Data Set Type: anything but 0x0101, a data set follows
        (0x1000, uid_value(sop_instance_uid)),  # Affected SOP Instance UID
    ])


def p_data_tf(context_id: int, value: bytes, maximum_length: int, *, command_set: bool = False) -> list[bytes]:
    """`value` as P-DATA-TF PDUs of one PDV each, none longer than the peer's maximum length (0: no limit).

    PS3.8 9.3.5 and E.2: PDU type 04H, reserved, PDU length; PDV item length, presentation context ID, message
    control header (bit 0: command, bit 1: last fragment), the fragment. The 6 bytes before the fragment count
    in the PDU length the peer limits.
    """
    size = maximum_length - 6 if maximum_length else max(len(value), 1)
    pdus = []
    for start in range(0, max(len(value), 1), size):
        fragment = value[start:start + size]
        control = (0x01 if command_set else 0x00) | (0x02 if start + size >= len(value) else 0x00)
        pdus.append(struct.pack(">BBIIBB", 0x04, 0x00, len(fragment) + 6, len(fragment) + 2, context_id, control)
                    + fragment)
    return pdus


class CStoreLink:
    """Sends spooled Part 10 files with C-STORE over a kept association; runs in the forwarding process."""

    def __init__(self, destination: DicomDestination, *, calling_ae_title: str) -> None:
        # Switch for the forwarding process, which only sends C-STORE from a path: send_c_store(path) then
        # streams the file's dataset bytes instead of decoding and re-encoding the whole image.
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.destination = destination
        self.ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
        self.ae.acse_timeout = destination.connect_timeout_seconds
        self.ae.connection_timeout = destination.connect_timeout_seconds
        self.ae.dimse_timeout = destination.response_timeout_seconds
        self.ae.network_timeout = max(destination.response_timeout_seconds, destination.idle_release_seconds + 30)
        self.ae.maximum_pdu_size = 0  # no limit on what the PACS may send back
        self.assoc = None
        self.accepted: dict[tuple[str, str], int] = {}  # (SOP class, transfer syntax) -> presentation context id
        self.wanted: dict[tuple[str, str], None] = {}  # insertion-ordered: the most recent kept when over 128
        self.last_used = 0.0
        self.message_id = 0
        tls = destination.tls
        self.tls_args = (client_context(tls), tls.server_name or destination.host) if tls else None

    def send(self, path: Path) -> Attempt:
        try:
            meta, offset = split_dataset(path)  # the file meta, and where the dataset begins
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
            if self.tls_args is None:
                status = self._store(assoc, path, offset, pair, str(meta.MediaStorageSOPInstanceUID))
            else:  # an SSL connection is not to be written by one thread while pynetdicom's reads it
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
            return Attempt(True, response=answer)
        if 0xA700 <= code <= 0xA7FF:
            return Attempt(False, response=answer, error=f"{self.destination.ae_title} out of resources")
        return Attempt(False, response=answer, error=f"{self.destination.ae_title} refused the image", retry=False)

    def _store(self, assoc, path: Path, offset: int, pair: tuple[str, str], sop_instance_uid: str):
        """C-STORE of a Part 10 file, its request and dataset written to the socket as ready-made P-DATA-TF PDUs;
        the response is read by pynetdicom as for any request.

        pynetdicom's send_c_store encodes the command set with pydicom and passes each of the ~32 PDUs of an image
        (a PACS's 16 KiB maximum) through its DUL thread's queue and state machine: ~3 ms of CPU per image in the
        forwarding process, on a machine whose two cores also run the engine and, often, the PACS. Here the
        command set is encoded by hand (PS3.7 9.3.1.1, Implicit VR Little Endian as PS3.7 6.3.1 requires) and the
        PDUs framed by hand (PS3.8 9.3.5); only data transfer (Sta6) is done so, never negotiation or release.
        """
        context_id = self.accepted[pair]
        with open(path, "rb") as file:
            file.seek(offset)
            dataset = file.read()
        self.message_id = self.message_id % 0xFFFF + 1
        command = c_store_rq(self.message_id, pair[0], sop_instance_uid)
        limit = assoc.acceptor.maximum_length or 0
        pdus = [*p_data_tf(context_id, command, limit, command_set=True), *p_data_tf(context_id, dataset, limit)]
        # pynetdicom's own send_c_store pauses the association's reactor the same way, so that the reactor does
        # not take the response off the queue for a request of the peer's
        assoc._reactor_checkpoint.clear()
        try:
            while not assoc._is_paused and assoc.is_established:
                time.sleep(0.0001)
            assoc.dul.socket.socket.sendall(b"".join(pdus))
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if response is None or getattr(response, "MessageIDBeingRespondedTo", None) != self.message_id:
            return None
        return assoc._check_received_status(response)

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
        assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title, tls_args=self.tls_args,
                                  evt_handlers=TUNING)
        if not assoc.is_established:
            raise ConnectionError(f"association with {d.ae_title}@{d.host}:{d.port} "
                                  f"{'rejected' if assoc.is_rejected else 'failed'}")
        self.assoc = assoc
        self.accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx.context_id
                         for cx in assoc.accepted_contexts}
        self.last_used = time.monotonic()
        return assoc

    def _drop(self, release: bool = False) -> None:
        assoc, self.assoc = self.assoc, None
        self.accepted = {}
        if assoc is None:
            return
        if release and assoc.is_established:
            assoc.release()
        else:
            assoc.abort()

    def idle(self) -> None:
        """Release the association once it has been idle long enough."""
        if self.assoc is not None and time.monotonic() - self.last_used >= self.destination.idle_release_seconds:
            self._drop(release=True)

    def close(self) -> None:
        self._drop(release=True)
