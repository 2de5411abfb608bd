"""HL7 v2 messages: sniff the header from raw bytes, decode once, then parse (HL7 v2.5 2.5, 2.7).

The ACK path only needs MSH; `sniff_header` reads it without parsing the body. Full parsing
(python-hl7) happens when a step or an actor asks for a field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import hl7

from engine.errors import BadCharset, Malformed
from engine.mappings.charset import codec_for_hl7, normal_codec

_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")


@dataclass(frozen=True)
class Header:
    """What MSH says about a message: enough to store it and to acknowledge it."""

    field_sep: str
    encoding_chars: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_type: str  # MSH-9.1
    trigger_event: str  # MSH-9.2
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12
    accept_ack_type: str  # MSH-15
    application_ack_type: str  # MSH-16
    declared_charset: str  # MSH-18 as sent (first repetition)
    codec: str  # the codec the message was decoded with

    @property
    def sender(self) -> str:
        return f"{self.sending_application}^{self.sending_facility}"

    @property
    def type_label(self) -> str:
        """`ADT^A04`, or the bare type when the trigger is absent."""
        return f"{self.message_type}^{self.trigger_event}" if self.trigger_event else self.message_type


@dataclass(frozen=True)
class DecodedMessage:
    """A message decoded once with its charset; segments separated by CR."""

    header: Header
    text: str
    raw: bytes = field(repr=False)

    @cached_property
    def parsed(self) -> "Hl7Message":
        return Hl7Message.parse(self.text)


def _msh_line(raw: bytes) -> bytes:
    """The MSH segment's bytes: up to the first segment terminator."""
    end = len(raw)
    for terminator in (b"\r", b"\n"):
        position = raw.find(terminator)
        if position != -1:
            end = min(end, position)
    return raw[:end]


def _split_msh(text: str) -> list[str]:
    """MSH fields numbered as the standard does: result[1] is MSH-1 (the separator)."""
    sep = text[3]
    return ["MSH", sep, *text[4:].split(sep)]


def sniff_header(raw: bytes, *, fallback_codec: str = "utf-8", force_codec: str | None = None) -> DecodedMessage:
    """Find the charset from MSH-18, decode the whole message once, return it with its header.

    MSH-18 sits in the header; GB18030 trail bytes can be `|^~\\`, so the header is split only after
    it has been decoded with a codec that fits its bytes (HL7 v2.5 2.15.9.18).
    """
    start = raw.lstrip(b"\r\n \t")
    if not start.startswith(b"MSH"):
        raise Malformed("message does not start with an MSH segment", location="MSH")
    if len(start) < 8:
        raise Malformed("MSH segment too short for its encoding characters", location="MSH^1^2")
    sep = chr(start[3])
    encoding = start[4:8].decode("latin-1")
    if sep.isalnum() or sep in "\r\n" or start[3] > 0x7F:
        raise Malformed("MSH-1 field separator is not a printable delimiter", location="MSH^1^1")
    encoding = encoding.split(sep)[0]
    if len(encoding) < 4 or len(set(encoding + sep)) != len(encoding) + 1 or any(c.isalnum() or ord(c) > 0x7F for c in encoding):
        raise Malformed("MSH-2 encoding characters are invalid", location="MSH^1^2")

    msh_bytes = _msh_line(start)
    header_text = None
    for codec in ("ascii", "utf-8", fallback_codec):
        try:
            header_text = msh_bytes.decode(codec)
            break
        except (UnicodeDecodeError, LookupError):
            continue
    if header_text is None:
        header_text = msh_bytes.decode("latin-1")
    fields = _split_msh(header_text)

    def msh(n: int) -> str:
        return fields[n] if n < len(fields) else ""

    component_sep = encoding[0]
    repetition_sep = encoding[1]
    declared = msh(18).split(repetition_sep)[0].split(component_sep)[0].strip()
    if force_codec:
        codec = normal_codec(force_codec)
    elif declared:
        codec = codec_for_hl7(declared)
    else:
        codec = normal_codec(fallback_codec)
    try:
        text = start.decode(codec)
    except UnicodeError as exc:
        raise BadCharset(
            f"message bytes are not valid {(declared or codec)[:40]} at byte {getattr(exc, 'start', 0)}",
            location="MSH^1^18",
        ) from None
    if not text.startswith(start[:8].decode("ascii")):
        # An EBCDIC or UTF-16 label on ASCII-framed bytes: what decoded is not the header just read.
        raise BadCharset(f"character set {(declared or codec)[:40]} does not fit the MSH bytes", location="MSH^1^18")
    text = text.replace("\r\n", "\r").replace("\n", "\r").rstrip("\r")
    # Re-split the header from the decoded text: the pre-decode split was only to read MSH-18.
    fields = _split_msh(text.split("\r", 1)[0])

    message_type = msh(9).split(component_sep)
    header = Header(
        field_sep=sep,
        encoding_chars=encoding,
        sending_application=msh(3).split(component_sep)[0],
        sending_facility=msh(4).split(component_sep)[0],
        receiving_application=msh(5).split(component_sep)[0],
        receiving_facility=msh(6).split(component_sep)[0],
        message_type=message_type[0].strip().upper(),
        trigger_event=(message_type[1].strip().upper() if len(message_type) > 1 else ""),
        control_id=msh(10).strip(),
        processing_id=msh(11).split(component_sep)[0].strip(),
        version=msh(12).split(component_sep)[0].strip(),
        accept_ack_type=msh(15).strip().upper(),
        application_ack_type=msh(16).strip().upper(),
        declared_charset=declared,
        codec=codec,
    )
    return DecodedMessage(header=header, text=text, raw=raw)


