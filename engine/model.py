"""Domain models of the Scheduled Workflow: patient, order, requested procedure, scheduled step (IHE RAD TF-1 3).

Frozen dataclasses, independent of HL7, DICOM and the database: mappings build them from messages, actors
turn them into rows, and the DICOM side reads them back (IHE RAD TF-2 4.1, 4.4; DICOM PS3.4 K.6.1.2.2).
`sources` fields say where each fact was read (an HL7 ERR-2 location such as `PID^1^3`) so that an actor can
point its error at the right field; they never take part in equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class PatientIdentity:
    """A patient id with its assigning authority (HL7 CX: ID^^^authority^type)."""

    id: str
    issuer: str = ""
    type_code: str = ""  # identifier type code, e.g. MR (HL7 table 0203)

    def __str__(self) -> str:
        return f"{self.id}^^^{self.issuer}" if self.issuer else self.id


@dataclass(frozen=True)
class PersonName:
    """A patient name: ideographic parts as sent (or Latin as sent) and their pinyin reading, surname first."""

    family: str = ""  # 王, 欧阳, 买买提 (father's name of a minority name), or Latin as sent (Smith)
    given: str = ""  # 小东; further components joined with '^'
    family_pinyin: str = ""  # lowercase, no tones, ü as v
    given_pinyin: str = ""
    latin: bool = False  # the name was sent in Latin letters: no ideographic group
    unreadable: tuple[str, ...] = ()  # characters without a reading, left out of the pinyin
    # syllables per component, so a presentation can separate them (xiao-dong); empty when not known
    syllables: tuple[tuple[str, ...], ...] = field(default=(), compare=False, repr=False)

    @property
    def ideographic(self) -> str:
        """The PN ideographic group `王^小东`; empty for Latin names (PS3.5 6.2.1, Annex J)."""
        if self.latin or not (self.family or self.given):
            return ""
        return "^".join((self.family, self.given)).rstrip("^")

    @property
    def empty(self) -> bool:
        return not (self.family or self.given)


@dataclass(frozen=True)
class Patient:
    """A patient as the Order Placer identifies it; `ids[0]` is the identity the engine keys on."""

    ids: tuple[PatientIdentity, ...]
    name: PersonName = PersonName()
    birth_date: str = ""  # YYYYMMDD, empty when unknown or not a full date
    sex: str = ""  # M, F, O or empty (DICOM PS3.3 C.7.1.1)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def identity(self) -> PatientIdentity:
        return self.ids[0]


@dataclass(frozen=True)
class EntityId:
    """An order number with the application that assigned it (HL7 EI: number^namespace)."""

    number: str = ""
    issuer: str = ""


@dataclass(frozen=True)
class CodedValue:
    """A code with its meaning and coding scheme (HL7 CE/CWE: code^text^scheme)."""

    code: str = ""
    meaning: str = ""
    scheme: str = ""


@dataclass(frozen=True)
class RequestedProcedure:
    """What is to be done, one per order (IHE RAD TF-2 4.4.4.1.2; PS3.3 C.4.11)."""

    id: str = ""  # Requested Procedure ID; empty: the actor uses the accession
    code: CodedValue = CodedValue()
    description: str = ""
    study_instance_uid: str = ""  # empty: the actor generates one, once


@dataclass(frozen=True)
class ScheduledStep:
    """One Scheduled Procedure Step: a worklist entry (PS3.4 K.6.1.2.2)."""

    id: str = ""  # empty: the actor uses the requested procedure id
    modality: str = ""
    station_aet: str = ""
    station_name: str = ""
    start_date: str = ""  # YYYYMMDD
    start_time: str = ""  # HHMMSS
    status: str = "SCHEDULED"
    description: str = ""
    location: str = ""


@dataclass(frozen=True)
class Order:
    """An imaging order as the placer sent it: one ORC/OBR pair (IHE RAD TF-2 4.2.4, 4.13.4)."""

    control: str  # ORC-1: NW, CA, DC, XO, SC ... (HL7 table 0119)
    placer: EntityId = EntityId()
    filler: EntityId = EntityId()
    accession: str = ""  # empty: not sent (the actor may generate one)
    priority: str = ""  # S, A, R ... (HL7 table 0027)
    order_status: str = ""  # ORC-5, for status messages (HL7 table 0038)
    placed_date: str = ""  # when the order was placed (ORC-9, else MSH-7): YYYYMMDD
    placed_time: str = ""  # HHMMSS
    referring_physician: str = ""  # family^given as sent
    reason: str = ""
    department: CodedValue = CodedValue()  # ordering department (ORC-17)
    patient_class: str = ""  # PV1-2: O, I, E ...
    patient_location: str = ""  # PV1-3 point of care^room^bed
    admission_id: str = ""  # PV1-19 visit number: DICOM Admission ID
    procedure: RequestedProcedure = RequestedProcedure()
    step: ScheduledStep = ScheduledStep()
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class PatientEvent:
    """An ADT event about one patient; `prior` is the merged identity of a merge (MRG-1)."""

    trigger: str  # A01, A04, A08, A40 ...
    patient: Patient
    prior: PatientIdentity | None = None
    patient_location: str = ""  # PV1-3 point of care^room^bed; empty: not sent
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class OrderMessage:
    """An order message: the patient and one order per ORC group (ORM^O01, OMG^O19)."""

    trigger: str
    patient: Patient
    orders: tuple[Order, ...]
    # an unknown patient: None lets worklist.unknown_patient decide (an HL7 PID); True registers it (the message
    # carries the patient's demographics, as a contained FHIR Patient); False rejects it (a bare reference)
    register_patient: bool | None = None


@dataclass(frozen=True)
class StepReference:
    """One Scheduled Step Attributes Sequence item: the worklist entry a performed step fulfils (PS3.4 F.7.2.1)."""

    study_instance_uid: str
    accession: str = ""
    requested_procedure_id: str = ""
    step_id: str = ""

    @property
    def scheduled(self) -> bool:
        """The unscheduled case leaves everything but the Study Instance UID empty (IHE RAD TF-2 4.6.4.1.2.4)."""
        return bool(self.accession or self.requested_procedure_id or self.step_id)


@dataclass(frozen=True)
class PerformedStep:
    """A Modality Performed Procedure Step as the modality reported it (PS3.3 C.4.13-C.4.15)."""

    sop_instance_uid: str
    status: str  # IN PROGRESS | COMPLETED | DISCONTINUED
    references: tuple[StepReference, ...] = ()
    pps_id: str = ""
    station_aet: str = ""
    modality: str = ""
    start_date: str = ""  # YYYYMMDD
    start_time: str = ""  # HHMMSS
    end_date: str = ""
    end_time: str = ""
    patient_id: str = ""
    description: str = ""
    discontinuation_reason: str = ""  # code meaning of (0040,0281)


REPORT_STATUSES = ("preliminary", "final", "corrected", "amended", "cancelled")


@dataclass(frozen=True)
class Signer:
    """Who signed a report version: a resident's preliminary, an attending's final (XCN: id^family^given)."""

    id: str = ""
    name: str = ""  # family^given as sent
    role: str = ""  # resident | attending | ... (free text, shown to the analyst)


@dataclass(frozen=True)
class ReportMessage:
    """One version of a diagnostic report as its sender reported it (ORU^R01, REST JSON); IHE RAD TF-2 4.128."""

    status: str  # one of REPORT_STATUSES
    accession: str = ""
    placer: EntityId = EntityId()
    filler: EntityId = EntityId()
    patient_id: str = ""
    patient_issuer: str = ""
    procedure: CodedValue = CodedValue()
    findings: str = ""  # lines separated by \n
    impression: str = ""
    signer: Signer = Signer()
    signed_at: str = ""  # HL7 TS: YYYYMMDDHHMMSS[+zzzz]
    observed_at: str = ""
    pdf: bytes = b""
    source: str = "hl7"  # hl7 | rest | sr
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ReportLink:
    """An analyst's request to link a held (unmatched) report to an order."""

    report_id: int
    accession: str = ""
    placer: str = ""
    filler: str = ""
