"""TCP options the engine's listeners share, DICOM and MLLP alike."""

from __future__ import annotations

import socket
from typing import Any

# Linux only: acknowledge what arrives at once instead of up to 40 ms later (see quick_ack)
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def quick_ack(sock: Any) -> None:
    """Acknowledge the peer's next segments at once.

    A peer that leaves Nagle on holds its second small write until we acknowledge the first, and Linux delays that
    ACK up to 40 ms once a connection looks interactive: DCMTK's tools (and modalities built on them) unless
    TCP_NODELAY=1 is in their environment, or a HIS that writes an MLLP frame's start block, message and end block
    one by one. Linux leaves quick-ACK mode by itself, so it is asked for again after a read: one cheap system call.
    """
    if TCP_QUICKACK is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    except OSError:  # not TCP (a socket pair, a Unix socket) or already closed: the next read reports a real fault
        pass
