"""Logical fields of an inbound HL7 v2 message: default locations, per-channel overrides, group-aware reads.

HL7 v2.5 2.5-2.7 (segments, fields, repetitions, components, escapes) and 2.15.9 (ERR-2 locations).
A logical field (`accession`) has one or more default locations tried in order (`OBR-18`); a channel may
replace them with one location of its own (`fields: {accession: OBR-3.1}`). The list of names and defaults
is documented in engine.mappings.hl7_orders. Reads are pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping, Sequence

from engine.errors import BadValue, EngineError
from engine.mappings.hl7_message import DecodedMessage, FieldPath, Hl7Message

# logical name -> default locations, first non-empty wins; () = not read unless a channel sets a location
DEFAULTS: dict[str, tuple[str, ...]] = {
    # patient (PID, MRG, PV1)
    "patient_id": ("PID-3",),
    "patient_issuer": (),
    "patient_name": ("PID-5",),
    "birth_date": ("PID-7",),
    "sex": ("PID-8",),
    "prior_patient_id": ("MRG-1",),
    "patient_class": ("PV1-2",),
    "patient_location": ("PV1-3",),
    "admission_id": ("PV1-19",),
    # order (ORC, TQ1, OBR, ZDS)
    "order_control": ("ORC-1",),
    "order_status": ("ORC-5",),
    "placer_number": ("ORC-2", "OBR-2"),
    "filler_number": ("ORC-3", "OBR-3"),
    "procedure_code": ("OBR-4", "OBR-44"),
    "accession": ("OBR-18",),
    "requested_procedure_id": ("OBR-19",),
    "step_id": ("OBR-20",),
    "modality": ("OBR-24",),
    "start": ("TQ1-7", "OBR-27.4", "ORC-7.4"),
    "priority": ("TQ1-9", "OBR-27.6", "ORC-7.6"),
    "order_time": ("ORC-9", "MSH-7"),
    "referring_physician": ("OBR-16", "ORC-12"),
    "reason": ("OBR-31", "OBR-13"),
    "department": ("ORC-17",),
    "step_location": (),
    "study_instance_uid": ("ZDS-1",),
    # results (ORU^R01 OBR)
    "observed_at": ("OBR-7",),
    "reported_at": ("OBR-22", "MSH-7"),
    "result_status": ("OBR-25",),
    "interpreter": ("OBR-32",),
}

# read from ORU^R01 by engine.mappings.hl7_report, not from orders
RESULT_FIELDS = frozenset({"observed_at", "reported_at", "result_status", "interpreter"})

_EXPLICIT_REPETITION = re.compile(r"-\d+\(\d+\)")
_TIMESTAMP = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,6})?(?:[+-]\d{4})?$")


def check_fields(fields: Mapping[str, str]) -> None:
    """Raise EngineError when a channel's `fields` names an unknown logical field or a bad location."""
    unknown = sorted(set(fields) - set(DEFAULTS))
    if unknown:
        raise EngineError(f"channel field overrides name unknown fields: {', '.join(unknown)} "
                          f"(known: {', '.join(DEFAULTS)})")
    for name, text in fields.items():
        try:
            Location.parse(text)
        except ValueError as exc:
            raise EngineError(f"channel field override {name}: {exc}") from None


def as_message(message: DecodedMessage | Hl7Message) -> Hl7Message:
    return message.parsed if isinstance(message, DecodedMessage) else message


def trigger_of(message: DecodedMessage | Hl7Message) -> tuple[str, str]:
    """(message type, trigger event), from MSH-9 (EVN-1 when MSH-9.2 is empty)."""
    if isinstance(message, DecodedMessage):
        kind, trigger = message.header.message_type, message.header.trigger_event
        parsed = message.parsed
    else:
        parsed = message
        kind, trigger = parsed.value("MSH-9.1").strip().upper(), parsed.value("MSH-9.2").strip().upper()
    return kind, trigger or parsed.value("EVN-1").strip().upper()


@dataclass(frozen=True)
class Location:
    """A location as written in the config; a field without `(n)` means every repetition."""

    path: FieldPath
    explicit_repetition: bool

    @classmethod
    def parse(cls, text: str) -> "Location":
        path = FieldPath.parse(text)
        if not path.field:
            raise ValueError(f"a field location needs a field number: {text!r} (e.g. PID-3)")
        return cls(path, bool(_EXPLICIT_REPETITION.search(text)))


@dataclass(frozen=True)
class Read:
    """What one logical field held: each repetition's components, the value the location names, and where."""

    reps: list[list[str]]  # every component of each repetition (first non-empty subcomponent of each)
    values: list[str]  # per repetition: the named component (or subcomponent), else component 1
    where: str  # ERR-2 location: segment^sequence^field[^repetition^component]
    component_level: bool = False  # the location named a component: `values` hold the whole fact

    @property
    def empty(self) -> bool:
        if self.component_level:
            return not any(self.values)
        return not any(any(rep) for rep in self.reps)

    @property
    def first(self) -> str:
        return next((value for value in self.values if value), "")

    def part(self, n: int, rep: int = 0) -> str:
        """Component n (1-based) of one repetition, whatever component the location named."""
        if rep >= len(self.reps):
            return ""
        comps = self.reps[rep]
        return comps[n - 1] if n <= len(comps) else ""


