"""Captured stills and clips as DICOM instances of the IOD their device calls for (PS3.3 A.32, A.6, A.7, A.8).

Pure: pixels or compressed bytes, the patient/order/step rows and the station in; a pydicom Dataset and its
encoding out. Time and UIDs are parameters. Patient and request attributes come from the same functions the worklist
and the image router use (engine.mappings.dicom_worklist / dicom_coercion), so a captured image carries the name
exactly as the worklist spelled it and the router's coercion finds nothing to change.

IODs per kind of device:
- endoscopy: VL Endoscopic Image (still), Video Endoscopic Image (clip)  PS3.3 A.32.1, A.32.5
- ultrasound: US Image (still), US Multi-frame Image (clip)  PS3.3 A.6, A.7
- microscopy: VL Microscopic Image, Video Microscopic Image  PS3.3 A.32.2, A.32.6
- secondary: Secondary Capture Image, Video Photographic Image  PS3.3 A.8.1, A.32.7
Stills are Explicit VR Little Endian RGB or JPEG Baseline YBR_FULL_422 (PS3.5 8.2.1); clips are MPEG-4 AVC/H.264
High Profile / Level 4.1, YBR_PARTIAL_420, the whole stream as fragments of one frame item (PS3.5 8.2.8, A.4.5).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, MPEG4HP41

from engine.mappings.dicom_coercion import coercion_values, fill_values, part10
from engine.mappings.dicom_worklist import CharacterProfile, OrderRow, PatientRow, StepRow, patient_name, to_dataset

Iod = Literal["endoscopy", "ultrasound", "microscopy", "secondary"]
Kind = Literal["still", "clip"]

SOP_CLASSES: dict[tuple[str, str], str] = {
    ("endoscopy", "still"): "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image
    ("endoscopy", "clip"): "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image
    ("ultrasound", "still"): "1.2.840.10008.5.1.4.1.1.6.1",  # US Image
    ("ultrasound", "clip"): "1.2.840.10008.5.1.4.1.1.3.1",  # US Multi-frame Image
    ("microscopy", "still"): "1.2.840.10008.5.1.4.1.1.77.1.2",  # VL Microscopic Image
    ("microscopy", "clip"): "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic Image
    ("secondary", "still"): "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    ("secondary", "clip"): "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image
}
# The Modality each VL IOD fixes (PS3.3 C.8.12.1.1.x); US is US; secondary capture keeps the station's.
IOD_MODALITY = {"endoscopy": "ES", "ultrasound": "US", "microscopy": "GM"}
MODALITY_IOD: dict[str, Iod] = {"ES": "endoscopy", "US": "ultrasound", "GM": "microscopy", "SM": "microscopy"}
FRAME_TIME = Tag(0x0018, 0x1063)
ITEM = b"\xfe\xff\x00\xe0"
MAX_FRAGMENT = 0x7FFFFFFE  # even, well below the 32-bit length limit (PS3.5 A.4)


def iod_for(iod: str, modality: str) -> Iod:
    """The configured IOD, or the one the station's modality implies (Secondary Capture otherwise)."""
    if iod != "auto":
        return iod  # type: ignore[return-value]
    return MODALITY_IOD.get(modality.upper(), "secondary")


@dataclass(frozen=True)
class Station:
    """What identifies the capture station in every object it makes (PS3.3 C.7.5.1 General Equipment)."""

    ae_title: str
    modality: str
    iod: Iod
    station_name: str = ""
    manufacturer: str = "swf-engine"
    model_name: str = "capture station"
    serial_number: str = ""
    institution: str = ""
    software_version: str = ""
    burned_in_annotation: Literal["YES", "NO"] = "YES"
    # (code value, scheme, meaning) for VL images' Anatomic Region Sequence (C.8.12.1), e.g. 69695003 stomach
    anatomic_region: tuple[str, str, str] = ("38266002", "SCT", "Entire body")

    def series_modality(self, kind: str) -> str:
        if self.iod == "secondary" and kind == "clip":
            return "XC"  # Video Photographic Image fixes it (C.8.12.1.1.3)
        return IOD_MODALITY.get(self.iod, self.modality or "OT")


@dataclass(frozen=True)
class Series:
    """One capture session: its study (the order's Study Instance UID), its own series."""

    study_instance_uid: str
    series_instance_uid: str
    series_number: int
    started: datetime
    accession: str = ""
    study_id: str = ""
    description: str = ""


@dataclass(frozen=True)
class Still:
    """One frame: `pixels` RGB interleaved (8 bits) when `jpeg` is False, else one JPEG Baseline stream."""

    rows: int
    columns: int
    data: bytes
    jpeg: bool = False
    monochrome: bool = False


