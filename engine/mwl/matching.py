"""A Modality Worklist C-FIND identifier as one SQL query over the domain store (PS3.4 C.2.2.2, K.2.2.1).

Matching kinds (PS3.4 C.2.2.2): single value, universal (empty, or only `*`), wildcard (`*`, `?`), range for
dates and times, date and time of the Scheduled Procedure Step combined as one datetime range (C.2.2.2.5.1),
list of values (backslash; UID list matching C.2.2.2.2, and the same OR for the other keys) and sequence matching
(C.2.2.2.6) in ScheduledProcedureStepSequence and the code sequences. Text matches are case-sensitive except
person names (C.2.2.2.1: PN may match without regard to case). PatientName: a value with Chinese characters
matches the stored ideographic group (`王^小东`, `王*`), any other the stored alphabetic group, upper-case ASCII
(`wang*`, `Müller^Hans` as `MULLER^HANS`); a value with `=` matches each group it fills (PS3.5 6.2). Steps in
worklist.hide_statuses are left out unless the query gives ScheduledProcedureStepStatus a value.

Wildcards become GLOB on SQLite (case-sensitive, and able to use an index for a prefix, which SQLite's LIKE is
not) and LIKE with `%`, `_` and the escape character escaped elsewhere.

A key with a real value that the store cannot match on, inside or outside the worklist model, fails the query
with A900 (PS3.4 K.4.1.1.4, Identifier does not match SOP Class) naming the key; a value that is not valid for
its VR (a date `2026-11-22`) fails with C000 (Unable to process). Keys with empty or universal values are return
keys whatever they are. (K.4.1.1.4 also allows FF01, matches continuing with an optional key ignored: that hands
the modality more entries than it asked for behind a warning few modalities show; a failure names the key.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from sqlalchemy import Select, and_, case, false, func, or_, select, true
from sqlalchemy.orm import Bundle
from sqlalchemy.sql.elements import ColumnElement

from engine.errors import BadValue
from engine.mappings.dicom_worklist import (
    DICOM_PRIORITIES,
    HL7_PRIORITIES,
    ascii_text,
    dicom_priority,
    is_ideograph,
)
from engine.store.tables import ImagingOrder, Patient, ScheduledStep

SPS_SEQUENCE = 0x00400100
SPS_DATE, SPS_TIME, SPS_STATUS = 0x00400002, 0x00400003, 0x00400020
PATIENT_NAME = 0x00100010
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})  # PS3.4 C.2.2.2.4
IGNORED = frozenset({0x00080005, 0x00080052, 0x00080201})  # charset, Q/R level, timezone: never matching keys


class UnsupportedKey(BadValue):
    """A matching value on an attribute this SCP cannot match on (PS3.4 K.4.1.1.4: A900)."""

    dimse = 0xA900

    def __init__(self, tag: int, message: str) -> None:
        super().__init__(message)
        self.tag = tag


class BadQuery(BadValue):
    """A matching value that is not valid for its VR (PS3.4 K.4.1.1.4: C000, Unable to process)."""

    dimse = 0xC000

    def __init__(self, tag: int | None, message: str) -> None:
        super().__init__(message)
        self.tag = tag


def tag_name(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword_for_tag(tag) or 'unknown'}".strip()


@dataclass(frozen=True)
class Key:
    """How one attribute matches: against which column, as which kind of value."""

    kind: str  # text | pn | uid | date | priority | patient_name | sps_date | sps_time | status
    column: Callable[[], ColumnElement] | None = None


def _text(column: Callable[[], ColumnElement]) -> Key:
    return Key("text", column)


def _step_description() -> ColumnElement:
    # What the worklist item returns: the step's own description, else the procedure's.
    return case((ScheduledStep.description != "", ScheduledStep.description), else_=ImagingOrder.procedure_meaning)


CODE_ITEM = {
    0x00080100: _text(lambda: ImagingOrder.procedure_code),
    0x00080102: _text(lambda: ImagingOrder.procedure_scheme),
    0x00080104: _text(lambda: ImagingOrder.procedure_meaning),
}
SPS_ITEM = {
    0x00080060: _text(lambda: ScheduledStep.modality),
    0x00400001: _text(lambda: ScheduledStep.station_aet),
    SPS_DATE: Key("sps_date"),
    SPS_TIME: Key("sps_time"),
    0x00400006: Key("pn", lambda: ScheduledStep.performing_physician),
    0x00400007: _text(_step_description),
    0x00400009: _text(lambda: ScheduledStep.step_id),
    0x00400010: _text(lambda: ScheduledStep.station_name),
    0x00400011: _text(lambda: ScheduledStep.location),
    SPS_STATUS: Key("status", lambda: ScheduledStep.status),
    0x00400008: CODE_ITEM,  # ScheduledProtocolCodeSequence: filled from the procedure code
}
TOP_LEVEL = {
    PATIENT_NAME: Key("patient_name"),
    0x00100020: _text(lambda: Patient.patient_id),
    0x00100021: _text(lambda: Patient.issuer),
    0x00100030: Key("date", lambda: Patient.birth_date),
    0x00100040: _text(lambda: Patient.sex),
    0x00080050: _text(lambda: ImagingOrder.accession),
    0x00080090: Key("pn", lambda: ImagingOrder.referring_physician),
    0x0020000D: Key("uid", lambda: ImagingOrder.study_instance_uid),
    0x00401001: _text(lambda: ImagingOrder.requested_procedure_id),
    0x00401003: Key("priority", lambda: ImagingOrder.priority),
    0x00321060: _text(lambda: ImagingOrder.procedure_meaning),
    0x00321033: _text(lambda: ImagingOrder.department),
    0x00380010: _text(lambda: ImagingOrder.admission_id),
    0x00380300: _text(lambda: ImagingOrder.patient_location),
    0x00402016: _text(lambda: ImagingOrder.placer_number),
    0x00402017: _text(lambda: ImagingOrder.filler_number),
    0x00321064: CODE_ITEM,  # RequestedProcedureCodeSequence
    SPS_SEQUENCE: SPS_ITEM,
}


def values_of(element: DataElement) -> list[str]:
    """The element's values as stripped strings (a backslash list gives several)."""
    value = element.value
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    out = []
    for item in items:
        if isinstance(item, (bytes, bytearray)):
            item = bytes(item).decode("ascii", errors="replace")
        out.append(str(item).strip(" \x00"))
    return out


