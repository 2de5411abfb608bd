"""channels.yaml: frozen pydantic models, `${NAME:-default}` interpolation, errors with file:line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from engine.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(Strict):
    """How a destination retries: exponential backoff, then dead after `attempts` tries."""

    attempts: int = Field(10, ge=1, le=1000)
    initial_seconds: float = Field(1.0, gt=0)
    multiplier: float = Field(2.0, ge=1)
    max_seconds: float = Field(300.0, gt=0)


class Retention(Strict):
    """How long a channel's journal is kept (engine.store.pruner): like an integration engine's data pruner.

    Messages older than `days` are archived (gzip JSON lines under $SWF_DATA_DIR/archive, raw bytes exact) when
    `archive` is on, then removed with their deliveries. Errors (message in error, or a dead delivery) are kept
    `keep_errors_days` instead, when given. Nothing with a queued or retrying delivery is ever removed.
    """

    days: int = Field(ge=1, le=36500)
    archive: bool = True
    keep_errors_days: int | None = Field(None, ge=1, le=36500)


# --- security ------------------------------------------------------------------------------------

# Keys whose values are secrets: channels.yaml must name them as `${NAME}` (or use the `*_file` twin), so
# the file itself can be shared, versioned and shown in the admin UI without the secret in it.
SECRET_KEYS = frozenset({"key_password", "token"})
# an intake token may default to empty (`${NAME:-}`): the route is then open, which `serve` logs at start
_SECRET_REFERENCE = {"token": r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-)?\}"}


def _existing_file(value: str | None) -> str | None:
    if value is not None and not Path(value).is_file():
        raise ValueError(f"no such file: {value}")
    return value


def _allowed_ips(value: list[str]) -> list[str]:
    import ipaddress

    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"not an address or network: {item!r} (e.g. 10.1.2.3 or 10.1.0.0/16)") from None
    return value


class TlsKeyPair(Strict):
    """A PEM certificate chain and its private key; the key's password from the environment or a file."""

    cert: str | None = None
    key: str | None = None
    key_password: SecretStr | None = None  # `${NAME}` only (see SECRET_KEYS)
    key_password_file: str | None = None  # a file holding the password (a container secret)

    @field_validator("cert", "key", "key_password_file")
    @classmethod
    def _files(cls, value: str | None) -> str | None:
        return _existing_file(value)

    @model_validator(mode="after")
    def _pair(self) -> "TlsKeyPair":
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if self.key_password is not None and self.key_password_file is not None:
            raise ValueError("key_password or key_password_file, not both")
        return self


class TlsServer(TlsKeyPair):
    """TLS on a listener (BCP 195, TLS 1.2 or later); with `ca`, clients must show a certificate it signed."""

    cert: str
    key: str
    ca: str | None = None  # PEM bundle of the CAs that sign client certificates
    client_certificate: Literal["required", "optional", "none"] = "required"
    handshake_timeout_seconds: float = Field(10.0, gt=0)

    @field_validator("ca")
    @classmethod
    def _ca_file(cls, value: str | None) -> str | None:
        return _existing_file(value)

    @model_validator(mode="after")
    def _client_ca(self) -> "TlsServer":
        if self.client_certificate != "none" and self.ca is None:
            raise ValueError(f"client_certificate {self.client_certificate} needs ca: the CAs to check them against")
        return self


class TlsClient(TlsKeyPair):
    """TLS to a destination: whom to trust (`ca`, else the system's CAs) and, for mutual TLS, our certificate."""

    ca: str | None = None
    server_name: str | None = None  # the name the server's certificate must carry; default: the host

    @field_validator("ca")
    @classmethod
    def _ca_file(cls, value: str | None) -> str | None:
        return _existing_file(value)


class DicomTls(TlsServer):
    """DICOM over TLS (PS3.15 B.1): the listener itself, or a second listener on `port` (2762) beside it."""

    port: int | None = Field(None, ge=1, le=65535)


# --- sources -------------------------------------------------------------------------------------