_PATH = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\((?P<occ>\d+)\))?"
    r"(?:-(?P<field>\d+)(?:\((?P<rep>\d+)\))?(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?)?$"
)


@dataclass(frozen=True)
class FieldPath:
    """A location such as `PID-3.1`, `PID-5(2).1` (second repetition) or `OBR(2)-18`."""

    segment: str
    occurrence: int = 1
    field: int = 0
    repetition: int = 1
    component: int = 0
    subcomponent: int = 0

    @classmethod
    def parse(cls, text: str) -> "FieldPath":
        m = _PATH.match(text.strip())
        if not m or (m["comp"] and m["comp"] == "0") or (m["field"] and m["field"] == "0"):
            raise ValueError(f"not an HL7 field location: {text!r} (expected e.g. PID-3.1 or OBR(2)-18)")
        return cls(
            segment=m["seg"],
            occurrence=int(m["occ"] or 1),
            field=int(m["field"] or 0),
            repetition=int(m["rep"] or 1),
            component=int(m["comp"] or 0),
            subcomponent=int(m["sub"] or 0),
        )

    def __str__(self) -> str:
        text = self.segment + (f"({self.occurrence})" if self.occurrence != 1 else "")
        if self.field:
            text += f"-{self.field}" + (f"({self.repetition})" if self.repetition != 1 else "")
            if self.component:
                text += f".{self.component}" + (f".{self.subcomponent}" if self.subcomponent else "")
        return text


class Hl7Message:
    """A parsed message with path access; values come back unescaped (HL7 v2.5 2.7)."""

    def __init__(self, parsed: hl7.Message) -> None:
        self._msg = parsed

    @classmethod
    def parse(cls, text: str) -> "Hl7Message":
        try:
            parsed = hl7.parse(text)
        except Exception as exc:  # python-hl7 raises bare exceptions on malformed input
            raise Malformed(f"cannot parse message: {exc}") from None
        for segment in parsed:
            name = str(segment[0])
            if not _SEGMENT_ID.match(name):
                raise Malformed(f"invalid segment id {name[:8]!r}", location=name[:3])
        return cls(parsed)

    @property
    def raw(self) -> hl7.Message:
        return self._msg

    def segment_ids(self) -> list[str]:
        return [str(segment[0]) for segment in self._msg]

    def segments(self, name: str) -> list[hl7.Segment]:
        return [segment for segment in self._msg if str(segment[0]) == name]

    def has(self, name: str) -> bool:
        return any(str(segment[0]) == name for segment in self._msg)

    def value(self, path: str | FieldPath, default: str = "") -> str:
        """The unescaped value at a location; a whole field or component comes back as sent."""
        where = path if isinstance(path, FieldPath) else FieldPath.parse(path)
        found = self.segments(where.segment)
        if len(found) < where.occurrence:
            return default
        return segment_value(self._msg, found[where.occurrence - 1], where, default)

    def repetitions(self, segment: hl7.Segment, field_no: int) -> list[str]:
        """Every repetition of a field of one segment, as raw text."""
        text = _field_text(segment, field_no)
        if not text:
            return []
        return text.split(self._msg.separators[2]) if len(self._msg.separators) > 2 else [text]

    def unescape(self, text: str) -> str:
        return self._msg.unescape(text) if "\\" in text else text


