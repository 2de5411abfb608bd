"""Structured logs: one JSON object per line; extras carry ids (channel, message_id), never patient data."""

from __future__ import annotations

import json
import logging
import sys

from pynetdicom import _config as _pynetdicom_config

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs whole identifiers (patient names) at INFO: keep it quieter than that.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Its "standard" handlers format an INFO/DEBUG line for every PDU and DIMSE message (decoding the
    # command set to do so) even when nothing below WARNING is logged: per image, work for nothing.
    _pynetdicom_config.LOG_HANDLER_LEVEL = "none"