def is_universal(element: DataElement) -> bool:
    """Zero length, or only `*` for a VR that takes wildcards, or `-` for a range (PS3.4 C.2.2.2.3)."""
    if element.VR == "SQ":
        return all(is_universal(e) for item in element.value for e in item)
    values = values_of(element)
    if element.VR in ("DA", "TM", "DT"):
        return all(v in ("", "-") for v in values)
    return all(v == "" or (v.strip("*") == "" and element.VR not in ("UI", "IS", "DS")) for v in values)


class _Builder:
    def __init__(self, dialect: str) -> None:
        self.glob = dialect == "sqlite"
        self.conditions: list[ColumnElement] = []
        self.status_given = False
        self.sps_date: str | None = None
        self.sps_time: str | None = None

    # --- walking the identifier -------------------------------------------------------------------

    def walk(self, dataset: Dataset, keys: dict, *, top: bool) -> None:
        for element in dataset:
            tag = int(element.tag)
            if (top and tag in IGNORED) or Tag(tag).is_private or tag & 0xFFFF == 0:
                continue
            key = keys.get(tag)
            if isinstance(key, dict):
                if element.VR != "SQ":
                    raise BadQuery(tag, f"{tag_name(tag)} must be a sequence")
                if len(element.value) > 1:
                    raise BadQuery(tag, f"one item in {tag_name(tag)} (C.2.2.2.6)")
                if len(element.value) == 1:
                    self.walk(element.value[0], key, top=False)
                continue
            if is_universal(element):
                continue
            if key is None:
                bad = tag
                if element.VR == "SQ":  # name the key inside the sequence that carries a value
                    bad = next(int(e.tag) for item in element.value for e in item if not is_universal(e))
                raise UnsupportedKey(bad, f"no matching on {tag_name(bad)}")
            self.match(tag, key, element)

    def match(self, tag: int, key: Key, element: DataElement) -> None:
        values = [v for v in values_of(element) if v] or [""]
        if key.kind == "sps_date":
            self.sps_date = self._single(tag, values)
        elif key.kind == "sps_time":
            self.sps_time = self._single(tag, values)
        elif key.kind == "date":
            column = key.column()
            self.conditions.append(or_(*(self.in_range(column, date_range(tag, v)) for v in values)))
        elif key.kind == "patient_name":
            self.conditions.append(or_(*(self.patient_name(v) for v in values)))
        elif key.kind == "priority":
            self.conditions.append(self.priority(key.column(), values))
        elif key.kind == "uid":
            self.conditions.append(key.column().in_(values))
        else:
            if key.kind == "status":
                self.status_given = True
            upper = key.kind == "pn"
            column = func.upper(key.column()) if upper else key.column()
            wildcards = element.VR in WILDCARD_VRS or upper
            self.conditions.append(or_(*(self.text(column, v.upper() if upper else v, wildcards) for v in values)))

    @staticmethod
    def _single(tag: int, values: list[str]) -> str:
        if len(values) > 1:
            raise BadQuery(tag, f"one value or range in {tag_name(tag)}")
        return values[0]

    # --- conditions -------------------------------------------------------------------------------

    def text(self, column: ColumnElement, value: str, wildcards: bool = True) -> ColumnElement:
        """Single value or wildcard matching (PS3.4 C.2.2.2.1, C.2.2.2.4)."""
        if not wildcards or ("*" not in value and "?" not in value):
            return column == value
        if self.glob:
            return column.op("GLOB")(value.replace("[", "[[]"))
        escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")

    def patient_name(self, value: str) -> ColumnElement:
        """Alphabetic group upper-cased, ideographic group as sent; phonetic group not stored (PS3.5 6.2)."""
        groups = [_trim_pn(g) for g in value.split("=")]
        if len(groups) == 1:
            if not groups[0].strip("*"):
                return true()
            if any(map(is_ideograph, groups[0])):
                return self.text(Patient.name_ideographic, groups[0])
            return self.text(Patient.name_alphabetic, _alphabetic(groups[0]))
        parts = []
        if groups[0].strip("*"):
            parts.append(self.text(Patient.name_alphabetic, _alphabetic(groups[0])))
        if groups[1].strip("*"):
            parts.append(self.text(Patient.name_ideographic, groups[1]))
        return and_(*parts) if parts else true()

    def priority(self, column: ColumnElement, values: list[str]) -> ColumnElement:
        """Match the DICOM terms (STAT, HIGH ...) against the stored HL7 priority codes they map from."""
        wanted = {term for term in DICOM_PRIORITIES for v in values if _wildcard(v.upper()).fullmatch(term)}
        stored = sorted({code for code in (*HL7_PRIORITIES, *DICOM_PRIORITIES) if dicom_priority(code) in wanted})
        return column.in_(stored) if stored else false()

    @staticmethod
    def in_range(column: ColumnElement, bounds: tuple[str | None, str | None]) -> ColumnElement:
        low, high = bounds
        if low is not None and low == high:
            return column == low  # an equality, so an index serves it (station, date) like the modality's query
        parts = [column != ""]  # an unknown date is in no range
        if low is not None:
            parts.append(column >= low)
        if high is not None:
            parts.append(column <= high)
        return and_(*parts)

    def scheduled_start(self) -> list[ColumnElement]:
        """ScheduledProcedureStepStartDate and Time: alone, or combined as one datetime range (C.2.2.2.5.1)."""
        date, time = ScheduledStep.start_date, ScheduledStep.start_time
        dates = date_range(SPS_DATE, self.sps_date) if self.sps_date not in (None, "", "-") else None
        times = time_range(SPS_TIME, self.sps_time) if self.sps_time not in (None, "", "-") else None
        if dates is None and times is None:
            return []
        if times is None:
            return [self.in_range(date, dates)]
        low_t, high_t = times
        if dates is None:
            if low_t and high_t and low_t > high_t:  # 2200-0600: the range crosses midnight
                return [time != "", or_(time >= low_t, time <= high_t)]
            return [self.in_range(time, times)]
        low_d, high_d = dates
        # The plain date bounds are implied by the datetime ones; they are kept so an index can range on them.
        parts = [self.in_range(date, dates)]
        if low_d is not None and low_t is not None:
            parts.append(or_(date > low_d, and_(date == low_d, time >= low_t)))
        if high_d is not None and high_t is not None:
            parts.append(or_(date < high_d, and_(date == high_d, time <= high_t)))
        return parts