@dataclass(frozen=True)
class Clip:
    """An H.264 High Profile / Level 4.1 Annex B byte stream."""

    rows: int
    columns: int
    frames: int
    fps: float
    stream: bytes


@dataclass(frozen=True)
class Wrapped:
    dataset: Dataset
    transfer_syntax: str

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def _da(value: datetime) -> str:
    return value.strftime("%Y%m%d")


def _tm(value: datetime) -> str:
    return value.strftime("%H%M%S.%f")


def _dt(value: datetime) -> str:
    return value.strftime("%Y%m%d%H%M%S.%f%z")


def _header(patient: PatientRow, order: OrderRow | None, step: StepRow | None, station: Station, series: Series,
            profile: CharacterProfile, *, kind: Kind, sop_instance_uid: str, instance_number: int,
            acquired: datetime, created: datetime) -> Dataset:
    sop_class = SOP_CLASSES[(station.iod, kind)]
    ds = Dataset()
    if profile.charset:
        ds.SpecificCharacterSet = profile.charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = _da(created), _tm(created)
    # patient and request: what the worklist says, spelled as it spells it
    if order is not None:
        values = coercion_values(patient, order, step, profile)
        values.update({tag: value for tag, value in fill_values(order, profile).items() if value})
    else:
        values = {0x00100010: patient_name(patient, profile), 0x00100020: patient.patient_id,
                  0x00100021: profile.text(patient.issuer), 0x00100030: patient.birth_date,
                  0x00100040: patient.sex}
        values = {tag: value for tag, value in values.items() if value}
    for element in to_dataset(values):
        ds.add(element)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    # General Study (C.7.2.1): the study is the order's, dated by the session that produced these images
    ds.StudyInstanceUID = series.study_instance_uid
    ds.StudyDate, ds.StudyTime = _da(series.started), _tm(series.started)
    ds.ReferringPhysicianName = profile.person(order.referring_physician) if order is not None else ""
    ds.StudyID = series.study_id[:16]
    ds.AccessionNumber = series.accession
    if "StudyDescription" not in ds and series.description:
        ds.StudyDescription = profile.text(series.description)
    # General Series (C.7.3.1): one per capture session
    ds.Modality = station.series_modality(kind)
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = series.series_number
    ds.SeriesDate, ds.SeriesTime = _da(series.started), _tm(series.started)
    if step is not None and step.description:
        ds.SeriesDescription = profile.text(step.description)
    # General Equipment (C.7.5.1) and device identification
    ds.Manufacturer = station.manufacturer[:64]
    if station.institution:
        ds.InstitutionName = profile.text(station.institution)
    ds.StationName = (station.station_name or station.ae_title)[:16]
    ds.ManufacturerModelName = station.model_name[:64]
    if station.serial_number:
        ds.DeviceSerialNumber = station.serial_number[:64]
    if station.software_version:
        ds.SoftwareVersions = station.software_version[:64]
    # General Image (C.7.6.1)
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = _da(acquired), _tm(acquired)
    ds.AcquisitionDateTime = _dt(acquired)
    ds.BurnedInAnnotation = station.burned_in_annotation
    if station.iod in ("endoscopy", "microscopy") or (station.iod == "secondary" and kind == "clip"):
        ds.AcquisitionContextSequence = DicomSequence([])  # C.7.6.14, type 2
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = station.anatomic_region
        ds.AnatomicRegionSequence = DicomSequence([region])
    else:
        ds.Laterality = ""  # type 2C with no anatomic region to decide it: a video output does not tell the side
    if station.iod == "secondary" and kind == "still":
        ds.ConversionType = "DV"  # digitized video (C.8.6.1)
    return ds


def _pixel_module(ds: Dataset, *, rows: int, columns: int, photometric: str, samples: int) -> None:
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0


def _image_type(station: Station, kind: Kind) -> list[str]:
    if station.iod == "ultrasound":
        return ["ORIGINAL", "PRIMARY"]
    if station.iod == "secondary":
        return ["DERIVED", "SECONDARY"]
    return ["ORIGINAL", "PRIMARY"]


def wrap_still(still: Still, patient: PatientRow, order: OrderRow | None, step: StepRow | None, station: Station,
               series: Series, profile: CharacterProfile, *, sop_instance_uid: str, instance_number: int,
               acquired: datetime, created: datetime, quality_ratio: float | None = None) -> Wrapped:
    """One captured frame as a single-frame instance of the station's still IOD."""
    ds = _header(patient, order, step, station, series, profile, kind="still", sop_instance_uid=sop_instance_uid,
                 instance_number=instance_number, acquired=acquired, created=created)
    ds.ImageType = _image_type(station, "still")
    samples = 1 if still.monochrome else 3
    if still.jpeg:
        photometric = "MONOCHROME2" if still.monochrome else "YBR_FULL_422"
    else:
        photometric = "MONOCHROME2" if still.monochrome else "RGB"
    _pixel_module(ds, rows=still.rows, columns=still.columns, photometric=photometric, samples=samples)
    if still.jpeg:
        ds.LossyImageCompression = "01"
        raw = still.rows * still.columns * samples
        ds.LossyImageCompressionRatio = f"{raw / max(1, len(still.data)):.2f}"[:16]
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate_frame(still.data)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        transfer_syntax = JPEGBaseline8Bit
    else:
        ds.LossyImageCompression = "00"
        ds.PixelData = still.data if len(still.data) % 2 == 0 else still.data + b"\x00"
        ds["PixelData"].VR = "OB"
        transfer_syntax = ExplicitVRLittleEndian
    return Wrapped(ds, str(transfer_syntax))


