"""Capture stations as an engine service: sessions from the worklist, items kept, sent through image routing.

Captured objects take the same store-and-forward path as images a modality sends (IHE RAD-8): the capture
channel's ImageRouter coerces them from their order, spools them, journals one message and one delivery row per
destination, and the dispatcher sends and retries. A station only keeps its own Part 10 file and a capture_item
row (review | held | sent | deleted) so that the operator can review, delete and send, and so that a manual
capture waits, on disk and in the database, for its order (reconcile).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pydicom import dcmread
from sqlalchemy import insert, or_, select, update

from engine import __version__
from engine.actors.image_router import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, ImageRouter, ReceivedImage
from engine.config import CaptureSettings, CaptureStation, DicomSource, WorklistSettings
from engine.errors import BadValue, EngineError, InvalidTransition, UnknownKey
from engine.mappings.dicom_coercion import apply_coercion, coercion_values
from engine.mappings.dicom_worklist import CharacterProfile
from engine.mappings.pinyin import PinyinStyle, read_name
from engine.non_dicom_capture import media, wrap
from engine.non_dicom_capture.station import (
    CaptureSession,
    OrderInfo,
    PatientInfo,
    Station,
    StepInfo,
    Subject,
    snapshot,
)
from engine.store.spool import Spool
from engine.store.tables import CaptureItem, Delivery, ImagingOrder, Patient, ScheduledStep

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

log = logging.getLogger(__name__)

OPEN_STEPS = ("SCHEDULED", "ARRIVED", "READY", "STARTED")
CLOSED_ORDERS = ("CA", "DC", "CM")
ITEM = CaptureItem.__table__


class CaptureService:
    """All capture stations of one engine, and the import path shared by the watched folders and the CLI."""

    def __init__(self, engine: "Engine", settings: CaptureSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or engine.config.capture or CaptureSettings()
        config = engine.config
        channel = next((c for c in config.channels if c.name == self.settings.channel), None)
        if channel is None or not isinstance(channel.source, DicomSource):
            channel = next((c for c in config.channels if isinstance(c.source, DicomSource)), None)
        if channel is None:
            raise BadValue("capture needs a channel with a dicom source and destinations (image routing)")
        self.root = engine.data_dir / "capture"
        names = config.worklist.names if isinstance(config.worklist, WorklistSettings) else WorklistSettings().names
        self.profile = CharacterProfile(self.settings.character_profile,
                                        PinyinStyle(case=names.case, umlaut=names.umlaut), dict(names.surname_readings))
        self.router = ImageRouter(channel, engine.store, engine.writer, engine.clock, Spool(self.root / "spool"),
                                  ae_title=config.dicom.ae_title, names=config.worklist)
        self.stations = {s.name: Station(s, self._station_info(s)) for s in self.settings.stations}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _station_info(self, s: CaptureStation) -> wrap.Station:
        return wrap.Station(ae_title=s.ae_title, modality=s.modality, iod=wrap.iod_for(s.iod, s.modality),
                            station_name=s.station_name or s.name[:16], manufacturer=s.manufacturer or "swf-engine",
                            model_name=s.model_name or "capture station", serial_number=s.serial_number,
                            institution=s.institution, software_version=f"swf-engine {__version__}",
                            burned_in_annotation=s.burned_in_annotation, anatomic_region=s.anatomic_region)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        for station in self.stations.values():
            if station.hub is not None:
                station.hub.start()
            if station.settings.folder is not None:
                self._spawn(f"watch:{station.name}", self._watch, station)
        self._spawn("capture-reconcile", self._reconcile_loop)

    def stop(self) -> None:
        self._stop.set()
        for station in self.stations.values():
            if station.recorder is not None:
                station.recorder.hub.unsubscribe(station.recorder.queue)
            if station.hub is not None:
                station.hub.stop()
        for thread in self._threads:
            thread.join(timeout=10)

    def _spawn(self, name: str, target: Callable, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def station(self, name: str) -> Station:
        try:
            return self.stations[name]
        except KeyError:
            raise UnknownKey(f"no capture station {name!r}") from None

    # --- patients and orders --------------------------------------------------------------------

    def worklist(self, station: Station, text: str = "", limit: int = 200) -> list[dict]:
        """Open worklist entries for the station's AE title or modality (what a modality's MWL query would get)."""
        s = station.settings
        with self.engine.store.session() as session:
            query = (select(ScheduledStep, ImagingOrder, Patient).join(ImagingOrder, ScheduledStep.order_ref == ImagingOrder.id)
                     .join(Patient, ImagingOrder.patient_ref == Patient.id)
                     .where(ScheduledStep.status.in_(OPEN_STEPS), ImagingOrder.status.not_in(CLOSED_ORDERS),
                            or_(ScheduledStep.station_aet == s.ae_title, ScheduledStep.modality == s.modality))
                     .order_by(ScheduledStep.start_date, ScheduledStep.start_time, ScheduledStep.id).limit(limit))
            if text:
                like = f"%{text.strip().upper()}%"
                query = query.where(or_(ImagingOrder.accession.ilike(like), Patient.patient_id.ilike(like),
                                        Patient.name_alphabetic.like(like), Patient.name_ideographic.like(f"%{text.strip()}%")))
            rows = session.execute(query).all()
            return [{"accession": o.accession, "patient_id": p.patient_id, "name": f"{p.family_name}{p.given_name}",
                     "pinyin": f"{p.family_pinyin} {p.given_pinyin}".strip().upper(), "birth_date": p.birth_date,
                     "sex": p.sex, "procedure": o.procedure_meaning, "modality": st.modality,
                     "station_aet": st.station_aet, "start": f"{st.start_date} {st.start_time}".strip(),
                     "step_status": st.status} for st, o, p in rows]

    def subject_for_accession(self, accession: str, modality: str = "") -> Subject:
        with self.engine.store.session() as session:
            order = session.scalars(select(ImagingOrder).where(ImagingOrder.accession == accession.strip())).first()
            if order is None:
                raise UnknownKey("no order with that accession number")
            return self._subject(session, order, modality)

    def _subject(self, session, order: ImagingOrder, modality: str) -> Subject:
        patient = order.patient
        for _ in range(16):  # A40 merges: the surviving record
            if patient.merged_into_id is None:
                break
            patient = session.get(Patient, patient.merged_into_id)
        steps = list(order.steps)
        step = next((s for s in steps if s.modality == modality), steps[0] if steps else None)
        return Subject(snapshot(PatientInfo, patient), snapshot(OrderInfo, order),
                       snapshot(StepInfo, step) if step is not None else None, order.accession)

    def manual_subject(self, patient_id: str, name: str, *, birth_date: str = "", sex: str = "",
                       accession: str = "") -> Subject:
        """A patient typed in at a station without a worklist; the order is found later (reconcile)."""
        patient_id = patient_id.strip()
        if not patient_id:
            raise BadValue("a manual entry needs the patient ID, to be matched with its order later")
        try:
            reading = read_name(name.strip(), surname_readings=self.profile.surname_readings)
        except ValueError as exc:
            raise BadValue(f"patient name: {exc}") from None
        info = PatientInfo(patient_id=patient_id, family_name=reading.family, given_name=reading.given,
                           family_pinyin=reading.family_pinyin, given_pinyin=reading.given_pinyin,
                           name_is_latin=reading.latin, birth_date=birth_date.replace("-", "")[:8],
                           sex=sex.strip().upper()[:1])
        return Subject(info, None, None, accession.strip()[:16])

    def open_session(self, station: Station, subject: Subject) -> CaptureSession:
        with station.lock:
            if station.recorder is not None:
                raise InvalidTransition("stop the clip before changing the patient")
            self.close_session(station)
            now = self.engine.clock.now()
            ids = self.engine.ids
            order = subject.order
            series = wrap.Series(study_instance_uid=order.study_instance_uid if order else ids.uid(),
                                 series_instance_uid=ids.uid(), series_number=int(now.strftime("%H%M%S")) or 1,
                                 started=now, accession=order.accession if order else subject.accession,
                                 study_id=(order.requested_procedure_id if order else "")[:16],
                                 description=order.procedure_meaning if order else "")
            station.session = CaptureSession(subject, series)
            if station.settings.mpps and order is not None:
                from engine.non_dicom_capture.mpps import mpps_start

                station.session.mpps_uid = mpps_start(self.engine, station, station.session)
            station.event("info", f"session opened ({'manual entry' if subject.manual else 'order ' + (order.accession if order else '')})")
            return station.session

    def close_session(self, station: Station) -> None:
        with station.lock:
            session, station.session = station.session, None
            if session is not None and session.mpps_uid:
                from engine.non_dicom_capture.mpps import mpps_end

                mpps_end(self.engine, station, session, self._series_items(session.series.series_instance_uid))

    # --- capture ------------------------------------------------------------------------------

    def still(self, station: Station) -> dict:
        session = station.require_session()
        rgb, thumb = station.grab()
        still = media.still_from_rgb(rgb, jpeg=station.settings.still_encoding == "jpeg",
                                     quality=station.settings.jpeg_quality)
        return self._wrap_and_keep(station, session, still=still, thumb=thumb, source="device")

    def start_clip(self, station: Station) -> None:
        station.start_clip(self.engine.clock.now())
        station.event("info", "clip recording started")

    def stop_clip(self, station: Station) -> dict:
        session = station.require_session()
        clip, recorder = station.stop_clip()
        thumb = recorder.encoder.first_rgb if recorder.encoder is not None else None
        item = self._wrap_and_keep(station, session, clip=clip, thumb=thumb, source="device", acquired=recorder.started)
        item["recorded"] = {"frames": recorder.received, "dropped": recorder.dropped,
                            "encode_seconds": round(recorder.encode_seconds, 3)}
        return item

    def import_file(self, station: Station, path: Path, *, source: str = "import") -> dict:
        """An exported still or clip wrapped for the station's open session (watched folder, CLI)."""
        session = station.require_session()
        kind = media.file_kind(path)
        if kind is None:
            raise media.MediaError(f"{path.name}: not an image or video file this station takes")
        if kind == "still":
            rgb = media.read_still_file(path)
            still = media.still_from_rgb(rgb, jpeg=station.settings.still_encoding == "jpeg",
                                         quality=station.settings.jpeg_quality)
            return self._wrap_and_keep(station, session, still=still, thumb=_small(rgb), source=source)
        clip = media.read_clip_file(path, preset=station.settings.clip_preset,
                                    max_seconds=station.settings.clip_max_seconds)
        return self._wrap_and_keep(station, session, clip=clip, thumb=None, source=source)

    def _wrap_and_keep(self, station: Station, session: CaptureSession, *, still=None, clip=None, thumb=None,
                       source: str, acquired: datetime | None = None) -> dict:
        now = self.engine.clock.now()
        subject = session.subject
        arguments = dict(sop_instance_uid=self.engine.ids.uid(), instance_number=session.take_number(),
                         acquired=acquired or now, created=now)
        if still is not None:
            wrapped = wrap.wrap_still(still, subject.patient, subject.order, subject.step, station.info,
                                      session.series, self.profile, **arguments)
        else:
            wrapped = wrap.wrap_clip(clip, subject.patient, subject.order, subject.step, station.info,
                                     session.series, self.profile, **arguments)
        data = wrap.part10_file(wrapped, wrap.encode(wrapped), source_ae=station.settings.ae_title,
                                implementation_uid=IMPLEMENTATION_CLASS_UID, implementation_version=IMPLEMENTATION_VERSION)
        path = self.root / "items" / now.strftime("%Y%m%d") / f"{wrapped.sop_instance_uid}.dcm"
        _write_durably(path, data)
        if thumb is not None:
            path.with_suffix(".jpg").write_bytes(media.thumbnail(thumb))
        utc = self.engine.clock.utcnow()
        row = dict(station=station.name, series_instance_uid=session.series.series_instance_uid,
                   sop_instance_uid=wrapped.sop_instance_uid, sop_class_uid=wrapped.sop_class_uid,
                   kind="still" if still is not None else "clip", state="review", path=str(path),
                   frames=1 if still is not None else clip.frames, size=len(data), manual=subject.manual,
                   patient_id=subject.patient.patient_id, accession=session.series.accession,
                   source=source, error="", created_at=utc, updated_at=utc)
        item_id = self._write(lambda db: db.execute(insert(ITEM).returning(ITEM.c.id), [row]).scalar_one())
        if station.settings.send == "immediately" or source == "import":
            self.send(station, [item_id])
        return self.item(item_id)

    # --- items: review, delete, send ------------------------------------------------------------

    def items(self, station: Station | None = None, series: str | None = None, limit: int = 200) -> list[dict]:
        with self.engine.store.session() as db:
            query = select(CaptureItem).where(CaptureItem.state != "deleted").order_by(CaptureItem.id.desc()).limit(limit)
            if station is not None:
                query = query.where(CaptureItem.station == station.name)
            if series:
                query = query.where(CaptureItem.series_instance_uid == series)
            rows = list(db.scalars(query))
            return [self._describe(db, row) for row in rows]

    def item(self, item_id: int) -> dict:
        with self.engine.store.session() as db:
            row = db.get(CaptureItem, item_id)
            if row is None or row.state == "deleted":
                raise UnknownKey("no such capture item")
            return self._describe(db, row)

    def _describe(self, db, row: CaptureItem) -> dict:
        delivery = {}
        if row.message_id is not None:
            deliveries = list(db.scalars(select(Delivery).where(Delivery.message_id == row.message_id)))
            delivery = {d.destination: {"status": d.status, "attempts": d.attempts, "error": d.last_error}
                        for d in deliveries}
        return {"id": row.id, "station": row.station, "kind": row.kind, "state": row.state,
                "sop_instance_uid": row.sop_instance_uid, "sop_class_uid": row.sop_class_uid,
                "series_instance_uid": row.series_instance_uid, "frames": row.frames, "size": row.size,
                "manual": row.manual, "accession": row.accession, "source": row.source, "error": row.error,
                "created_at": row.created_at.isoformat(), "deliveries": delivery}

    def _series_items(self, series: str) -> list[CaptureItem]:
        with self.engine.store.session() as db:
            return list(db.scalars(select(CaptureItem).where(CaptureItem.series_instance_uid == series,
                                                            CaptureItem.state != "deleted")))

    def thumbnail_path(self, item_id: int) -> Path | None:
        with self.engine.store.session() as db:
            row = db.get(CaptureItem, item_id)
            path = Path(row.path).with_suffix(".jpg") if row is not None else None
        return path if path is not None and path.exists() else None

    def delete(self, item_id: int) -> None:
        with self.engine.store.session() as db:
            row = db.get(CaptureItem, item_id)
            if row is None or row.state == "deleted":
                raise UnknownKey("no such capture item")
            if row.state == "sent":
                raise InvalidTransition("the item was sent already; it can no longer be deleted here")
            path = Path(row.path)
        self._update(item_id, state="deleted")
        for p in (path, path.with_suffix(".jpg")):
            p.unlink(missing_ok=True)

    def send(self, station: Station | None, item_ids: list[int] | None = None) -> list[dict]:
        """Hand review items to image routing; manual ones are held for their order instead."""
        with self.engine.store.session() as db:
            query = select(CaptureItem).where(CaptureItem.state == "review")
            if station is not None:
                query = query.where(CaptureItem.station == station.name)
            if item_ids is not None:
                query = query.where(CaptureItem.id.in_(item_ids))
            rows = [(r.id, r.manual, r.station, Path(r.path)) for r in db.scalars(query)]
        results = []
        for item_id, hold, station_name, path in rows:
            if hold:
                self._update(item_id, state="held", error="")
            else:
                self._route(item_id, station_name, path)
            results.append(self.item(item_id))
        return results

    def _route(self, item_id: int, station_name: str, path: Path) -> None:
        station = self.stations.get(station_name)
        ae_title = station.settings.ae_title if station else self.engine.config.dicom.ae_title
        try:
            data = path.read_bytes()
            syntax, dataset = wrap.split_part10(data)
            ds_meta = dcmread(path, stop_before_pixels=True)
            image = ReceivedImage(calling_ae=ae_title, peer=f"capture:{station_name}",
                                  sop_class_uid=str(ds_meta.SOPClassUID), sop_instance_uid=str(ds_meta.SOPInstanceUID),
                                  transfer_syntax=syntax, data=dataset)
            stored = self.router.receive(image)
        except (EngineError, OSError, ValueError) as exc:
            text = f"not sent: {exc.__class__.__name__}: {exc}"
            self._update(item_id, error=text[:500])
            if station is not None:
                station.event("error", text)
            else:
                log.error(text, extra={"item": item_id})
            return
        self._update(item_id, state="sent", message_id=stored.message_id, error="")
        if stored.queued_on:
            self.engine.wake_dispatchers_threadsafe(*stored.queued_on)

    def _write(self, work: Callable):
        """Writes go through the journal writer: SQLite has one writer, and a read transaction that later
        writes fails at once (SQLITE_BUSY_SNAPSHOT) whenever the writer committed in between."""
        return self.engine.writer.run_blocking(work)

    def _update(self, item_id: int, **values) -> None:
        values["updated_at"] = self.engine.clock.utcnow()
        self._write(lambda db: db.execute(update(ITEM).where(ITEM.c.id == item_id).values(**values)))

    # --- reconciliation of manual captures ------------------------------------------------------

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.settings.reconcile_seconds):
            try:
                self.reconcile()
            except Exception:
                log.warning("capture reconciliation failed", exc_info=True)

    def reconcile(self) -> int:
        """Held manual captures whose order has arrived: take the order's study and demographics, then send."""
        with self.engine.store.session() as db:
            held = list(db.scalars(select(CaptureItem).where(CaptureItem.state == "held")))
            groups: dict[str, list[CaptureItem]] = {}
            for row in held:
                groups.setdefault(row.series_instance_uid, []).append(row)
            plans, ambiguous = [], []
            for series, rows in groups.items():
                first = rows[0]
                station = self.stations.get(first.station)
                modality = station.settings.modality if station else ""
                orders = self._candidates(db, first.accession, first.patient_id, modality)
                if len(orders) == 1:
                    plans.append((series, [(r.id, Path(r.path)) for r in rows], self._subject(db, orders[0], modality)))
                elif len(orders) > 1:
                    ambiguous += [r.id for r in rows if not r.error]
        for item_id in ambiguous:
            self._update(item_id, error="several orders match this patient: pick the accession number")
        count = 0
        for series, items, subject in plans:
            for item_id, path in items:
                self._retarget(path, subject)
                # no longer waiting for an order: sent like any other capture from here on
                self._update(item_id, accession=subject.order.accession, patient_id=subject.patient.patient_id,
                             state="review", manual=False, error="")
                count += 1
            for station in self.stations.values():
                if station.session is not None and station.session.series.series_instance_uid == series:
                    station.session = replace(station.session, subject=subject, series=replace(
                        station.session.series, study_instance_uid=subject.order.study_instance_uid,
                        accession=subject.order.accession))
            log.info("manual capture reconciled", extra={"series": series, "items": len(items),
                                                          "accession": subject.order.accession})
            self.send(None, [item_id for item_id, _ in items])
        return count

    def _candidates(self, db, accession: str, patient_id: str, modality: str) -> list[ImagingOrder]:
        if accession:
            order = db.scalars(select(ImagingOrder).where(ImagingOrder.accession == accession)).first()
            return [order] if order is not None else []
        query = (select(ImagingOrder).join(Patient, ImagingOrder.patient_ref == Patient.id)
                 .join(ScheduledStep, ScheduledStep.order_ref == ImagingOrder.id)
                 .where(Patient.patient_id == patient_id, ImagingOrder.status.not_in(CLOSED_ORDERS),
                        ScheduledStep.status.in_(OPEN_STEPS)))
        if modality:
            query = query.where(ScheduledStep.modality == modality)
        return list(db.scalars(query.distinct()))

    def _retarget(self, path: Path, subject: Subject) -> None:
        """Rewrite a held file for its order: patient, study and request as the order says (PS3.3 C.12.1.1.9.2)."""
        ds = dcmread(path)
        values = coercion_values(subject.patient, subject.order, subject.step, self.profile)
        values[0x0020000D] = subject.order.study_instance_uid  # StudyInstanceUID
        values[0x00200010] = subject.order.requested_procedure_id[:16]  # StudyID
        apply_coercion(ds, values, charset=self.profile.charset, now=self.engine.clock.now(),
                       modifying_system=self.engine.config.dicom.ae_title, source="manual entry", reason="CORRECT")
        temporary = path.with_suffix(".tmp")
        ds.save_as(temporary, enforce_file_format=True)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)

    # --- watched folders ------------------------------------------------------------------------

    def _watch(self, station: Station) -> None:
        folder = station.settings.folder
        assert folder is not None
        root = Path(folder.path)
        seen: dict[Path, tuple[int, float, float]] = {}
        waiting_said = False
        while not self._stop.wait(folder.poll_seconds):
            try:
                root.mkdir(parents=True, exist_ok=True)
                entries = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
            except OSError as exc:
                station.event("error", f"watched folder unreadable: {exc.strerror or exc}")
                continue
            now = time.monotonic()
            for path in entries:
                stat = path.stat()
                key = (stat.st_size, stat.st_mtime)
                previous = seen.get(path)
                if previous is None or previous[:2] != key:
                    seen[path] = (*key, now)
                    continue
                if now - previous[2] < folder.settle_seconds:
                    continue
                if station.session is None:
                    if not waiting_said:
                        station.event("info", "files waiting in the watched folder: select a patient")
                        waiting_said = True
                    continue
                waiting_said = False
                seen.pop(path, None)
                self._import_from_folder(station, path, folder.after)

    def _import_from_folder(self, station: Station, path: Path, after: str) -> None:
        try:
            item = self.import_file(station, path, source="folder")
        except EngineError as exc:
            station.event("error", f"{path.name}: {exc}")
            _move(path, path.parent / "failed")
            (path.parent / "failed" / f"{path.name}.error.txt").write_text(str(exc) + "\n", encoding="utf-8")
            return
        station.event("info", f"{path.name} imported as {item['kind']} {item['sop_instance_uid']}")
        if after == "delete":
            path.unlink(missing_ok=True)
        else:
            _move(path, path.parent / "done")


def _move(path: Path, directory: Path) -> None:
    directory.mkdir(exist_ok=True)
    shutil.move(str(path), str(directory / path.name))


def _small(rgb):
    from PIL import Image
    import numpy as np

    image = Image.fromarray(rgb)
    image.thumbnail((160, 120))
    return np.asarray(image)


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


async def start_capture(engine: "Engine"):
    """The `serve` service: stations, watched folders and reconciliation run while the engine does."""
    if engine.config.capture is None:
        async def nothing() -> None:
            return None
        return nothing
    service = CaptureService(engine)
    engine.extensions["capture"] = service
    service.start()
    log.info("capture stations started", extra={"stations": list(service.stations)})

    async def stop() -> None:
        import asyncio

        await asyncio.to_thread(service.stop)

    return stop