class MllpSource(Strict):
    """HL7 v2 over MLLP (HL7 v2.5 Appendix C)."""

    type: Literal["mllp"]
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    charset: str | None = None  # force this codec whatever MSH-18 says (broken senders)
    fallback_charset: str = "utf-8"  # when MSH-18 is empty: many Chinese HIS send GBK unlabelled
    # original: AA/AE/AR always (what most HIS expect even when they fill MSH-15/16);
    # enhanced: honour MSH-15/16 (CA/CE/CR accept acknowledgments) when the sender values them.
    ack_mode: Literal["original", "enhanced"] = "original"
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    idle_timeout_seconds: float = Field(300.0, gt=0)
    max_connections: int = Field(256, ge=1)
    allowed_ips: list[str] = []  # addresses or networks that may connect; empty: any
    tls: TlsServer | None = None

    @field_validator("allowed_ips")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return _allowed_ips(value)

    @field_validator("charset", "fallback_charset")
    @classmethod
    def _known_codec(cls, value: str | None) -> str | None:
        import codecs

        if value is not None:
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown character set {value!r} (try utf-8, gb18030, latin-1)") from None
        return value


class InternalSource(Strict):
    """Messages the engine's own actors emit (MPPS status, reports) for this channel's destinations."""

    type: Literal["internal"]


class BearerIntake(Strict):
    """An HTTP intake route a machine calls: `Authorization: Bearer <token>` when a token is set (RFC 6750 2.1)."""

    # the token's value never shows in an error: pydantic would print the input otherwise
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    # `${NAME:-}` only (see SECRET_KEYS); empty: open, fit for a listener on 127.0.0.1, and `serve` warns
    token: SecretStr = SecretStr("")
    token_file: str = ""  # or a file holding it (a container secret), read when the config loads

    @model_validator(mode="before")
    @classmethod
    def _read_token_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("token_file"):
            return data
        if data.get("token"):
            raise ValueError("token or token_file, not both")
        try:
            secret = Path(data["token_file"]).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"token_file {data['token_file']}: cannot read: "
                             f"{getattr(exc, 'strerror', None) or 'not UTF-8 text'}") from None
        if not secret:  # an empty file must not quietly open the route
            raise ValueError(f"token_file {data['token_file']} is empty")
        return {**data, "token": secret}

    @field_validator("token")
    @classmethod
    def _strong(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if secret and not re.fullmatch(r"[A-Za-z0-9\-._~+/]{16,}=*", secret):
            raise ValueError("a token has 16 or more characters of A-Z a-z 0-9 - . _ ~ + / "
                             "(e.g. openssl rand -hex 32)")
        return value


class FhirSource(BearerIntake):
    """FHIR R4 resources POSTed to the engine's HTTP listener at `/fhir/{resource}` (FHIR R4 3.1.0 RESTful API)."""

    type: Literal["fhir"]
    resource: Literal["ServiceRequest"] = "ServiceRequest"
    # FHIR system URI -> the short name HL7 v2 and DICOM carry: identifier issuers (PID-3.4, EI namespace),
    # coding scheme designators (99HIS). Unlisted systems: the identifier's assigner, else the URI as it is.
    systems: dict[str, str] = {}
    # IANA zone whose wall time the worklist shows; empty: keep the sender's wall time as HL7 v2 does
    timezone: str = ""
    max_body_bytes: int = Field(1024 * 1024, ge=1024)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r} (try Asia/Shanghai)") from None
        return value


class DicomSource(Strict):
    """C-STORE to the engine's DICOM listener (IHE RAD-8): coerced from the order, spooled, routed (PS3.4 B)."""

    type: Literal["dicom"]
    coerce: bool = True  # patient and request attributes from the order matched by accession / Study Instance UID
    # an image no order matches: forward it as it came (logged), or refuse it (C-STORE failure C001)
    unmatched: Literal["forward", "reject"] = "forward"
    # how the coerced PatientName is spelled: unicode (ISO_IR 192), gb18030, ascii (pinyin only)
    character_profile: Literal["ascii", "unicode", "gb18030"] = "unicode"
    # success 0000, or B000 "coercion of data elements" (PS3.4 B.2.3) when something was coerced
    coercion_status: Literal["success", "warning"] = "success"
    # Basic / Enhanced Text SR are reports too: routed like any object and, journaled on this channel, taken by
    # its report_manager step (ORU^R01 and FHIR out); null: only routed
    report_channel: str | None = Field(None, pattern=NAME_PATTERN)


class RestSource(BearerIntake):
    """JSON over the engine's HTTP listener at `/api/{resource}`: reports from the reporting system."""

    type: Literal["rest"]
    resource: Literal["reports"] = "reports"
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # a PDF rides along as Base64


Source = Annotated[MllpSource | InternalSource | FhirSource | DicomSource | RestSource, Field(discriminator="type")]


# --- steps ---------------------------------------------------------------------------------------


