"""Acknowledgments: original (AA/AE/AR) and enhanced (CA/CE/CR) mode, HL7 v2.5 2.9 and 2.15.8 (ERR)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from engine.errors import EngineError
from engine.mappings.hl7_message import Header

_ERROR_TEXT = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

_ENHANCED = {"AA": "CA", "AE": "CE", "AR": "CR"}

# A header for bytes that had no usable MSH: the ACK still needs separators and a version.
FALLBACK_HEADER = Header(
    field_sep="|", encoding_chars="^~\\&", sending_application="", sending_facility="",
    receiving_application="", receiving_facility="", message_type="", trigger_event="",
    control_id="", processing_id="P", version="2.5", accept_ack_type="", application_ack_type="",
    declared_charset="", codec="ascii",
)


def escape(text: str, header: Header) -> str:
    """Escape delimiters in a text value (HL7 v2.5 2.7.1)."""
    sep = header.field_sep
    comp, rep, esc = header.encoding_chars[:3]
    sub = header.encoding_chars[3] if len(header.encoding_chars) > 3 else "&"
    out = text.replace(esc, f"{esc}E{esc}")
    for char, code in ((sep, "F"), (comp, "S"), (rep, "R"), (sub, "T")):
        out = out.replace(char, f"{esc}{code}{esc}")
    return out.replace("\r", " ").replace("\n", " ")


@dataclass(frozen=True)
class AckDecision:
    """What to answer: the code, and whether enhanced-mode rules say to answer at all."""

    code: str
    send: bool = True


def decide(header: Header, original_code: str, *, enhanced_mode: bool) -> AckDecision:
    """Map an original-mode outcome to the code to send, honouring MSH-15 in enhanced mode."""
    if not enhanced_mode or not (header.accept_ack_type or header.application_ack_type):
        return AckDecision(original_code)
    code = _ENHANCED[original_code]
    condition = header.accept_ack_type or "AL"
    send = {"AL": True, "NE": False, "SU": code == "CA", "ER": code != "CA"}.get(condition, True)
    return AckDecision(code, send)


def _version_at_least(version: str, major_minor: tuple[int, int]) -> bool:
    parts = version.split(".")
    try:
        return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0) >= major_minor
    except ValueError:
        return True


def build_ack(header: Header, code: str, *, now: datetime, control_id: str,
              error: EngineError | None = None, text: str = "") -> str:
    """An ACK for `header`, addressed back to the sender, in the sender's version and charset label."""
    s = header.field_sep
    comp = header.encoding_chars[0]
    trigger = header.trigger_event
    version = header.version or "2.5"
    msh = [
        "MSH", header.encoding_chars, header.receiving_application, header.receiving_facility,
        header.sending_application, header.sending_facility, now.strftime("%Y%m%d%H%M%S%z"), "",
        f"ACK{comp}{trigger}{comp}ACK" if trigger else "ACK", control_id,
        header.processing_id or "P", version,
    ]
    if header.declared_charset:
        msh += ["", "", "", "", "", header.declared_charset]
    segments = [s.join(msh)]
    message = text or (str(error) if error else "")
    msa = ["MSA", code, escape(header.control_id, header)]
    if message:
        msa.append(escape(message[:80], header))
    segments.append(s.join(msa))
    if error is not None:
        err_code = f"{error.err}{comp}{_ERROR_TEXT.get(error.err, 'Error')}{comp}HL70357"
        location = error.location.replace("^", comp)
        if _version_at_least(version, (2, 5)):
            segments.append(s.join(["ERR", "", location, err_code, "E", "", "", "", escape(str(error)[:250], header)]))
        else:
            sub = header.encoding_chars[3] if len(header.encoding_chars) > 3 else "&"
            code_ce = err_code.replace(comp, sub)
            segments.append(s.join(["ERR", f"{location}{comp}{code_ce}" if location else f"{comp}{comp}{comp}{code_ce}"]))
    return "\r".join(segments) + "\r"


def ack_code_of(text: str) -> str:
    """MSA-1 of an ACK we received (empty when there is no MSA)."""
    for segment in text.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA") and len(segment) > 4:
            return segment[4:].split(segment[3])[0].strip().upper()
    return ""
