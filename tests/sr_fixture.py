"""Basic Text SR reports as a reporting system writes them (PS3.3 A.35.1, TID 2000), valid under dciodvfy."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def text_item(concept: Dataset, text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = Sequence([concept])
    item.TextValue = text
    return item


def section(concept: Dataset, items: list[Dataset]) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType, item.ContinuityOfContent = "CONTAINS", "CONTAINER", "SEPARATE"
    item.ConceptNameCodeSequence = Sequence([concept])
    item.ContentSequence = Sequence(items)
    return item


def text_sr(*, accession: str, findings: list[str], impression: str, verified: bool, patient_id: str = "P1",
            patient_name: str = "Li^Ming=李^明", placer: str = "", filler: str = "", study_uid: str | None = None,
            signer: tuple[str, str] = ("D2001", "Wang^Jianguo=王^建国"), author: str = "Zhao^Zhuyuan=赵^住院",
            sop_class: str = BASIC_TEXT_SR, when: str = "20261122153000", history: str = "") -> Dataset:
    """A TID 2000 report: Findings and Impressions sections of TEXT items, verified (COMPLETE) or a draft."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyDate, ds.StudyTime = when[:8], when[8:]
    ds.ContentDate, ds.ContentTime = when[:8], when[8:]
    ds.TimezoneOffsetFromUTC = "+0800"
    ds.AccessionNumber, ds.Modality, ds.Manufacturer = accession, "SR", "swf-engine tests"
    ds.ReferringPhysicianName = ""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.CompletionFlag = "COMPLETE" if verified else "PARTIAL"
    ds.VerificationFlag = "VERIFIED" if verified else "UNVERIFIED"
    if verified:
        observer = Dataset()
        observer.VerifyingObserverName = signer[1]
        observer.VerifyingObserverIdentificationCodeSequence = Sequence([code(signer[0], "99HIS", "Staff")])
        observer.VerifyingOrganization = "Radiology"
        observer.VerificationDateTime = when[:8] + "160000"
        ds.VerifyingObserverSequence = Sequence([observer])
    request = Dataset()
    request.StudyInstanceUID = ds.StudyInstanceUID
    request.AccessionNumber = accession
    request.ReferencedStudySequence = Sequence()
    request.RequestedProcedureID = "RP1"
    request.RequestedProcedureDescription = "MR head"
    request.RequestedProcedureCodeSequence = Sequence([code("MR0101", "99HIS", "头颅MR平扫")])
    request.PlacerOrderNumberImagingServiceRequest = placer
    request.FillerOrderNumberImagingServiceRequest = filler
    ds.ReferencedRequestSequence = Sequence([request])
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([code("18748-4", "LN", "Diagnostic Imaging Report")])
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2000"
    ds.ContentTemplateSequence = Sequence([template])
    observer_context = Dataset()
    observer_context.RelationshipType, observer_context.ValueType = "HAS OBS CONTEXT", "PNAME"
    observer_context.ConceptNameCodeSequence = Sequence([code("121008", "DCM", "Person Observer Name")])
    observer_context.PersonName = author
    content = [observer_context]
    if history:
        content.append(section(code("121060", "DCM", "History"), [text_item(code("121060", "DCM", "History"),
                                                                               history)]))
    content.append(section(code("121070", "DCM", "Findings"),
                           [text_item(code("121071", "DCM", "Finding"), line) for line in findings]))
    content.append(section(code("121072", "DCM", "Impressions"),
                           [text_item(code("121073", "DCM", "Impression"), impression)]))
    ds.ContentSequence = Sequence(content)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path