def _trim_pn(group: str) -> str:
    # Trailing empty components carry nothing: 'WANG^XIAODONG^^' is 'WANG^XIAODONG' (PS3.5 6.2).
    return group.strip().rstrip("^").strip()


def _alphabetic(group: str) -> str:
    # The stored alphabetic group is upper-case ASCII (pinyin, or a Latin name folded): so is the query's.
    return ascii_text(group).upper()


def _wildcard(value: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value))


_DATE = re.compile(r"\d{8}\Z")
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?\Z")


def date_range(tag: int, value: str) -> tuple[str | None, str | None]:
    """`D`, `D-`, `-D` or `D1-D2` as inclusive bounds (PS3.4 C.2.2.2.5)."""
    low, dash, high = value.partition("-")
    if not dash:
        high = low
    for part in (low, high):
        if part and not _DATE.match(part):
            raise BadQuery(tag, f"bad date in {tag_name(tag)}")
    return low or None, high or None


def time_range(tag: int, value: str) -> tuple[str | None, str | None]:
    """`T`, `T-`, `-T` or `T1-T2` as HHMMSS bounds; a bound covers its whole precision (0930 is 093000-093059)."""
    low, dash, high = value.replace(":", "").partition("-")
    if not dash:
        high = low
    bounds: list[str | None] = []
    for part, pad in ((low, "0"), (high, "9")):
        if not part:
            bounds.append(None)
            continue
        match = _TIME.match(part)
        if not match:
            raise BadQuery(tag, f"bad time in {tag_name(tag)}")
        bounds.append("".join(g or "" for g in match.groups()[:3]).ljust(6, pad))
    return bounds[0], bounds[1]


