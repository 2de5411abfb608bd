"""channels.yaml: frozen pydantic models, `${NAME:-default}` interpolation, errors with file:line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


Source = Annotated[MllpSource | InternalSource, Field(discriminator="type")]


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
    actor: Literal["order_filler"]
    # logical field -> HL7 location overrides for this sender, e.g. accession: OBR-3.1
    fields: dict[str, str] = {}
    # send what the actor emits to another channel's destinations (e.g. status to the HIS)
    emit_to: str | None = None

    @field_validator("fields")
    @classmethod
    def _paths(cls, value: dict[str, str]) -> dict[str, str]:
        from engine.mappings.hl7_message import FieldPath

        for path in value.values():
            FieldPath.parse(path)
        return value


Step = Annotated[FilterStep | SetFieldsStep | ActorStep, Field(discriminator="type")]


# --- destinations --------------------------------------------------------------------------------


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


Destination = Annotated[MllpDestination, Field(discriminator="type")]


class Channel(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    enabled: bool = True
    source: Source
    steps: list[Step] = []
    destinations: list[Destination] = []

    @model_validator(mode="after")
    def _destinations(self) -> "Channel":
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique in a channel: {', '.join(duplicates)}")
        if not self.destinations and not any(isinstance(s, ActorStep) for s in self.steps):
            raise ValueError("a channel needs at least one destination or an actor step")
        return self


AE_TITLE = r"^[ -\[\]-~]{1,16}$"  # PS3.5 AE VR: 16 chars, no backslash or control characters


class DicomSettings(Strict):
    """The engine's one DICOM listener: C-ECHO, MWL C-FIND, MPPS and C-STORE share it (CONTRACT.md)."""

    ae_title: str = Field("SWF_ENGINE", pattern=AE_TITLE)
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(32, ge=1)
    network_timeout_seconds: float = Field(30.0, gt=0)


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


class EngineSettings(Strict):
    uid_root: str = Field("2.25", pattern=r"^[0-2](\.(0|[1-9][0-9]*))+$", max_length=40)
    dispatch_batch: int = Field(200, ge=1)


class Config(Strict):
    engine: EngineSettings = EngineSettings()
    channels: list[Channel] = Field(min_length=1)
    dicom: DicomSettings = DicomSettings()
    worklist: WorklistSettings = WorklistSettings()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        problems = []
        names = [c.name for c in self.channels]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"channel name {name!r} is used more than once")
        ports: dict[int, str] = {}
        for channel in self.channels:
            if isinstance(channel.source, MllpSource):
                other = ports.setdefault(channel.source.port, channel.name)
                if other != channel.name:
                    problems.append(f"channel {channel.name!r} listens on port {channel.source.port}, as {other!r} does")
            for step in channel.steps:
                if isinstance(step, ActorStep) and step.emit_to and step.emit_to not in names:
                    problems.append(f"channel {channel.name!r}: emit_to names no channel: {step.emit_to!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

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
    loc = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and p in {"mllp", "internal", "filter", "set_fields", "actor"}))
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