class FilterStep(Strict):
    """Let through only the listed message types (`ADT^A0*` style patterns)."""

    type: Literal["filter"]
    message_types: list[str] = Field(min_length=1)
    # filtered messages are acknowledged AA and kept as 'filtered'; reject answers AR 200 instead
    on_mismatch: Literal["filter", "reject"] = "filter"


class SetFieldsStep(Strict):
    """Overwrite fields of the message before it goes on (`MSH-5: RIS`)."""

    type: Literal["set_fields"]
    fields: dict[str, str] = Field(min_length=1)

    @field_validator("fields")
    @classmethod
    def _paths(cls, value: dict[str, str]) -> dict[str, str]:
        from engine.mappings.hl7_message import FieldPath

        for path in value:
            FieldPath.parse(path)
        return value


class ActorStep(Strict):
    """Hand the message to an IHE actor that owns domain state (one transaction with the journal)."""

    type: Literal["actor"]
    actor: Literal["order_filler", "report_manager"]
    # run this actor only for these message types (`ORU^R01`, `ADT^*`); empty: every message the filters let in
    message_types: list[str] = []
    # logical field -> HL7 location overrides for this sender, e.g. accession: OBR-3.1
    fields: dict[str, str] = {}
    # send what the actor emits to another channel's destinations (e.g. status to the HIS)
    emit_to: str | None = None

    @field_validator("fields")
    @classmethod
    def _paths(cls, value: dict[str, str]) -> dict[str, str]:
        from engine.errors import EngineError
        from engine.mappings.hl7_fields import check_fields

        try:
            check_fields(value)  # a misspelt field name would otherwise be found only by the first message
        except EngineError as exc:
            raise ValueError(str(exc)) from None
        return value


Step = Annotated[FilterStep | SetFieldsStep | ActorStep, Field(discriminator="type")]


# --- destinations --------------------------------------------------------------------------------


class ReportProfile(Strict):
    """How an MLLP receiver wants results (ORU^R01, HL7 v2.3.1 7.2 / v2.5.1 7.3.1): version, text type, PDF."""

    hl7_version: Literal["2.3.1", "2.4", "2.5.1"] = "2.3.1"
    text_type: Literal["TX", "FT"] = "TX"  # TX: one OBX per line; FT: one OBX per observation, lines as \.br\
    pdf: bool = False  # the report's PDF, when it has one, as an OBX ED (Base64)


class MllpDestination(Strict):
    """Send HL7 v2 over MLLP, wait for the ACK on a kept connection."""

    type: Literal["mllp"]
    name: str = Field(pattern=NAME_PATTERN)
    host: str
    port: int = Field(ge=1, le=65535)
    charset: str | None = None  # re-encode and relabel MSH-18 for receivers that need e.g. GB18030
    connect_timeout_seconds: float = Field(5.0, gt=0)
    ack_timeout_seconds: float = Field(30.0, gt=0)
    on_negative_ack: Literal["retry", "dead"] = "retry"  # AE/AR/CE/CR
    retry: RetryPolicy = RetryPolicy()
    tls: TlsClient | None = None
    # How this receiver wants procedure status from the Order Filler (IHE RAD-3): ORM^O01 (ORC-1 SC) for
    # v2.3.1/2.4 receivers, OMG^O19 for v2.5/2.5.1. Version empty: 2.3.1 for ORM, 2.5.1 for OMG.
    status_message: Literal["ORM^O01", "OMG^O19"] = "ORM^O01"
    hl7_version: Literal["2.3.1", "2.4", "2.5", "2.5.1"] | None = None
    report: ReportProfile = ReportProfile()  # reports (ORU^R01) from the Report Manager

    @model_validator(mode="after")
    def _status_form(self) -> "MllpDestination":
        allowed = STATUS_VERSIONS[self.status_message]
        if self.hl7_version is not None and self.hl7_version not in allowed:
            raise ValueError(f"status_message {self.status_message} is sent as HL7 {' or '.join(allowed)}, "
                             f"not {self.hl7_version}")
        return self

    @property
    def status_version(self) -> str:
        return self.hl7_version or STATUS_VERSIONS[self.status_message][0]


# The first version of each is the default. ORM^O01 was withdrawn after v2.5; OMG^O19 took its place.
STATUS_VERSIONS = {"ORM^O01": ("2.3.1", "2.4", "2.5"), "OMG^O19": ("2.5.1", "2.5")}


