"""Coercion of a stored image's header from its order, keeping the replaced values (PS3.3 C.12.1.1.9, PS3.4 B.4.1.3).

Pure: bytes and rows in, bytes out; the time and the system name are parameters. Only the header is parsed: the
dataset is split before Pixel Data (7FE0,0010) (or Float / Double Float Pixel Data), the header is re-encoded in
the transfer syntax it came in, and the pixel data element and everything after it are appended byte for byte.
Compressed frames are never decoded, so a JPEG 2000 or JPEG-LS image leaves the engine bit-identical in its pixels.
A Deflated Explicit VR Little Endian dataset is inflated, coerced and deflated again: the transfer syntax stays.

What is coerced (IHE RAD TF-2 4.8.4.1.3.1, the Image Manager's coercion): PatientName (alphabetic group in pinyin,
ideographic group in hanzi, per the character profile), PatientID, IssuerOfPatientID, PatientBirthDate, PatientSex,
AccessionNumber and the Request Attributes Sequence (requested procedure and step); Study Description only when
the image has none. A value the store does not know (empty) never erases what the modality sent. Every value that
changes is kept, as it was, in a new Original Attributes Sequence item with Reason COERCE; an attribute that was
absent is listed there with an empty value.
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from typing import Iterator, Sequence

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR

from engine.errors import Malformed, MissingField
from engine.mappings.dicom_worklist import (
    CharacterProfile,
    Item,
    OrderRow,
    PatientRow,
    StepRow,
    code_item,
    patient_values,
)

SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID, SOP_INSTANCE_UID = 0x00080016, 0x00080018
ACCESSION_NUMBER, MODALITY, STUDY_DESCRIPTION = 0x00080050, 0x00080060, 0x00081030
STUDY_INSTANCE_UID, SERIES_INSTANCE_UID = 0x0020000D, 0x0020000E
REQUEST_ATTRIBUTES_SEQUENCE = 0x00400275
ORIGINAL_ATTRIBUTES_SEQUENCE = 0x04000561
PIXEL_TAGS = {0x7FE00010, 0x7FE00009, 0x7FE00008}
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
# Character sets whose bytes are ASCII: a dataset in them is already valid UTF-8 or GB18030.
ASCII_CHARSETS = {"", "ISO_IR 6", "ISO 2022 IR 6"}
LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass
class Header:
    """A dataset as received, cut before its pixel data: the parsed header and the untouched rest."""

    dataset: Dataset
    tail: bytes
    transfer_syntax: UID
    # the header's bytes as they came, and where each element read from them lies: (element as read, start, end)
    raw: bytes = b""
    spans: dict[int, tuple[RawDataElement, int, int]] = field(default_factory=dict)

    @property
    def sop_class_uid(self) -> str:
        return _text(self.dataset, SOP_CLASS_UID)

    @property
    def sop_instance_uid(self) -> str:
        return _text(self.dataset, SOP_INSTANCE_UID)

    @property
    def accession(self) -> str:
        return _text(self.dataset, ACCESSION_NUMBER)

    @property
    def study_instance_uid(self) -> str:
        return _text(self.dataset, STUDY_INSTANCE_UID)

    @property
    def modality(self) -> str:
        return _text(self.dataset, MODALITY)

    @property
    def series_instance_uid(self) -> str:
        return _text(self.dataset, SERIES_INSTANCE_UID)


def _text(ds: Dataset, tag: int) -> str:
    element = ds.get(tag)
    if element is None or element.value is None:
        return ""
    value = element.value
    if isinstance(value, (list, DicomSequence)) or getattr(value, "is_multi", False):
        value = "\\".join(str(v) for v in value)
    return str(value).strip().rstrip("\x00")


def _stop_at_pixels(tag, vr, length) -> bool:
    return tag in PIXEL_TAGS


def _check_tail(tail: bytes, implicit: bool, little: bool) -> None:
    """The pixel data element's own length must fit in what arrived (PS3.5 7.1); its value is not read."""
    if not tail:
        return
    order = "<" if little else ">"
    if implicit or tail[4:6] in LONG_LENGTH_VRS:
        header_length = 8 if implicit else 12
        if len(tail) < header_length:
            raise Malformed("dataset ends inside the pixel data element header")
        length = int.from_bytes(tail[header_length - 4:header_length], "little" if order == "<" else "big")
    else:
        header_length = 8
        length = int.from_bytes(tail[6:8], "little" if order == "<" else "big")
    if length == 0xFFFFFFFF:
        if tail.rfind(SEQUENCE_DELIMITER) < header_length:
            raise Malformed("encapsulated pixel data without a sequence delimiter")
    elif header_length + length > len(tail):
        raise Malformed("pixel data shorter than its declared length")


