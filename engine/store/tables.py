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
    __table_args__ = (Index("ix_message_channel_received", "channel", "received_at"),)

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
    status: Mapped[str] = mapped_column(String(16), index=True)
    # sender + control id, set only once a message was accepted: a resend after AE is processed again,
    # a resend after AA is answered again without being processed twice.
    accepted_key: Mapped[str | None] = mapped_column(String(260), nullable=True, unique=True)
    ack_code: Mapped[str] = mapped_column(String(2), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    accession: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)

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