class DicomDestination(Strict):
    """Send spooled images with C-STORE (PS3.4 B), one association kept open across a run of images."""

    type: Literal["dicom"]
    name: str = Field(pattern=NAME_PATTERN)
    ae_title: str = Field(pattern=r"^[ -\[\]-~]{1,16}$")  # the called AE title (PS3.5 AE VR)
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(None, pattern=r"^[ -\[\]-~]{1,16}$")  # default: dicom.ae_title
    connect_timeout_seconds: float = Field(5.0, gt=0)
    response_timeout_seconds: float = Field(60.0, gt=0)
    idle_release_seconds: float = Field(5.0, ge=0)  # release the association after this long without images
    # C-STOREs in flight at once, each on its own association: a PACS answers only once it stored the image,
    # so with one the engine waits out every store in turn. 1 keeps strict arrival order at the PACS.
    associations: int = Field(2, ge=1, le=8)
    keep_sent_files: bool = False  # keep the spooled copy after the PACS stored it
    retry: RetryPolicy = RetryPolicy()
    tls: TlsClient | None = None  # DICOM over TLS (PS3.15 B.1)


class Route(Strict):
    """Which images go where: the first route whose every given criterion matches wins (fnmatch patterns)."""

    calling_ae_titles: list[str] = []  # empty: any modality
    modalities: list[str] = []  # Modality (0008,0060): CT, MR, US ...
    sop_classes: list[str] = []  # SOP Class UIDs or their keywords (CTImageStorage)
    to: list[str] = Field(min_length=1)  # destination names of this channel

    @field_validator("sop_classes")
    @classmethod
    def _sop_classes(cls, value: list[str]) -> list[str]:
        from pydicom.uid import UID
        from pynetdicom import sop_class

        resolved = []
        for item in value:
            if re.fullmatch(r"[0-9.*?]+", item):
                resolved.append(item)
            elif isinstance(getattr(sop_class, item, None), UID):
                resolved.append(str(getattr(sop_class, item)))
            else:
                raise ValueError(f"unknown SOP class {item!r} (a UID, or a keyword such as CTImageStorage)")
        return resolved


class FhirDestination(Strict):
    """POST transaction Bundles to a FHIR R4 server's base URL (FHIR R4 3.1.0.11 batch/transaction)."""

    type: Literal["fhir"]
    name: str = Field(pattern=NAME_PATTERN)
    url: str = Field(pattern=r"^https?://\S+$")  # the server's base, e.g. http://emr/fhir
    headers: dict[str, str] = {}  # e.g. Authorization for servers that want a token
    connect_timeout_seconds: float = Field(5.0, gt=0)
    response_timeout_seconds: float = Field(60.0, gt=0)
    # a 4xx other than 408/429: the server refused this Bundle, so sending it again rarely helps
    on_client_error: Literal["dead", "retry"] = "dead"
    retry: RetryPolicy = RetryPolicy()


Destination = Annotated[MllpDestination | DicomDestination | FhirDestination, Field(discriminator="type")]