class FieldReader:
    """Reads logical fields from a message, or from one order group of it (ORC..OBR and what follows)."""

    def __init__(self, message: Hl7Message, fields: Mapping[str, str] | None = None,
                 group: Sequence[int] | None = None) -> None:
        self.msg = message
        self.fields = fields or {}
        self.segments = list(message.raw)
        self.ids = [str(s[0]) for s in self.segments]
        starts = [i for i, sid in enumerate(self.ids) if sid in ("ORC", "OBR")]
        self.top = range(0, starts[0] if starts else len(self.ids))
        self.group = tuple(group) if group is not None else None
        seps = message.raw.separators
        self.rep_sep, self.comp_sep = seps[2], seps[3]
        self.sub_sep = seps[4] if len(seps) > 4 else "&"

    def with_group(self, group: Sequence[int]) -> "FieldReader":
        return FieldReader(self.msg, self.fields, group)

    def locations(self, name: str) -> tuple[Location, ...]:
        if name not in DEFAULTS:
            raise KeyError(name)
        if name in self.fields:
            return (Location.parse(self.fields[name]),)
        return tuple(Location.parse(text) for text in DEFAULTS[name])

    def read(self, name: str) -> Read:
        """The first location of a logical field that holds anything; else an empty read at the first one."""
        empty: Read | None = None
        for location in self.locations(name):
            found = self._read_at(location)
            if not found.empty:
                return found
            empty = empty or found
        return empty or Read([], [], "")

    def where(self, name: str) -> str:
        return self.read(name).where

    # --- one location ---------------------------------------------------------------------------

    def _find(self, segment: str, occurrence: int) -> tuple[int | None, int]:
        """Index of the segment (group first, then the part before the first order), and its sequence."""
        places = []
        if self.group is not None:
            places.append([i for i in self.group if self.ids[i] == segment])
        places.append([i for i in self.top if self.ids[i] == segment])
        if self.group is None and not places[-1]:
            places.append([i for i, sid in enumerate(self.ids) if sid == segment])
        for found in places:
            if len(found) >= occurrence:
                index = found[occurrence - 1]
                return index, self.ids[:index].count(segment) + 1
        before = min(self.group) if self.group else 0
        return None, self.ids[:before].count(segment) + occurrence

    def _read_at(self, location: Location) -> Read:
        path = location.path
        index, sequence = self._find(path.segment, path.occurrence)
        where = f"{path.segment}^{sequence}^{path.field}"
        if path.component:
            where += f"^{path.repetition}^{path.component}" + (f"^{path.subcomponent}" if path.subcomponent else "")
        elif location.explicit_repetition:
            where += f"^{path.repetition}"
        if index is None:
            return Read([], [], where, bool(path.component))
        segment = self.segments[index]
        text = str(segment[path.field]) if path.field < len(segment) else ""
        if path.segment == "MSH" and path.field <= 2:
            return Read([[text]], [text], where) if text else Read([], [], where)
        reps = text.split(self.rep_sep) if text else []
        if location.explicit_repetition:
            reps = reps[path.repetition - 1:path.repetition]
        out, values = [], []
        for rep in reps:
            comps = rep.split(self.comp_sep)
            out.append([self._leaf(comp, 0) for comp in comps])
            if path.component:
                comp = comps[path.component - 1] if path.component <= len(comps) else ""
                values.append(self._leaf(comp, path.subcomponent))
            else:
                values.append(out[-1][0])
        return Read(out, values, where, bool(path.component))

    def _leaf(self, component: str, subcomponent: int) -> str:
        """One value: the named subcomponent, else the first non-empty one; unescaped, `""` read as empty."""
        subs = component.split(self.sub_sep)
        if subcomponent:
            value = subs[subcomponent - 1] if subcomponent <= len(subs) else ""
        else:
            value = next((s for s in subs if s.strip()), "")
        value = self.msg.unescape(value).strip()
        return "" if value == '""' else value


def timestamp(value: str, where: str) -> tuple[str, str]:
    """HL7 TS/DTM to (YYYYMMDD, HHMMSS): minutes and seconds optional, fraction and zone dropped.

    The time is kept as the sender's wall time (HL7 v2.5 2.A.77; DICOM DA/TM carry no zone either).
    A value of less than a whole day is BadValue: a worklist date needs one.
    """
    m = _TIMESTAMP.match(value.strip())
    if not m or m.group(3) is None:
        raise BadValue(f"not a date/time: {value[:32]!r} at {where}", location=where)
    year, month, day, hour, minute, second = (m.group(i) for i in range(1, 7))
    try:
        datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    except ValueError:
        raise BadValue(f"not a valid date/time: {value[:32]!r} at {where}", location=where) from None
    clock = f"{hour}{minute or '00'}{second or '00'}" if hour else ""
    return f"{year}{month}{day}", clock


def point_of_care(read: Read) -> str:
    """PV1-3 (PL) as point of care^room^bed, what DICOM's Current Patient Location shows; a component-level
    location (a channel's override such as PV1-3.1) is taken whole."""
    if read.component_level:
        return read.first
    return "^".join(read.part(i) for i in (1, 2, 3)).rstrip("^")


def date_only(value: str, where: str) -> str:
    """HL7 DT/TS to YYYYMMDD; a year or year-month alone (a birth date partly known) gives empty."""
    digits = value.strip()
    if re.fullmatch(r"\d{4}(\d{2})?", digits):
        return ""
    return timestamp(digits, where)[0]
