"""SQLAlchemy 2 tables: the journal (messages, deliveries) and the domain store (patients, orders, steps)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# --- journal -------------------------------------------------------------------------------------


class Message(Base):
    """One inbound message or event, committed before it is acknowledged."""

    __tablename__ = "message"
    # The message browser filters on these and pages newest first by received_at: each filter's index ends with
    # it, so the newest matches come off the index without a sort. channel+status covers the dashboard counts.
    # Patient and accession are looked up by equality only, and most messages (relays, ACKs, rejects) have
    # neither: partial indexes leave those rows out, which is two index pages less in each journal commit.
    __table_args__ = (Index("ix_message_channel_received", "channel", "received_at"),
                      Index("ix_message_status_received", "status", "received_at"),
                      Index("ix_message_type_received", "message_type", "received_at"),
                      Index("ix_message_channel_status", "channel", "status"),
                      Index("ix_message_patient_id", "patient_id", sqlite_where=text("patient_id IS NOT NULL"),
                            postgresql_where=text("patient_id IS NOT NULL")),
                      Index("ix_message_accession", "accession", sqlite_where=text("accession IS NOT NULL"),
                            postgresql_where=text("accession IS NOT NULL")))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    peer: Mapped[str] = mapped_column(String(80), default="")
    content_type: Mapped[str] = mapped_column(String(32), default="hl7v2")
    sender: Mapped[str] = mapped_column(String(128), default="")
    # NULL when the sender gave none, so that messages without MSH-10 never collide.
    control_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    message_type: Mapped[str] = mapped_column(String(24), default="")
    charset: Mapped[str] = mapped_column(String(32), default="")
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    text: Mapped[str] = mapped_column(Text, default="")
    # processed | filtered | error
    status: Mapped[str] = mapped_column(String(16))
    # sender + control id, set only once a message was accepted: a resend after AE is processed again,
    # a resend after AA is answered again without being processed twice.
    accepted_key: Mapped[str | None] = mapped_column(String(260), nullable=True, unique=True)
    ack_code: Mapped[str] = mapped_column(String(2), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    accession: Mapped[str | None] = mapped_column(String(64), nullable=True)

    deliveries: Mapped[list["Delivery"]] = relationship(back_populates="message", order_by="Delivery.id")


class Delivery(Base):
    """One outbound effect: a payload for one destination, delivered by the dispatcher."""

    __tablename__ = "delivery"
    __table_args__ = (Index("ix_delivery_destination_status", "channel", "destination", "status", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("message.id"), index=True)
    channel: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64))
    # queued | error (failed, will retry) | sent | dead (attempts exhausted or refused)
    status: Mapped[str] = mapped_column(String(8))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    content_type: Mapped[str] = mapped_column(String(32), default="hl7v2")
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    response: Mapped[str] = mapped_column(Text, default="")

    message: Mapped[Message] = relationship(back_populates="deliveries")


class DeliveryAttempt(Base):
    """Every try of a delivery, with the peer's answer: what an analyst reads when a HIS refuses."""

    __tablename__ = "delivery_attempt"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("delivery.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(8))  # sent | error | dead
    detail: Mapped[str] = mapped_column(Text, default="")


class DestinationLease(Base):
    """Which engine instance sends a destination's queue, until when: one holder at a time keeps it FIFO."""

    __tablename__ = "destination_lease"

    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    destination: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), default="")  # host:pid:random of the instance
    # the database's clock, never an instance's: instances with skewed clocks still agree on expiry
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# --- domain --------------------------------------------------------------------------------------


class Patient(Base):
    """A patient as the Order Placer identifies it (PID-3 with its assigning authority)."""

    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient_id_issuer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(64), default="")
    family_name: Mapped[str] = mapped_column(String(64), default="")  # ideographic, or Latin as sent
    given_name: Mapped[str] = mapped_column(String(64), default="")
    family_pinyin: Mapped[str] = mapped_column(String(64), default="")  # lowercase, ü as v
    given_pinyin: Mapped[str] = mapped_column(String(64), default="")
    name_is_latin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Upper-case alphabetic and ideographic PN groups, kept for case-insensitive C-FIND matching.
    name_alphabetic: Mapped[str] = mapped_column(String(130), default="", index=True)
    name_ideographic: Mapped[str] = mapped_column(String(130), default="", index=True)
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(1), default="")
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("patient.id"), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    orders: Mapped[list["ImagingOrder"]] = relationship(back_populates="patient")