class Channel(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    enabled: bool = True
    source: Source
    steps: list[Step] = []
    destinations: list[Destination] = []
    routes: list[Route] = []  # dicom source only; none: every image to every destination
    retention: Retention | None = None  # none: engine.retention, else kept forever

    @model_validator(mode="after")
    def _destinations(self) -> "Channel":
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique in a channel: {', '.join(duplicates)}")
        if not self.destinations and not any(isinstance(s, ActorStep) for s in self.steps):
            raise ValueError("a channel needs at least one destination or an actor step")
        if isinstance(self.source, DicomSource):
            if self.steps:
                raise ValueError("a dicom channel takes no steps: coercion and routes are its processing")
            if not self.destinations or any(not isinstance(d, DicomDestination) for d in self.destinations):
                raise ValueError("a dicom channel needs dicom destinations, and only those")
            for route in self.routes:
                unknown = [name for name in route.to if name not in names]
                if unknown:
                    raise ValueError(f"route to unknown destination: {', '.join(unknown)}")
        elif self.routes:
            raise ValueError("routes apply to a dicom source only")
        elif any(isinstance(d, FhirDestination) for d in self.destinations) and \
                not isinstance(self.source, InternalSource):
            raise ValueError("fhir destinations take what actors emit: they need an internal source")
        elif any(isinstance(d, DicomDestination) for d in self.destinations):
            raise ValueError("dicom destinations take images from a dicom source only")
        if isinstance(self.source, (FhirSource, RestSource)):
            # a resource is mapped to the model at its edge: only actors take it, HL7 field edits cannot apply
            if any(isinstance(s, SetFieldsStep) for s in self.steps) or not any(isinstance(s, ActorStep) for s in self.steps):
                raise ValueError("a fhir channel takes filter and actor steps, and needs an actor step")
        return self


AE_TITLE = r"^[ -\[\]-~]{1,16}$"  # PS3.5 AE VR: 16 chars, no backslash or control characters


class DicomSettings(Strict):
    """The engine's one DICOM listener: C-ECHO, MWL C-FIND, MPPS and C-STORE share it (CONTRACT.md)."""

    ae_title: str = Field("SWF_ENGINE", pattern=AE_TITLE)
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(32, ge=1)
    network_timeout_seconds: float = Field(30.0, gt=0)
    # Largest PDU the listener takes (PS3.8 D.1, 0 = no limit). Peers send no larger PDUs than this: at
    # pynetdicom's 16 KiB a 512 KiB image is 32 PDUs, each parsed in Python (a third of the image rate).
    max_pdu_length: int = Field(262144, ge=0)
    # Who may associate: addresses or networks, and calling AE titles (A-ASSOCIATE-RJ, PS3.8 7.1.1.9); empty: any
    allowed_ips: list[str] = []
    allowed_calling_ae_titles: list[str] = []
    max_associations_per_calling_ae: int | None = Field(None, ge=1)  # one modality cannot take every slot
    tls: DicomTls | None = None

    @field_validator("allowed_ips")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return _allowed_ips(value)

    @model_validator(mode="after")
    def _tls_port(self) -> "DicomSettings":
        if self.tls is not None and self.tls.port == self.port:
            raise ValueError(f"tls.port {self.port} is the plain listener's port: leave tls.port out to make "
                             "that listener TLS, or give the TLS listener its own port (2762)")
        return self


class HttpSettings(Strict):
    """The engine's one HTTP listener: FHIR intake, and the admin UI and REST API (CONTRACT.md: SWF_HTTP_PORT)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)


class StationRule(Strict):
    """Which station AE titles get a step: first matching rule wins (modality, procedure code, department)."""

    ae_titles: list[str] = Field(min_length=1)
    modality: str | None = None
    procedure_code: str | None = None  # fnmatch pattern, e.g. CT01*
    department: str | None = None  # fnmatch pattern on the ordering department / patient location
    station_name: str | None = None


class NameSettings(Strict):
    """How Chinese names become the PN alphabetic group."""

    case: Literal["upper", "lower", "title"] = "upper"
    umlaut: Literal["v", "u", "yu"] = "v"
    surname_readings: dict[str, str] = {}  # per-site overrides, e.g. {"乐": "le"}


class AccessionSettings(Strict):
    """Accession number: from the order (OBR-18 by default) or generated when the HIS sends none."""

    source: Literal["order", "generator"] = "order"
    generate_when_missing: bool = True
    prefix: str = Field("A", max_length=6)


class WorklistSettings(Strict):
    """The Order Filler / DSS and its Modality Worklist."""

    stations: list[StationRule] = []
    accession: AccessionSettings = AccessionSettings()
    names: NameSettings = NameSettings()
    # calling AE title -> character profile of the C-FIND answers
    profiles: dict[str, Literal["ascii", "unicode", "gb18030"]] = {}
    default_profile: Literal["ascii", "unicode", "gb18030"] = "unicode"
    # step statuses that no longer show on the worklist
    hide_statuses: list[str] = ["STARTED", "COMPLETED", "DISCONTINUED", "CANCELLED"]
    max_matches: int = Field(5000, ge=1)
    # an order for a patient the engine doesn't know: reject (AE 204 at PID-3) or register it from the order's PID
    unknown_patient: Literal["reject", "register"] = "reject"
    # which PID-3 repetition is the patient's key: the one with this assigning authority (CX.4),
    # else the one of this identifier type (CX.5), else the first
    patient_id_issuer: str = Field("", max_length=64)
    patient_id_type: str = Field("MR", max_length=5)


class MppsSettings(Strict):
    """The MPPS SCP (PS3.4 F.7) and the status it sends to the Order Placer (IHE RAD-3, ORC-1 SC)."""

    # channel whose destinations get the status messages; null sends none. Left at its default, a config
    # without that channel records MPPS and sends nothing.
    status_channel: str | None = Field("his_outbound", pattern=NAME_PATTERN)
    sending_application: str = Field("SWF", max_length=180)  # MSH-3
    sending_facility: str = Field("RAD", max_length=180)  # MSH-4


class ReportSettings(Strict):
    """The Report Manager: where results go (ORU^R01 to the HIS, FHIR to the EMR) and how FHIR names things."""

    # channels whose destinations get each report version; null sends none. Left at their defaults, a config
    # without those channels keeps reports and sends nothing.
    hl7_channel: str | None = Field("his_outbound", pattern=NAME_PATTERN)
    fhir_channel: str | None = Field("emr_fhir", pattern=NAME_PATTERN)
    sending_application: str = Field("SWF", max_length=180)  # MSH-3
    sending_facility: str = Field("RAD", max_length=180)  # MSH-4
    # identifier issuer (PID-3.4, EI namespace) -> FHIR system URI; unlisted issuers: urn:swf-engine:issuer:NAME
    systems: dict[str, str] = {}
    accession_system: str = "urn:swf-engine:accession"
    report_system: str = "urn:swf-engine:report"
    # IANA zone of HL7 times sent without an offset; empty: the engine's local zone
    timezone: str = ""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return FhirSource._known_zone(value)


class CaptureDevice(Strict):
    """Where a capture station's frames come from: any input FFmpeg opens (PyAV)."""

    # v4l2: a capture card (/dev/video0); file: a video file; stream: rtsp://... or an HTTP MJPEG URL
    type: Literal["v4l2", "file", "stream"]
    path: str = Field(min_length=1)
    format: str | None = None  # FFmpeg demuxer when it cannot guess: mpjpeg (HTTP MJPEG), mjpeg, h264
    options: dict[str, str] = {}  # FFmpeg input options: video_size 1920x1080, framerate 30, input_format mjpeg
    loop: bool = False  # file: start again at the end (demonstration and test stations)
    realtime: bool = True  # file: deliver at the file's frame rate, as a device would
    reopen_seconds: float = Field(5.0, gt=0)  # after the device failed or the stream ended


class CaptureFolder(Strict):
    """A folder a legacy device exports stills and clips into; each file becomes an image of the open session."""

    path: str = Field(min_length=1)
    poll_seconds: float = Field(1.0, gt=0)
    settle_seconds: float = Field(1.0, ge=0)  # unchanged this long = the device finished writing it
    after: Literal["move", "delete"] = "move"  # move: into done/ (or failed/ with the reason beside it)


class CaptureStation(Strict):
    """One capture station: a device, a worklist filter, the DICOM it makes (IHE RAD-8 as an Acquisition Modality)."""

    name: str = Field(pattern=NAME_PATTERN)
    ae_title: str = Field(pattern=AE_TITLE)  # worklist filter and the calling AE title of its images
    modality: str = Field("OT", pattern=r"^[A-Z]{2,4}$")  # ES, US, GM, XC ...: worklist filter
    # auto: from the modality (ES endoscopy, US ultrasound, GM/SM microscopy, else secondary capture)
    iod: Literal["auto", "endoscopy", "ultrasound", "microscopy", "secondary"] = "auto"
    device: CaptureDevice | None = None
    folder: CaptureFolder | None = None
    still_encoding: Literal["jpeg", "uncompressed"] = "jpeg"
    jpeg_quality: int = Field(92, ge=50, le=100)
    clip_preset: str = "veryfast"  # x264 preset: speed against size
    clip_max_seconds: float = Field(600.0, gt=0)
    # review: captured items wait for the operator's send; immediately: each is sent when captured
    send: Literal["review", "immediately"] = "review"
    burned_in_annotation: Literal["YES", "NO"] = "YES"  # video outputs usually overlay the patient's name
    anatomic_region: tuple[str, str, str] = ("38266002", "SCT", "Entire body")  # VL images (code, scheme, meaning)
    station_name: str = Field("", max_length=16)
    manufacturer: str = Field("", max_length=64)
    model_name: str = Field("", max_length=64)
    serial_number: str = Field("", max_length=64)
    institution: str = Field("", max_length=64)
    mpps: bool = False  # N-CREATE when a session opens, N-SET when it closes, to the engine's own MPPS SCP
    preview_fps: float = Field(10.0, gt=0, le=60)


class CaptureSettings(Strict):
    """Capture stations (non-DICOM video and file exports) and where their images go."""

    channel: str = Field("image_router", pattern=NAME_PATTERN)  # a dicom channel: its routes and destinations
    character_profile: Literal["ascii", "unicode", "gb18030"] = "unicode"
    # a manual (no worklist) capture waits for its order: looked for this often, by accession or patient id
    reconcile_seconds: float = Field(2.0, gt=0)
    stations: list[CaptureStation] = []


class EngineSettings(Strict):
    uid_root: str = Field("2.25", pattern=r"^[0-2](\.(0|[1-9][0-9]*))+$", max_length=40)
    dispatch_batch: int = Field(200, ge=1)
    # How long the journal writer waits for more messages to share a commit (group commit), in ms: under
    # load, fewer and larger commits leave more of the GIL to the connections; idle, each ACK waits this long.
    commit_delay_ms: float = Field(1.0, ge=0, le=50)
    # Several instances on one PostgreSQL: how long a destination's queue stays with an instance that stopped
    # renewing its lease (killed, hung) before another takes it over. Shorter fails over sooner; longer
    # tolerates longer stalls of a live holder before two instances could both send (at-least-once either way).
    lease_seconds: float = Field(30.0, ge=1, le=3600)
    # Retention for journal channels without their own (also the engine's own journals, e.g. "mpps");
    # none: kept forever. The pruner runs every prune_interval_minutes inside `serve`, prune_batch messages
    # per write transaction so the journal writer is never held for long.
    retention: Retention | None = None
    prune_interval_minutes: float = Field(60.0, gt=0)
    prune_batch: int = Field(200, ge=1, le=5000)


class Config(Strict):
    engine: EngineSettings = EngineSettings()
    channels: list[Channel] = Field(min_length=1)
    dicom: DicomSettings = DicomSettings()
    # absent: no HTTP listener (a config for MLLP relays only)
    http: HttpSettings | None = None
    worklist: WorklistSettings = WorklistSettings()
    mpps: MppsSettings = MppsSettings()
    reports: ReportSettings = ReportSettings()
    capture: CaptureSettings | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        problems = []
        names = [c.name for c in self.channels]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"channel name {name!r} is used more than once")
        ports: dict[int, str] = {}
        resources: dict[str, str] = {}
        for channel in self.channels:
            if isinstance(channel.source, MllpSource):
                other = ports.setdefault(channel.source.port, channel.name)
                if other != channel.name:
                    problems.append(f"channel {channel.name!r} listens on port {channel.source.port}, as {other!r} does")
            if isinstance(channel.source, FhirSource):
                if self.http is None:
                    problems.append(f"channel {channel.name!r} takes FHIR over HTTP: the config needs an http: section")
                other = resources.setdefault(channel.source.resource, channel.name)
                if other != channel.name:
                    problems.append(f"channel {channel.name!r} takes {channel.source.resource}, as {other!r} does")
            for step in channel.steps:
                if isinstance(step, ActorStep) and step.emit_to and step.emit_to not in names:
                    problems.append(f"channel {channel.name!r}: emit_to names no channel: {step.emit_to!r}")
        dicom = [c.name for c in self.channels if c.enabled and isinstance(c.source, DicomSource)]
        if len(dicom) > 1:
            problems.append(f"only one channel can take C-STORE from the DICOM listener: {', '.join(dicom)}")
        status_channel = self.mpps.status_channel
        if "status_channel" in self.mpps.model_fields_set and status_channel and status_channel not in names:
            problems.append(f"mpps.status_channel names no channel: {status_channel!r}")
        problems += self._report_checks(names)
        problems += self._capture_checks()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _capture_checks(self) -> list[str]:
        if self.capture is None:
            return []
        problems = []
        target = next((c for c in self.channels if c.name == self.capture.channel), None)
        if target is None or not isinstance(target.source, DicomSource):
            problems.append(f"capture.channel must name a channel with a dicom source: {self.capture.channel!r}")
        stations = [s.name for s in self.capture.stations]
        for name in sorted({n for n in stations if stations.count(n) > 1}):
            problems.append(f"capture station name {name!r} is used more than once")
        return problems

    def _report_checks(self, names: list[str]) -> list[str]:
        problems = []
        for channel in self.channels:
            target = channel.source.report_channel if isinstance(channel.source, DicomSource) else None
            if target and (target not in names or not any(
                    isinstance(s, ActorStep) and s.actor == "report_manager" for s in self.channel(target).steps)):
                problems.append(f"channel {channel.name!r}: report_channel {target!r} names no channel with a "
                                f"report_manager step")
        for channel in self.channels:
            if isinstance(channel.source, RestSource) and self.http is None:
                problems.append(f"channel {channel.name!r} takes JSON over HTTP: the config needs an http: section")
        for key, kind in (("hl7_channel", MllpDestination), ("fhir_channel", FhirDestination)):
            name = getattr(self.reports, key)
            if not name:
                continue
            if name not in names:
                if key in self.reports.model_fields_set:
                    problems.append(f"reports.{key} names no channel: {name!r}")
                continue
            wrong = [d.name for d in self.channel(name).destinations if not isinstance(d, kind)]
            if wrong:
                problems.append(f"reports.{key} {name!r} has destinations of another type: {', '.join(wrong)}")
        return problems

    def channel(self, name: str) -> Channel:
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(name)


