"""What one send to a destination came to: shared by the dispatcher and the sending processes, which import
this alone (not the dispatcher, its database and retry machinery) so that they start quickly."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    """The outcome of one send: `ok`, or why not and whether trying again can help."""

    ok: bool
    response: str = ""
    error: str = ""
    retry: bool = True