def _field_text(segment: hl7.Segment, field_no: int) -> str:
    index = field_no  # python-hl7 keeps MSH-1 as its own element, so MSH-n is at n too
    if index >= len(segment):
        return ""
    return str(segment[index])


def segment_value(msg: hl7.Message, segment: hl7.Segment, where: FieldPath, default: str = "") -> str:
    """Read one location inside a given segment (so callers can walk OBR groups)."""
    if not where.field:
        return str(segment)
    text = _field_text(segment, where.field)
    if not text:
        return default
    seps = msg.separators  # e.g. '\r|~^&'
    field_sep, rep_sep, comp_sep = seps[1], seps[2], seps[3]
    sub_sep = seps[4] if len(seps) > 4 else "&"
    if str(segment[0]) == "MSH" and where.field in (1, 2):
        return text
    reps = text.split(rep_sep)
    if len(reps) < where.repetition:
        return default
    value = reps[where.repetition - 1]
    if where.component:
        components = value.split(comp_sep)
        if len(components) < where.component:
            return default
        value = components[where.component - 1]
        if where.subcomponent:
            subs = value.split(sub_sep)
            if len(subs) < where.subcomponent:
                return default
            value = subs[where.subcomponent - 1]
    del field_sep
    if "\\" in value:
        value = msg.unescape(value)
    return value if value != "" else default


def with_fields(text: str, header: Header, values: dict[str, str]) -> str:
    """The message text with fields overwritten at the given locations; missing levels are padded."""
    segments = text.split("\r")
    sep = header.field_sep
    comp, rep = header.encoding_chars[0], header.encoding_chars[1]
    sub = header.encoding_chars[3] if len(header.encoding_chars) > 3 else "&"
    for path_text, value in values.items():
        where = FieldPath.parse(path_text)
        seen = 0
        for index, segment in enumerate(segments):
            if not segment.startswith(where.segment):
                continue
            seen += 1
            if seen != where.occurrence:
                continue
            fields = segment.split(sep)
            position = where.field - 1 if where.segment == "MSH" else where.field
            if where.segment == "MSH" and where.field <= 2:
                raise ValueError("MSH-1 and MSH-2 cannot be set")
            fields += [""] * (position + 1 - len(fields))
            if not where.component and where.repetition == 1:
                fields[position] = value
            elif not where.component:
                # PID-5(2): that repetition only; the others stay (found by fuzzing, tests/test_fuzz.py).
                reps = fields[position].split(rep)
                reps += [""] * (where.repetition - len(reps))
                reps[where.repetition - 1] = value
                fields[position] = rep.join(reps)
            else:
                reps = fields[position].split(rep)
                reps += [""] * (where.repetition - len(reps))
                components = reps[where.repetition - 1].split(comp)
                components += [""] * (where.component - len(components))
                if where.subcomponent:
                    subs = components[where.component - 1].split(sub)
                    subs += [""] * (where.subcomponent - len(subs))
                    subs[where.subcomponent - 1] = value
                    components[where.component - 1] = sub.join(subs)
                else:
                    components[where.component - 1] = value
                reps[where.repetition - 1] = comp.join(components)
                fields[position] = rep.join(reps)
            segments[index] = sep.join(fields)
            break
    return "\r".join(segments)