# --- loading -------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Interpolation(Exception):
    pass


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Replace `${NAME}` and `${NAME:-default}` from the environment."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value not in (None, ""):
            return value
        if default is not None:
            return default
        raise _Interpolation(f"environment variable {name} is not set and has no default")

    return _VARIABLE.sub(replace, text)


def _build(node: yaml.Node, path: tuple, lines: dict[tuple, int], loader: yaml.SafeLoader,
           environ: Mapping[str, str], problems: list[tuple[int, str]]) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in result:
                problems.append((key_node.start_mark.line + 1, f"duplicate key {key!r}"))
            if key in SECRET_KEYS and not (isinstance(value_node, yaml.ScalarNode)
                                           and re.fullmatch(_SECRET_REFERENCE.get(key, r"\$\{[A-Za-z_][A-Za-z0-9_]*\}"),
                                                            value_node.value)):
                problems.append((key_node.start_mark.line + 1, f"{key} must be written as ${{NAME}} (from the "
                                 f"environment) or given as {key}_file: secrets stay out of this file"))
            result[key] = _build(value_node, (*path, key), lines, loader, environ, problems)
            lines[(*path, key)] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), lines, loader, environ, problems) for i, item in enumerate(node.value)]
    value = loader.construct_object(node, deep=True)
    if isinstance(value, str) and "${" in value:
        try:
            value = interpolate(value, environ)
        except _Interpolation as exc:
            problems.append((node.start_mark.line + 1, str(exc)))
    return value