def wrap_clip(clip: Clip, patient: PatientRow, order: OrderRow | None, step: StepRow | None, station: Station,
              series: Series, profile: CharacterProfile, *, sop_instance_uid: str, instance_number: int,
              acquired: datetime, created: datetime) -> Wrapped:
    """A recorded clip as a multi-frame instance in MPEG-4 AVC/H.264 High Profile / Level 4.1 (PS3.5 8.2.8)."""
    ds = _header(patient, order, step, station, series, profile, kind="clip", sop_instance_uid=sop_instance_uid,
                 instance_number=instance_number, acquired=acquired, created=created)
    ds.ImageType = _image_type(station, "clip")
    _pixel_module(ds, rows=clip.rows, columns=clip.columns, photometric="YBR_PARTIAL_420", samples=3)
    # Multi-frame (C.7.6.6) and Cine (C.7.6.5)
    ds.NumberOfFrames = clip.frames
    ds.FrameIncrementPointer = FRAME_TIME
    frame_time = 1000.0 / clip.fps
    ds.FrameTime = f"{frame_time:.6g}"
    ds.CineRate = round(clip.fps)
    ds.RecommendedDisplayFrameRate = round(clip.fps)
    ds.FrameDelay = 0
    ds.ActualFrameDuration = round(frame_time)
    ds.StartTrim, ds.StopTrim = 1, clip.frames
    ds.PreferredPlaybackSequencing = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_14496_10"
    ds.PixelData = encapsulate_stream(clip.stream)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return Wrapped(ds, str(MPEG4HP41))


def encapsulate_frame(frame: bytes) -> bytes:
    """One frame in one fragment behind an empty Basic Offset Table (PS3.5 A.4)."""
    return encapsulate_stream(frame)


def encapsulate_stream(stream: bytes) -> bytes:
    """An empty Basic Offset Table and the bytes as even-length fragments (PS3.5 A.4, 8.2.8); pydicom's writer
    adds the sequence delimiter after an undefined-length value."""
    if len(stream) % 2:
        stream += b"\x00"  # H.264 trailing zero byte / JPEG padding after EOI: both ignored by decoders
    parts = [ITEM + b"\x00\x00\x00\x00"]
    for start in range(0, len(stream), MAX_FRAGMENT):
        fragment = stream[start:start + MAX_FRAGMENT]
        parts += [ITEM + struct.pack("<I", len(fragment)), fragment]
    return b"".join(parts)


def encode(wrapped: Wrapped) -> bytes:
    """The dataset encoded in its transfer syntax (all of them here are explicit VR little endian)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, wrapped.dataset)
    return fp.getvalue()


def part10_file(wrapped: Wrapped, dataset_bytes: bytes, *, source_ae: str, implementation_uid: str,
                implementation_version: str) -> bytes:
    return part10(dataset_bytes, sop_class_uid=wrapped.sop_class_uid, sop_instance_uid=wrapped.sop_instance_uid,
                  transfer_syntax=wrapped.transfer_syntax, source_ae=source_ae, implementation_uid=implementation_uid,
                  implementation_version=implementation_version)


def split_part10(data: bytes) -> tuple[str, bytes]:
    """(transfer syntax, dataset bytes) of a Part 10 file whose meta is explicit VR little endian (PS3.10 7.1)."""
    if data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file")
    group_length = struct.unpack("<I", data[140:144])[0]
    end = 144 + group_length
    meta, offset, syntax = data[132:end], 0, ""
    while offset < len(meta):
        group, element = struct.unpack("<HH", meta[offset:offset + 4])
        vr = meta[offset + 4:offset + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            length = struct.unpack("<I", meta[offset + 8:offset + 12])[0]
            value_at = offset + 12
        else:
            length = struct.unpack("<H", meta[offset + 6:offset + 8])[0]
            value_at = offset + 8
        if (group, element) == (0x0002, 0x0010):
            syntax = meta[value_at:value_at + length].rstrip(b"\x00 ").decode("ascii")
        offset = value_at + length
    return syntax, data[end:]