@dataclass(frozen=True)
class HeaderStart:
    """A header read from the first bytes of a dataset still arriving: what split_header reads from those bytes."""

    dataset: Dataset
    transfer_syntax: str
    raw: bytes  # the bytes it was read from, up to the pixel data element
    spans: dict[int, tuple[RawDataElement, int, int]]


def read_header_start(prefix: bytes, transfer_syntax: str) -> HeaderStart | None:
    """The header, when the first bytes of a dataset hold all of it and the pixel data element's tag; else None.

    Lets the edge parse while the pixel data is still on its way (engine.mwl.storage_scp). Whatever cannot be
    read here, broken or not all there yet, is left to split_header on the whole dataset, which decides."""
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax or ts.is_deflated:
        return None
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    try:
        ds, spans, offset = _read_header(prefix, implicit, little)
    except Exception:
        return None
    # the parse stopped at the pixel data's tag only if that tag, and the element's header, are in these bytes;
    # it stopped anywhere else because the bytes ran out
    if len(prefix) - offset < 12 or _tag_at(prefix, offset, little) not in PIXEL_TAGS:
        return None
    return HeaderStart(ds, transfer_syntax, bytes(prefix[:offset]), spans)


def split_header(data: bytes, transfer_syntax: str, start: HeaderStart | None = None) -> Header:
    """Parse the elements before the pixel data of an encoded dataset (no file meta) (PS3.5 7, A).

    `start`: the header already read from the first bytes of this dataset (read_header_start), used when
    those bytes are the dataset's own."""
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax:
        raise Malformed(f"unknown transfer syntax {transfer_syntax}")
    if ts.is_deflated:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise Malformed("deflated dataset cannot be inflated") from exc
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    # read_header_start gives none for a deflated syntax: its bytes as they came are not the dataset's
    if start is not None and start.transfer_syntax == transfer_syntax and data.startswith(start.raw):
        ds, spans, offset = start.dataset, start.spans, len(start.raw)
    else:
        ds, spans, offset = _read_header(data, implicit, little)
    tail = data[offset:]
    if offset < len(data) and _tag_at(data, offset, little) not in PIXEL_TAGS:
        raise Malformed("dataset cannot be parsed past its header")
    _check_tail(tail, implicit, little)
    header = Header(ds, tail, ts, data[:offset], spans)
    if not header.sop_instance_uid:
        raise MissingField("SOP Instance UID (0008,0018) missing")
    if not header.sop_class_uid:
        raise MissingField("SOP Class UID (0008,0016) missing")
    return header


# pydicom's reading mode is one setting for the process, switched for the time of a read: two threads switching it at
# once (two associations, or one's DUL reading a header early beside another's handler) could leave it strict for
# everyone, or lenient for one that needs it strict.
_STRICT_READING = threading.Lock()


def _read_header(data: bytes, implicit: bool, little: bool
                 ) -> tuple[Dataset, dict[int, tuple[RawDataElement, int, int]], int]:
    """The top-level elements up to the pixel data, where each lies, and where the reading stopped."""
    fp = BytesIO(data)
    try:
        # Reading must fail on a broken element, not warn and carry on with a half-read dataset.
        with _STRICT_READING, pydicom_config.strict_reading():
            ds = read_dataset(fp, implicit, little, stop_when=_stop_at_pixels)
            spans = _spans(ds, data, implicit, little, fp.tell())
            for element in ds._dict.values():  # raw elements as read, before any is converted
                # pydicom keeps what is there when a value is cut short; a short value is a broken dataset here
                if (isinstance(element, RawDataElement) and isinstance(element.value, bytes)
                        and element.length != 0xFFFFFFFF and len(element.value) != element.length):
                    raise Malformed(f"element {int(element.tag):08X} shorter than its declared length")
            for tag in (SPECIFIC_CHARACTER_SET, SOP_CLASS_UID, SOP_INSTANCE_UID, ACCESSION_NUMBER, MODALITY,
                        STUDY_INSTANCE_UID):
                if tag in ds:
                    ds[tag]  # converts the raw element: a value broken for its VR fails here
    except Malformed:
        raise
    except Exception as exc:
        raise Malformed(f"dataset cannot be parsed: {exc.__class__.__name__}") from exc
    return ds, spans, fp.tell()