class ImagingOrder(Base):
    """An order with its one requested procedure (IHE RAD TF-2 4.4: one OBR, one requested procedure)."""

    __tablename__ = "imaging_order"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_ref: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    placer_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    placer_issuer: Mapped[str] = mapped_column(String(64), default="")
    filler_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    filler_issuer: Mapped[str] = mapped_column(String(64), default="")
    accession: Mapped[str] = mapped_column(String(16), unique=True)
    requested_procedure_id: Mapped[str] = mapped_column(String(16), default="")
    procedure_code: Mapped[str] = mapped_column(String(64), default="")
    procedure_scheme: Mapped[str] = mapped_column(String(64), default="")
    procedure_meaning: Mapped[str] = mapped_column(String(128), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    priority: Mapped[str] = mapped_column(String(8), default="")  # HL7 priority: S, A, R ...
    # SC scheduled | IP in progress | CM completed | CA cancelled | DC discontinued (HL7 table 0038)
    status: Mapped[str] = mapped_column(String(2), default="SC")
    referring_physician: Mapped[str] = mapped_column(String(128), default="")
    reason: Mapped[str] = mapped_column(String(256), default="")
    department: Mapped[str] = mapped_column(String(64), default="")
    patient_location: Mapped[str] = mapped_column(String(64), default="")
    admission_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    sender: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    patient: Mapped[Patient] = relationship(back_populates="orders")
    steps: Mapped[list["ScheduledStep"]] = relationship(back_populates="order", order_by="ScheduledStep.id")


class ScheduledStep(Base):
    """A Scheduled Procedure Step: one worklist entry (PS3.4 K.6.1.2.2)."""

    __tablename__ = "scheduled_step"
    __table_args__ = (
        Index("ix_step_station_start", "station_aet", "start_date", "start_time"),
        Index("ix_step_modality_start", "modality", "start_date", "start_time"),
        Index("ix_step_start", "start_date", "start_time"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_ref: Mapped[int] = mapped_column(ForeignKey("imaging_order.id"), index=True)
    step_id: Mapped[str] = mapped_column(String(16), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    station_aet: Mapped[str] = mapped_column(String(16), default="")
    station_name: Mapped[str] = mapped_column(String(16), default="")
    location: Mapped[str] = mapped_column(String(64), default="")
    start_date: Mapped[str] = mapped_column(String(8), default="")  # YYYYMMDD
    start_time: Mapped[str] = mapped_column(String(6), default="")  # HHMMSS
    description: Mapped[str] = mapped_column(String(128), default="")
    performing_physician: Mapped[str] = mapped_column(String(128), default="")
    # SCHEDULED | ARRIVED | READY | STARTED | COMPLETED | DISCONTINUED | CANCELLED
    status: Mapped[str] = mapped_column(String(16), default="SCHEDULED", index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    order: Mapped[ImagingOrder] = relationship(back_populates="steps")


class PerformedProcedureStep(Base):
    """A Modality Performed Procedure Step instance (PS3.4 F.7), with the attributes as last set."""

    __tablename__ = "performed_procedure_step"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # IN PROGRESS | COMPLETED | DISCONTINUED (PS3.3 C.4.14)
    status: Mapped[str] = mapped_column(String(16), index=True)
    # no Scheduled Step Attributes item matched a worklist entry: recorded, no status goes to the HIS
    unscheduled: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    pps_id: Mapped[str] = mapped_column(String(16), default="")
    station_aet: Mapped[str] = mapped_column(String(16), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    accession: Mapped[str] = mapped_column(String(16), default="", index=True)  # as the modality sent it
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    start_date: Mapped[str] = mapped_column(String(8), default="")
    start_time: Mapped[str] = mapped_column(String(6), default="")
    end_date: Mapped[str] = mapped_column(String(8), default="")
    end_time: Mapped[str] = mapped_column(String(6), default="")
    discontinuation_reason: Mapped[str] = mapped_column(String(64), default="")
    # the instance's attributes after the last N-SET, explicit VR little endian (an N-GET answers from them)
    attributes: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    steps: Mapped[list["ScheduledStep"]] = relationship(secondary="performed_step_link", order_by="ScheduledStep.id")


class PerformedStepLink(Base):
    """Which scheduled steps a performed step fulfils: one, several (group case) or none (unscheduled)."""

    __tablename__ = "performed_step_link"

    performed_ref: Mapped[int] = mapped_column(ForeignKey("performed_procedure_step.id"), primary_key=True)
    step_ref: Mapped[int] = mapped_column(ForeignKey("scheduled_step.id"), primary_key=True, index=True)


# --- admin UI: users, sessions, audit ------------------------------------------------------------


class AppUser(Base):
    """A local user of the admin UI and REST API; the password only as an argon2 hash."""

    __tablename__ = "app_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # admin | analyst | viewer | capture
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AppSession(Base):
    """A login: the cookie carries a random token, the table only its SHA-256 (a leaked table logs nobody in)."""

    __tablename__ = "app_session"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_ref: Mapped[int] = mapped_column(ForeignKey("app_user.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    peer: Mapped[str] = mapped_column(String(80), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class AuditEvent(Base):
    """Who saw or changed what, when, from where (IHE ATNA's questions): every patient-data view, every resend."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16), default="")
    action: Mapped[str] = mapped_column(String(48), index=True)  # e.g. message.view, message.resend, login
    object_type: Mapped[str] = mapped_column(String(32), default="")
    object_id: Mapped[str] = mapped_column(String(128), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    peer: Mapped[str] = mapped_column(String(80), default="")
    outcome: Mapped[str] = mapped_column(String(16), default="success")  # success | denied | failure
    detail: Mapped[str] = mapped_column(Text, default="")


# --- reports (Report Manager) --------------------------------------------------------------------


class Report(Base):
    """A diagnostic report of one order, across its versions; held unmatched (order_ref NULL) until linked."""

    __tablename__ = "report"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # stable across versions: the FHIR DiagnosticReport identifier, so a correction updates the same resource
    uid: Mapped[str] = mapped_column(String(64), unique=True)
    order_ref: Mapped[int | None] = mapped_column(ForeignKey("imaging_order.id"), nullable=True, unique=True)
    # the keys as the sender gave them: what an unmatched report is found and re-linked by
    accession: Mapped[str] = mapped_column(String(64), default="", index=True)
    placer_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    placer_issuer: Mapped[str] = mapped_column(String(64), default="")
    filler_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    filler_issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    # preliminary | final | corrected | amended | cancelled: the newest version's
    status: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=0)  # newest version number
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    order: Mapped["ImagingOrder | None"] = relationship()
    versions: Mapped[list["ReportVersion"]] = relationship(back_populates="report", order_by="ReportVersion.version")


class ReportVersion(Base):
    """One version of a report as signed: every version is kept, none is changed."""

    __tablename__ = "report_version"
    __table_args__ = (UniqueConstraint("report_ref", "version", name="uq_report_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_ref: Mapped[int] = mapped_column(ForeignKey("report.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    findings: Mapped[str] = mapped_column(Text, default="")
    impression: Mapped[str] = mapped_column(Text, default="")
    signer_id: Mapped[str] = mapped_column(String(64), default="")
    signer_name: Mapped[str] = mapped_column(String(128), default="")  # family^given as sent
    signer_role: Mapped[str] = mapped_column(String(32), default="")  # resident | attending | ...
    signed_at: Mapped[str] = mapped_column(String(26), default="")  # HL7 TS, with its offset when sent
    observed_at: Mapped[str] = mapped_column(String(26), default="")
    procedure_code: Mapped[str] = mapped_column(String(64), default="")
    procedure_meaning: Mapped[str] = mapped_column(String(128), default="")
    procedure_scheme: Mapped[str] = mapped_column(String(64), default="")
    pdf: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    source: Mapped[str] = mapped_column(String(8), default="hl7")  # hl7 | rest | sr
    message_id: Mapped[int] = mapped_column(ForeignKey("message.id"), index=True)  # the journal message it came in
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    report: Mapped[Report] = relationship(back_populates="versions")


class CaptureItem(Base):
    """A still or clip a capture station wrapped into DICOM: in review, held for its order, or handed to routing."""

    __tablename__ = "capture_item"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    station: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)  # one per capture session
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # still | clip
    # review (waits for send) | held (manual entry, waits for its order) | sent (journaled for routing) | deleted
    state: Mapped[str] = mapped_column(String(8), index=True)
    path: Mapped[str] = mapped_column(Text)  # the Part 10 file under $SWF_DATA_DIR/capture
    frames: Mapped[int] = mapped_column(Integer, default=1)
    size: Mapped[int] = mapped_column(Integer, default=0)
    manual: Mapped[bool] = mapped_column(Boolean, default=False)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    accession: Mapped[str] = mapped_column(String(16), default="", index=True)
    source: Mapped[str] = mapped_column(String(16), default="device")  # device | folder | import
    error: Mapped[str] = mapped_column(Text, default="")
    message_id: Mapped[int | None] = mapped_column(ForeignKey("message.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
