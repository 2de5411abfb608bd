"""`swf-engine capture import --accession ACC FILE...`: exported stills and clips into DICOM for one order, sent.

The files take the watched folder's path (CaptureService.import_file): wrapped, kept, journaled for image routing.
Delivery is the dispatcher's: when `serve` runs on the same data directory its dispatcher sends them; otherwise
this command runs the capture channel's dispatchers itself until its deliveries are sent or `wait` runs out, and
what is left stays queued for the next `serve` (nothing is lost either way).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

from sqlalchemy import select

from engine.channels.dispatcher import DestinationDispatcher, sender_for
from engine.channels.runtime import Engine
from engine.config import CaptureStation
from engine.errors import EngineError
from engine.non_dicom_capture.service import CaptureService
from engine.store.tables import CaptureItem, Delivery

EXIT_OK, EXIT_FAILED, EXIT_QUEUED = 0, 1, 3


def _serve_running(engine: Engine) -> bool:
    """`serve` holds the engine's DICOM port: then its dispatcher delivers, and this command must not compete."""
    dicom = engine.config.dicom
    host = "127.0.0.1" if dicom.host in ("0.0.0.0", "::", "") else dicom.host
    try:
        with socket.create_connection((host, dicom.port), timeout=0.5):
            return True
    except OSError:
        return False


def _delivery_states(engine: Engine, message_ids: list[int]) -> list[str]:
    with engine.store.session() as session:
        return list(session.scalars(select(Delivery.status).where(Delivery.message_id.in_(message_ids))))


def _message_ids(engine: Engine, sop_instance_uids: list[str]) -> list[int]:
    with engine.store.session() as session:
        return [m for m in session.scalars(select(CaptureItem.message_id).where(
            CaptureItem.sop_instance_uid.in_(sop_instance_uids))) if m is not None]


async def _dispatch_until(engine: Engine, service: CaptureService, message_ids: list[int], wait: float) -> None:
    channel = service.router.channel
    dispatchers = [DestinationDispatcher(engine.store, engine.writer, engine.clock, channel.name, destination,
                                         idle_poll=0.2,
                                         sender=sender_for(destination, calling_ae_title=engine.config.dicom.ae_title))
                   for destination in channel.destinations]
    tasks = [asyncio.create_task(d.run()) for d in dispatchers]
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            states = await asyncio.to_thread(_delivery_states, engine, message_ids)
            if all(s in ("sent", "dead") for s in states):
                return
            await asyncio.sleep(0.2)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_import(engine: Engine, accession: str, files: list[Path], *, station_name: str | None = None,
               wait: float = 60.0, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Wrap, journal and deliver; prints one SOP Instance UID per file wrapped (stdout), problems on stderr."""
    service = CaptureService(engine)
    try:
        station = _station(service, engine, accession, station_name)
        subject = service.subject_for_accession(accession, station.settings.modality)
    except EngineError as exc:
        print(f"swf-engine capture import: {exc}", file=err)
        return EXIT_FAILED
    station.settings = station.settings.model_copy(update={"mpps": False})  # MPPS belongs to live sessions
    service.open_session(station, subject)
    created: list[str] = []
    failures = 0
    for path in files:
        try:
            item = service.import_file(station, path, source="import")
        except (EngineError, OSError) as exc:
            print(f"{path}: {exc}", file=err)
            failures += 1
            continue
        if item["state"] != "sent":
            print(f"{path}: wrapped as {item['sop_instance_uid']} but not queued: {item['error']}", file=err)
            failures += 1
        created.append(item["sop_instance_uid"])
        print(item["sop_instance_uid"], file=out, flush=True)
    message_ids = _message_ids(engine, created)
    if not message_ids:
        return EXIT_FAILED
    if _serve_running(engine):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not all(s in ("sent", "dead") for s in _delivery_states(engine, message_ids)):
            time.sleep(0.2)
    else:
        asyncio.run(_dispatch_until(engine, service, message_ids, wait))
    states = _delivery_states(engine, message_ids)
    pending = sum(s not in ("sent", "dead") for s in states)
    dead = states.count("dead")
    print(f"{len(created)} object(s) for order {accession}: {states.count('sent')} delivered, {pending} queued, "
          f"{dead} refused", file=err)
    if failures or dead:
        return EXIT_FAILED
    return EXIT_QUEUED if pending else EXIT_OK


def _station(service: CaptureService, engine: Engine, accession: str, name: str | None):
    if name:
        return service.station(name)
    modality = service.subject_for_accession(accession).step
    wanted = modality.modality if modality is not None else ""
    for station in service.stations.values():
        if station.settings.modality == wanted:
            return station
    from engine.non_dicom_capture.station import Station

    settings = CaptureStation(name="import", ae_title=engine.config.dicom.ae_title, modality=wanted or "OT",
                              send="immediately")
    station = Station(settings, service._station_info(settings))
    service.stations[station.name] = station
    return station