def _tag_at(data: bytes, offset: int, little: bool) -> int:
    order = "little" if little else "big"
    return int.from_bytes(data[offset:offset + 2], order) << 16 | int.from_bytes(data[offset + 2:offset + 4], order)


def _spans(ds: Dataset, data: bytes, implicit: bool, little: bool, end: int
           ) -> dict[int, tuple[RawDataElement, int, int]]:
    """Where each top-level element lies in the header's bytes: they are read one after another, so an element
    ends where the next one's tag begins (its value_tell less its tag, VR and length fields). Any doubt (an
    element not where its tag is) gives no spans: the header is then encoded whole, as before."""
    starts: list[tuple[int, int, DataElement | RawDataElement]] = []
    for tag, element in ds._dict.items():
        # pydicom parses a sequence of undefined length as it reads; it keeps where the value began as file_tell
        value_tell = element.value_tell if isinstance(element, RawDataElement) else getattr(element, "file_tell", None)
        if value_tell is None:
            return {}
        vr = (element.VR or "").encode("ascii", "replace")
        starts.append((value_tell - (8 if implicit or vr not in LONG_LENGTH_VRS else 12), tag, element))
    starts.sort(key=lambda start: start[0])
    order = "<HH" if little else ">HH"
    spans: dict[int, tuple[RawDataElement, int, int]] = {}
    for (start, tag, element), following in zip(starts, [*(s[0] for s in starts[1:]), end]):
        if start < 0 or following > end or data[start:start + 4] != struct.pack(order, tag >> 16, tag & 0xFFFF):
            return {}
        if isinstance(element, RawDataElement):  # a parsed one is encoded again
            spans[tag] = (element, start, following)
    return spans


def join_header(header: Header) -> bytes:
    """The dataset again in its transfer syntax: the header re-encoded, the pixel data as it came.

    An element still as it was read is copied from the bytes that came: pydicom would write the same bytes, at
    some 30 us per element, and a CT has hundreds. Only the changed ones are encoded, and, when the character
    set changed, the text that is not plain ASCII (it is read in the old set and written in the new one).
    """
    return _finish(header, [part for _, part, _ in _encoded_elements(header)])


def _encoded_elements(header: Header) -> Iterator[tuple[int, bytes, bool]]:
    """Each element of the header in tag order: (tag, its encoding, whether it was copied as it came)."""
    ts = header.transfer_syntax
    ds = header.dataset
    respelled = ds.original_character_set != ds._character_set
    encodings = ds.get("SpecificCharacterSet", None)  # the value, as pydicom's write_dataset takes it
    for tag in sorted(ds._dict):
        if _retired_group_length(tag):
            continue
        element = ds._dict[tag]
        span = header.spans.get(tag)
        if span is not None and span[0] is element and not (respelled and _charset_bound(element)):
            yield tag, header.raw[span[1]:span[2]], True
        else:
            fp = DicomBytesIO()
            fp.is_implicit_VR, fp.is_little_endian = ts.is_implicit_VR, ts.is_little_endian
            write_data_element(fp, ds[tag] if respelled else ds.get_item(tag), encodings)
            yield tag, fp.getvalue(), False


def _retired_group_length(tag: int) -> bool:
    """Not written (PS3.5 7.2), as pydicom's writer leaves them out."""
    return tag & 0xFFFF == 0 and tag >> 16 > 6


def _finish(header: Header, parts: list[bytes]) -> bytes:
    data = b"".join([*parts, header.tail])
    if header.transfer_syntax.is_deflated:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