def _bundle(name: str, table: type, columns: str) -> Bundle:
    return Bundle(name, *(getattr(table, column) for column in columns.split()))


# The columns the worklist item is made of: plain tuples load about twice as fast as ORM objects.
STEP = _bundle("step", ScheduledStep, "step_id modality station_aet station_name location start_date start_time "
                                      "description performing_physician status")
ORDER = _bundle("order", ImagingOrder, "accession placer_number filler_number requested_procedure_id procedure_code "
                                       "procedure_scheme procedure_meaning study_instance_uid priority "
                                       "referring_physician reason department patient_location admission_id")
PATIENT = _bundle("patient", Patient, "patient_id issuer family_name given_name family_pinyin given_pinyin "
                                      "name_is_latin birth_date sex")


# The statement every query shares; each adds its WHERE and LIMIT (statements are immutable).
BASE = (
    select(STEP, ORDER, PATIENT)
    .select_from(ScheduledStep)
    .join(ImagingOrder, ScheduledStep.order_ref == ImagingOrder.id)
    .join(Patient, ImagingOrder.patient_ref == Patient.id)
    .order_by(ScheduledStep.start_date, ScheduledStep.start_time, ScheduledStep.id)
)


def worklist_select(identifier: Dataset, *, hide_statuses: Iterable[str], limit: int, dialect: str) -> Select:
    """One SELECT over scheduled_step JOIN imaging_order JOIN patient for a C-FIND identifier (PS3.4 K.4.1.3)."""
    builder = _Builder(dialect)
    builder.walk(identifier, TOP_LEVEL, top=True)
    conditions = builder.conditions + builder.scheduled_start()
    hidden = list(hide_statuses)
    if hidden and not builder.status_given:
        conditions.append(ScheduledStep.status.not_in(hidden))
    return BASE.where(*conditions).limit(limit)
