"""Verification SCP: C-ECHO on the shared DICOM listener (PS3.4 A.4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

SOP_CLASSES = (Verification,)


def on_echo(event: Event) -> int:
    """EVT_C_ECHO: success; reaching here proves the association and the listener work (PS3.4 A.4)."""
    return 0x0000


def dicom_handlers(e: "Engine") -> list[tuple]:
    return [(evt.EVT_C_ECHO, on_echo)]