def _charset_bound(element: RawDataElement) -> bool:
    """Bytes whose meaning depends on the character set: non-ASCII text, or a sequence that may hold some."""
    value = element.value
    if not value or element.VR not in CUSTOMIZABLE_CHARSET_VR and element.VR not in ("SQ", "UN", None):
        return False
    return not value.isascii()


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    pad = b"\x00" if vr == b"UI" else b" "
    value += pad * (len(value) % 2)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr == b"OB":
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def part10(dataset_bytes: bytes, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
           source_ae: str, implementation_uid: str, implementation_version: str) -> bytes:
    """Preamble, DICM prefix and File Meta Information in front of an encoded dataset (PS3.10 7.1).

    Encoded by hand (Explicit VR Little Endian, PS3.10 Table 7.1-1): pydicom's writer costs about a millisecond
    per image, on the path the modality waits on.
    """
    body = b"".join([
        _meta_element(0x00020001, b"OB", b"\x00\x01"),  # File Meta Information Version
        _meta_element(0x00020002, b"UI", sop_class_uid.encode("ascii")),  # Media Storage SOP Class UID
        _meta_element(0x00020003, b"UI", sop_instance_uid.encode("ascii")),  # Media Storage SOP Instance UID
        _meta_element(0x00020010, b"UI", transfer_syntax.encode("ascii")),  # Transfer Syntax UID
        _meta_element(0x00020012, b"UI", implementation_uid.encode("ascii")),  # Implementation Class UID
        _meta_element(0x00020013, b"SH", implementation_version[:16].encode("ascii")),  # Implementation Version
        *([_meta_element(0x00020016, b"AE", source_ae.strip()[:16].encode("ascii", "replace"))]  # Source AE
          if source_ae.strip() else []),
    ])
    group_length = _meta_element(0x00020000, b"UL", b"")[:6] + struct.pack("<HI", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body + dataset_bytes


# --- coercion ------------------------------------------------------------------------------------


def coercion_values(patient: PatientRow, order: OrderRow, step: StepRow | None,
                    profile: CharacterProfile) -> Item:
    """The values the order dictates, by tag; an empty stored value is left out (it would erase the image's)."""
    text = profile.text
    values: Item = {**patient_values(patient, profile), ACCESSION_NUMBER: order.accession}
    values = {tag: value for tag, value in values.items() if value}
    request: Item = {
        ACCESSION_NUMBER: order.accession,
        STUDY_INSTANCE_UID: order.study_instance_uid,
        0x00401001: order.requested_procedure_id,  # RequestedProcedureID
        0x00321060: text(order.procedure_meaning),  # RequestedProcedureDescription
    }
    if order.procedure_code:
        request[0x00321064] = [code_item(order.procedure_code, order.procedure_scheme, order.procedure_meaning,
                                         profile)]  # RequestedProcedureCodeSequence
    if step is not None:
        request[0x00400009] = step.step_id  # ScheduledProcedureStepID
        request[0x00400007] = text(step.description or order.procedure_meaning)  # ScheduledProcedureStepDescription
    request = {tag: value for tag, value in request.items() if value}
    if request.get(0x00401001):
        values[REQUEST_ATTRIBUTES_SEQUENCE] = [request]
    return values


def fill_values(order: OrderRow, profile: CharacterProfile) -> Item:
    """Values the order supplies only where the image has none."""
    return {STUDY_DESCRIPTION: profile.text(order.procedure_meaning)}


def _element(tag: int, value) -> DataElement:
    vr = dictionary_VR(tag)
    if isinstance(value, list):
        return DataElement(tag, "SQ", DicomSequence([_dataset(item) for item in value]))
    return DataElement(tag, vr, value)


def _dataset(values: Item) -> Dataset:
    ds = Dataset()
    for tag in sorted(values):
        ds.add(_element(tag, values[tag]))
    return ds


def _comparable(value) -> object:
    """A value as compared for "did it change": strings stripped, sequences item by item."""
    if isinstance(value, (DicomSequence, list)) and (not value or isinstance(value[0], Dataset)):
        return [sorted((int(e.tag), _comparable(e.value)) for e in item) for item in value]
    if value is None:
        return ""
    return str(value).strip()


def _charset_of(ds: Dataset) -> tuple[str, ...]:
    element = ds.get(SPECIFIC_CHARACTER_SET)
    if element is None or not element.value:
        return ()
    value = element.value
    return tuple(v.strip() for v in (value if isinstance(value, (list, tuple)) or getattr(value, "is_multi", False)
                                     else [value]))


def _respell(ds: Dataset, charset: str | None) -> None:
    """Make the header's Specific Character Set the profile's, re-encoding text that was in another one."""
    if charset is None:  # ascii profile: the coerced values are ASCII, valid in any character set
        return
    current = _charset_of(ds)
    if current == (charset,):
        return
    if all(c in ASCII_CHARSETS for c in current):
        ds.SpecificCharacterSet = charset  # ASCII bytes are already valid in the new set
        return
    _decode_all(ds)  # every text value as str now, read in the old set; the writer encodes them in the new one
    ds.SpecificCharacterSet = charset


def _decode_all(ds: Dataset) -> None:
    for element in ds:  # iterating converts raw elements with the set they were read in
        if element.VR == "SQ":
            for item in element.value:
                _decode_all(item)
    ds.decode()


def apply_coercion(ds: Dataset, values: Item, *, charset: str | None, now: datetime, modifying_system: str,
                   source: str, fill: Item | None = None, reason: str = "COERCE") -> list[int]:
    """Set `values` in the header, recording each replaced one (PS3.3 C.12.1.1.9.2); returns the changed tags.

    `fill` values are set only where the image has none (Study Description), and recorded the same way.
    """
    _respell(ds, charset)
    fill = {tag: value for tag, value in (fill or {}).items() if value and not _text(ds, tag)}
    wanted = {**fill, **values}
    modified = Dataset()
    changed: list[int] = []
    for tag in sorted(wanted):
        new = _element(tag, wanted[tag])
        old = ds.get(tag)
        if old is not None and _comparable(old.value) == _comparable(new.value):
            continue
        modified.add(DataElement(tag, old.VR if old is not None else new.VR, old.value if old is not None else None))
        ds.add(new)
        changed.append(tag)
    if changed:
        item = Dataset()
        item.ModifiedAttributesSequence = DicomSequence([modified])  # (0400,0550)
        item.AttributeModificationDateTime = _modification_time(now)  # (0400,0562)
        item.ModifyingSystem = modifying_system[:64]  # (0400,0563)
        item.SourceOfPreviousValues = source[:64]  # (0400,0564)
        item.ReasonForTheAttributeModification = reason  # (0400,0565)
        existing = ds.get(ORIGINAL_ATTRIBUTES_SEQUENCE)
        items = list(existing.value) if existing is not None and existing.value else []
        ds.OriginalAttributesSequence = DicomSequence([*items, item])
    return changed


def _modification_time(now: datetime) -> str:
    return now.strftime("%Y%m%d%H%M%S.%f%z")


@dataclass(frozen=True)
class SeriesCoercion:
    """How one image's header came out of coercion, for the images after it whose coerced attributes are the same.

    A modality sends a series on one association, every image with the same wrong name and ID: coercing each
    anew (pydicom converting the old values, encoding the new ones and the Original Attributes Sequence) cost
    some 3 ms per image, on the path the modality waits on. Those bytes are the same for the whole series but for
    the modification time, which is put in at its place.
    """

    changed: tuple[int, ...]
    written: dict[int, bytes]  # the coerced elements, the character set and the Original Attributes Sequence
    stamp: bytes  # the modification time as it lies in written[ORIGINAL_ATTRIBUTES_SEQUENCE]
    respelled: bool  # the character set changed: text elsewhere must be plain ASCII to be copied ...
    recoded: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # ... or as it came here: (came, written)


SERIES_MEMO_SIZE = 8


def coerce_header(header: Header, values: Item, *, fill: Item, charset: str | None, now: datetime,
                  modifying_system: str, source: str, memo: dict | None = None) -> tuple[list[int], bytes | None]:
    """apply_coercion, then join_header: the changed tags and the dataset's bytes (None: nothing changed).

    `memo` (one per association, for one order's `values` and `fill`) keeps a SeriesCoercion per set of old
    values: an image whose coerced attributes came as an earlier one's is given that one's encoding, its other
    elements copied as they came. The bytes equal what coercing it anew gives. The header's dataset is then left
    as it came: a caller that reads the coerced dataset (an SR taken as a report) passes no memo.
    """
    key = _memo_key(header, values, fill, charset, modifying_system, source) if memo is not None else None
    entry = memo.get(key) if memo is not None and key is not None else None
    if entry is not None:
        data = _reuse(header, entry, now)
        if data is not None:
            return list(entry.changed), data if entry.changed else None
    changed = apply_coercion(header.dataset, values, fill=fill, charset=charset, now=now,
                             modifying_system=modifying_system, source=source)
    if not changed:
        if memo is not None and key is not None:
            _remember(memo, key, SeriesCoercion((), {}, b"", False))
        return [], None
    elements = list(_encoded_elements(header))
    if memo is not None and key is not None:
        # the images after it copy every other element as it came to them (their own UIDs ...)
        written = {tag: part for tag, part, copied in elements if not copied and tag in key[-1]}
        # text the new character set made encode again (a sequence, as pydicom cannot tell): the same bytes next time
        # give the same encoding
        recoded = {tag: (header.raw[header.spans[tag][1]:header.spans[tag][2]], part)
                   for tag, part, copied in elements if not copied and tag not in key[-1] and tag in header.spans}
        stamp = _modification_time(now).encode("ascii")
        if written.get(ORIGINAL_ATTRIBUTES_SEQUENCE, b"").count(stamp) == 1:
            dataset = header.dataset
            _remember(memo, key, SeriesCoercion(tuple(changed), written, stamp,
                                                dataset.original_character_set != dataset._character_set, recoded))
    return changed, _finish(header, [part for _, part, _ in elements])


def _memo_key(header: Header, values: Item, fill: Item, charset: str | None, modifying_system: str,
              source: str) -> tuple | None:
    """What coercion reads from the image: the old values of the coerced attributes, the character set and any
    earlier Original Attributes Sequence, as their bytes; None when one of them was not read as bytes."""
    tags = tuple(sorted({*values, *fill, SPECIFIC_CHARACTER_SET, ORIGINAL_ATTRIBUTES_SEQUENCE}))
    old: list[bytes | None] = []
    for tag in tags:
        span = header.spans.get(tag)  # before coercion an element is as it came, read or not
        if span is not None:
            old.append(header.raw[span[1]:span[2]])
        elif tag in header.dataset._dict:
            return None  # not read as bytes (a sequence pydicom parsed as it read): compared on the whole path
        else:
            old.append(None)
    return (str(header.transfer_syntax), charset, modifying_system, source, tuple(old), tags)


def _reuse(header: Header, entry: SeriesCoercion, now: datetime) -> bytes | None:
    """The header with `entry`'s coerced elements and its own others, or None when it cannot be copied so."""
    stamp = _modification_time(now).encode("ascii")
    if entry.stamp and len(stamp) != len(entry.stamp):
        return None
    if not entry.changed:
        return b""
    dataset, spans, raw = header.dataset, header.spans, header.raw  # the dataset is as it came: nothing was coerced
    parts: list[bytes] = []
    for tag in sorted({*dataset._dict, *entry.written}):
        if _retired_group_length(tag):
            continue
        written = entry.written.get(tag)
        if written is not None:
            parts.append(written.replace(entry.stamp, stamp, 1) if tag == ORIGINAL_ATTRIBUTES_SEQUENCE else written)
            continue
        span = spans.get(tag)
        if span is None:
            return None  # not read as bytes: only pydicom can write it
        came = raw[span[1]:span[2]]
        if entry.respelled and _charset_bound(span[0]):
            recoded = entry.recoded.get(tag)
            if recoded is None or recoded[0] != came:
                return None  # text in the old character set, not seen before: it must be encoded again
            came = recoded[1]
        parts.append(came)
    return _finish(header, parts)


def _remember(memo: dict, key: tuple, entry: SeriesCoercion) -> None:
    if len(memo) >= SERIES_MEMO_SIZE:
        memo.clear()  # a modality whose every image differs gains nothing from it
    memo[key] = entry


def tag_names(tags: Sequence[int]) -> list[str]:
    from pydicom.datadict import keyword_for_tag

    return [keyword_for_tag(tag) or f"{tag:08X}" for tag in tags]
