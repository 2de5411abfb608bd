"""Typed errors that carry their answer on every protocol edge.

Each edge maps an error once: MLLP to an ACK code and an ERR-4 code (HL7 table 0357),
DICOM to a DIMSE status, HTTP to a status code. Messages name control ids, never PHI.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base: an application error the sender may fix and resend (AE, 207)."""

    ack = "AE"  # original-mode acknowledgment code (HL7 table 0008)
    err = 207  # HL7 table 0357: application internal error
    dimse = 0x0110  # Processing failure
    http = 500
    location = ""  # ERR-2 error location, e.g. "PID^1^3"

    def __init__(self, message: str, *, location: str | None = None) -> None:
        super().__init__(message)
        if location is not None:
            self.location = location


class Malformed(EngineError):
    """The bytes are not a well-formed HL7 v2 message (segment sequence, encoding)."""

    ack, err, http = "AR", 100, 400


class BadCharset(EngineError):
    """The message cannot be decoded with its declared or fallback character set."""

    ack, err, http = "AE", 102, 400


class MissingField(EngineError):
    """A required field is empty (HL7 table 0357: 101)."""

    err, dimse, http = 101, 0xA900, 422


class BadValue(EngineError):
    """A field holds a value of the wrong type or outside its table (102/103)."""

    err, dimse, http = 102, 0xA900, 422


class Unsupported(EngineError):
    """Message type, event or version the channel does not take (200/201/203)."""

    ack, err, dimse, http = "AR", 200, 0x0122, 400


class UnknownKey(EngineError):
    """The message refers to a patient, order or instance the engine does not know."""

    err, dimse, http = 204, 0x0112, 404


class DuplicateKey(EngineError):
    """The message would create something that already exists (205)."""

    err, dimse, http = 205, 0x0111, 409


class InvalidTransition(EngineError):
    """A state change that the procedure's current state does not allow."""

    err, dimse, http = 207, 0x0110, 409


class Unavailable(EngineError):
    """Storage or a dependency is down: the sender should retry later."""

    ack, err, dimse, http = "AR", 207, 0xA700, 503


class MissingAttribute(MissingField):
    """A type 1 DICOM attribute is absent, or present without a value (PS3.7 C.4.2: 0120 / 0121)."""

    dimse = 0x0120

    def __init__(self, message: str, *, tag: int, empty: bool = False) -> None:
        super().__init__(message)
        self.tag = tag
        if empty:
            self.dimse = 0x0121


class InvalidAttribute(BadValue):
    """A DICOM attribute holds a value the service does not allow (PS3.7 C.4.2: 0106)."""

    dimse = 0x0106

    def __init__(self, message: str, *, tag: int) -> None:
        super().__init__(message)
        self.tag = tag


class TooLarge(Malformed):
    """The message is larger than its source accepts."""

    http = 413


class UnsupportedMediaType(Unsupported):
    """An HTTP body in a media type the endpoint does not take."""

    http = 415


class Unauthenticated(EngineError):
    """An HTTP request without the bearer token its source requires (RFC 6750 3.1)."""

    ack, http = "AR", 401


class ConfigError(Exception):
    """channels.yaml does not validate; carries every problem with its line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