def _line_for(loc: tuple, data: Any, lines: dict[tuple, int]) -> int:
    """Walk pydantic's error location through the data, skipping union tags it inserts."""
    path: tuple = ()
    if loc and loc[-1] == "__tag__":
        loc = loc[:-1]
    current = data
    for part in loc:
        if isinstance(current, dict) and part in current:
            path, current = (*path, part), current[part]
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            path, current = (*path, part), current[part]
        elif isinstance(current, dict) and isinstance(part, str) and part not in current and "-" not in part:
            # an unknown or missing key: unknown keys are in the data, missing ones point at the parent
            continue
    return lines.get(path, 1)


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and p in {"mllp", "internal", "fhir", "dicom", "rest", "filter", "set_fields", "actor"}))
    if error["type"] == "extra_forbidden":
        return f"unknown key {loc.rsplit('.', 1)[-1]!r} (at {loc})"
    if error["type"] == "missing":
        return f"missing required key {loc.rsplit('.', 1)[-1]!r} (at {loc})"
    if error["type"] == "union_tag_invalid":
        expected = error.get("ctx", {}).get("expected_tags", "")
        return f"{loc}: unknown type {error.get('ctx', {}).get('tag')!r} (expected {expected})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a channels file; ConfigError lists every problem as `file:line: message`."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}:1: cannot read: {exc.strerror}"]) from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{path}:{line}: YAML syntax: {getattr(exc, 'problem', exc)}"]) from None
    finally:
        loader.dispose()
    if root is None:
        raise ConfigError([f"{path}:1: the file is empty"])
    lines: dict[tuple, int] = {}
    problems: list[tuple[int, str]] = []
    data = _build(root, (), lines, yaml.SafeLoader(""), environ, problems)
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: expected a mapping with a 'channels' list"])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(error["loc"])
            if error["type"] == "union_tag_invalid":
                loc = (*loc, "type")  # point at the `type:` line, not the item's first line
            problems.append((_line_for(loc, data, lines), _describe(error)))
        config = None
    if problems:
        problems.sort(key=lambda p: p[0])
        raise ConfigError([f"{path}:{line}: {message}" for line, message in problems])
    assert config is not None
    return config
