"""A capture station's live side: the open session (whose images these are), stills, clip recording.

The session says who and which order: picked from the worklist, found by a scanned accession number, or typed in
by hand for a device without a worklist (then its images are held until the order arrives: service.reconcile).
Every capture becomes a Part 10 file first (engine.non_dicom_capture.service.CaptureService.keep); what happens
to it next (review, send, hold) is the service's business.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import numpy as np

from engine.config import CaptureStation
from engine.errors import InvalidTransition
from engine.non_dicom_capture import wrap
from engine.non_dicom_capture.media import ClipEncoder, MediaError
from engine.non_dicom_capture.sources import FrameHub, SourceUnavailable, frame_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatientInfo:
    """A patient as the DICOM mappings read it (dicom_worklist.PatientRow), detached from the database."""

    patient_id: str
    issuer: str = ""
    family_name: str = ""
    given_name: str = ""
    family_pinyin: str = ""
    given_pinyin: str = ""
    name_is_latin: bool = False
    birth_date: str = ""
    sex: str = ""


@dataclass(frozen=True)
class OrderInfo:
    accession: str
    study_instance_uid: str
    placer_number: str = ""
    filler_number: str = ""
    requested_procedure_id: str = ""
    procedure_code: str = ""
    procedure_scheme: str = ""
    procedure_meaning: str = ""
    priority: str = ""
    referring_physician: str = ""
    reason: str = ""
    department: str = ""
    patient_location: str = ""


@dataclass(frozen=True)
class StepInfo:
    step_id: str = ""
    modality: str = ""
    station_aet: str = ""
    station_name: str = ""
    location: str = ""
    start_date: str = ""
    start_time: str = ""
    description: str = ""
    performing_physician: str = ""
    status: str = ""


def snapshot(cls, row: Any):
    """A frozen copy of the columns a mapping reads, so that nothing lazy-loads after the session closed."""
    return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Subject:
    """Whose images: with an order (worklist, barcode) or manual (order None until reconciled)."""

    patient: PatientInfo
    order: OrderInfo | None
    step: StepInfo | None
    accession: str = ""  # a manual entry may know the accession number before the order exists

    @property
    def manual(self) -> bool:
        return self.order is None


@dataclass
class CaptureSession:
    subject: Subject
    series: wrap.Series
    next_instance: int = 1
    mpps_uid: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take_number(self) -> int:
        with self.lock:
            number, self.next_instance = self.next_instance, self.next_instance + 1
            return number


class Recorder:
    """Subscribes to the hub and encodes every frame it gets on its own thread (the hub never waits for it)."""

    def __init__(self, hub: FrameHub, *, preset: str, max_seconds: float, started: datetime) -> None:
        self.hub, self.preset, self.max_seconds, self.started = hub, preset, max_seconds, started
        self.queue = hub.subscribe()
        self.encoder: ClipEncoder | None = None
        self.received = 0
        self.error: Exception | None = None
        self.limit_reached = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"record:{hub.name}", daemon=True)
        self._thread.start()
        self.encode_seconds = 0.0

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            if self.error is not None or self.limit_reached:
                continue
            try:
                began = time.perf_counter()
                if self.encoder is None:
                    self.encoder = ClipEncoder(item.frame.width, item.frame.height, self.hub.fps or 30,
                                               preset=self.preset)
                self.encoder.feed(item.frame)
                self.received += 1
                self.encode_seconds += time.perf_counter() - began
                if self.encoder.frames >= self.max_seconds * self.encoder.fps:
                    self.limit_reached = True
                    self.hub.unsubscribe(self.queue)
            except Exception as exc:  # an encoder failure ends this clip, not the station
                self.error = exc
                self.hub.unsubscribe(self.queue)

    @property
    def dropped(self) -> int:
        return getattr(self.queue, "dropped", 0)

    def stop(self) -> wrap.Clip:
        self.hub.unsubscribe(self.queue)
        self._stopping.set()
        self._thread.join()
        if self.error is not None:
            if self.encoder is not None:
                self.encoder.abort()
            raise MediaError(f"clip encoding failed: {self.error.__class__.__name__}")
        if self.encoder is None:
            raise MediaError("no frame arrived while recording")
        began = time.perf_counter()
        clip = self.encoder.finish()
        self.encode_seconds += time.perf_counter() - began
        return clip

    def status(self) -> dict:
        return {"recording": True, "frames": self.received, "dropped": self.dropped, "limit_reached": self.limit_reached,
                "seconds": round(self.received / (self.hub.fps or 30), 1)}


class Station:
    """One configured station: its device hub, its open session, its recorder and a short event list."""

    def __init__(self, settings: CaptureStation, info: wrap.Station) -> None:
        self.settings, self.info = settings, info
        self.hub = FrameHub(settings.device, settings.name) if settings.device else None
        self.session: CaptureSession | None = None
        self.recorder: Recorder | None = None
        self.lock = threading.RLock()
        self.events: deque[dict] = deque(maxlen=50)

    @property
    def name(self) -> str:
        return self.settings.name

    def event(self, level: str, text: str) -> None:
        """What the page shows under the preview; the log gets the same line (ids, never patient data)."""
        self.events.appendleft({"at": time.time(), "level": level, "text": text})
        getattr(log, "error" if level == "error" else "info")(text, extra={"station": self.name})

    def require_session(self) -> CaptureSession:
        if self.session is None:
            raise InvalidTransition("no patient selected at this station: pick one from the worklist first")
        return self.session

    def require_hub(self) -> FrameHub:
        if self.hub is None:
            raise SourceUnavailable("this station has no video device (file import only)")
        return self.hub

    def grab(self) -> tuple[np.ndarray, np.ndarray]:
        """The latest frame as RGB and as a thumbnail."""
        item = self.require_hub().latest()
        rgb = frame_rgb(item.frame)
        w = min(160, item.frame.width)
        thumb = frame_rgb(item.frame, w, max(2, int(item.frame.height * w / item.frame.width)))
        return rgb, thumb

    def start_clip(self, now: datetime) -> None:
        with self.lock:
            self.require_session()
            hub = self.require_hub()
            if self.recorder is not None:
                raise InvalidTransition("a clip is already recording")
            hub.latest()  # a failed device refuses here, with its reason
            self.recorder = Recorder(hub, preset=self.settings.clip_preset, max_seconds=self.settings.clip_max_seconds,
                                     started=now)

    def stop_clip(self) -> tuple[wrap.Clip, Recorder]:
        with self.lock:
            recorder, self.recorder = self.recorder, None
        if recorder is None:
            raise InvalidTransition("no clip is recording")
        return recorder.stop(), recorder

    def status(self) -> dict:
        session = self.session
        subject = None
        if session is not None:
            s = session.subject
            subject = {"patient_id": s.patient.patient_id, "accession": s.order.accession if s.order else s.accession,
                       "manual": s.manual, "name": _display_name(s.patient), "series": session.series.series_instance_uid,
                       "procedure": s.order.procedure_meaning if s.order else ""}
        return {"name": self.name, "ae_title": self.settings.ae_title, "modality": self.settings.modality,
                "iod": self.info.iod, "device": self.hub.status() if self.hub else None,
                "folder": self.settings.folder.path if self.settings.folder else None, "session": subject,
                "clip": self.recorder.status() if self.recorder else {"recording": False},
                "events": list(self.events)[:10]}


def _display_name(patient: PatientInfo) -> str:
    ideographic = f"{patient.family_name}{patient.given_name}" if not patient.name_is_latin else ""
    alphabetic = " ".join(p for p in (patient.family_pinyin.upper(), patient.given_pinyin.upper()) if p)
    if patient.name_is_latin:
        return f"{patient.family_name}, {patient.given_name}".strip(", ")
    return f"{ideographic} ({alphabetic})" if ideographic and alphabetic else ideographic or alphabetic

