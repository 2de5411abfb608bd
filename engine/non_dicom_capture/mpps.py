"""Optional MPPS SCU of a capture session, as a modality would send it (PS3.4 F.7.2, IHE RAD-6/RAD-7).

N-CREATE IN PROGRESS when a session for an order opens, N-SET COMPLETED with the performed series when it closes,
to the engine's own MPPS SCP. A failure is reported on the station and in the log; capture goes on without it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

if TYPE_CHECKING:
    from engine.channels.runtime import Engine
    from engine.non_dicom_capture.station import CaptureSession, Station

log = logging.getLogger(__name__)


def _associate(engine: "Engine", station: "Station"):
    ae = AE(ae_title=station.settings.ae_title)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    dicom = engine.config.dicom
    host = "127.0.0.1" if dicom.host in ("0.0.0.0", "::", "") else dicom.host
    assoc = ae.associate(host, dicom.port, ae_title=dicom.ae_title)
    if not assoc.is_established:
        raise ConnectionError("MPPS SCP association failed")
    return assoc


def mpps_start(engine: "Engine", station: "Station", session: "CaptureSession") -> str | None:
    """N-CREATE (PS3.4 F.7.2.1); returns the MPPS SOP Instance UID, or None when the SCP could not take it."""
    subject, series = session.subject, session.series
    order, step = subject.order, subject.step
    if order is None:
        return None
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # descriptions are the order's, often Chinese
    item = Dataset()
    item.StudyInstanceUID = series.study_instance_uid
    item.ReferencedStudySequence = DicomSequence([])
    item.AccessionNumber = order.accession
    item.RequestedProcedureID = order.requested_procedure_id
    item.RequestedProcedureDescription = order.procedure_meaning[:64]
    item.ScheduledProcedureStepID = step.step_id if step else ""
    item.ScheduledProcedureStepDescription = (step.description if step else "")[:64]
    item.ScheduledProtocolCodeSequence = DicomSequence([])
    ds.ScheduledStepAttributesSequence = DicomSequence([item])
    ds.PatientName = subject.patient.family_pinyin.upper() + "^" + subject.patient.given_pinyin.upper()
    ds.PatientID = subject.patient.patient_id
    ds.PatientBirthDate = subject.patient.birth_date
    ds.PatientSex = subject.patient.sex
    ds.ReferencedPatientSequence = DicomSequence([])
    ds.PerformedProcedureStepID = series.series_instance_uid[-16:]
    ds.PerformedStationAETitle = station.settings.ae_title
    ds.PerformedStationName = station.info.station_name
    ds.PerformedLocation = ""
    started = series.started
    ds.PerformedProcedureStepStartDate = started.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = started.strftime("%H%M%S")
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = order.procedure_meaning[:64]
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = DicomSequence([])
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = station.info.series_modality("still")
    ds.StudyID = series.study_id
    ds.PerformedProtocolCodeSequence = DicomSequence([])
    ds.PerformedSeriesSequence = DicomSequence([])
    uid = engine.ids.uid()
    try:
        assoc = _associate(engine, station)
        try:
            status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
        finally:
            assoc.release()
        if status is None or status.Status not in (0x0000,):
            raise ConnectionError(f"N-CREATE status {getattr(status, 'Status', None)}")
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        station.event("error", f"MPPS N-CREATE failed: {exc}")
        return None
    station.event("info", "MPPS in progress")
    return uid


def mpps_end(engine: "Engine", station: "Station", session: "CaptureSession", items: list) -> None:
    """N-SET COMPLETED with the performed series and its instances (PS3.4 F.7.2.2)."""
    now = engine.clock.now()
    series_item = Dataset()
    series_item.PerformingPhysicianName = ""
    series_item.ProtocolName = "capture"
    series_item.OperatorsName = ""
    series_item.SeriesInstanceUID = session.series.series_instance_uid
    series_item.SeriesDescription = ""
    series_item.RetrieveAETitle = ""
    references = []
    for row in items:
        reference = Dataset()
        reference.ReferencedSOPClassUID = row.sop_class_uid
        reference.ReferencedSOPInstanceUID = row.sop_instance_uid
        references.append(reference)
    series_item.ReferencedImageSequence = DicomSequence(references)
    series_item.ReferencedNonImageCompositeSOPInstanceSequence = DicomSequence([])
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = now.strftime("%Y%m%d")
    ds.PerformedProcedureStepEndTime = now.strftime("%H%M%S")
    ds.PerformedSeriesSequence = DicomSequence([series_item])
    try:
        assoc = _associate(engine, station)
        try:
            status, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, session.mpps_uid)
        finally:
            assoc.release()
        if status is None or status.Status != 0x0000:
            raise ConnectionError(f"N-SET status {getattr(status, 'Status', None)}")
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        station.event("error", f"MPPS N-SET failed: {exc}")
        return
    station.event("info", "MPPS completed")
