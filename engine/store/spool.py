"""Files held until their destinations took them (store-and-forward): on disk before their sender is answered.

Big payloads stay out of the database: a delivery row carries the path of its own file. A file for several
destinations is written once and hard-linked once per further destination, so each delivery removes its own link
after success and the bytes go when the last one does. A crash between the write and the journal commit leaves
a file no row names; that is harmless (the sender was not answered and sends again).

A caller may sync the file beside the journal commit that names it (`write(durable=False)`, then
`make_durable`): the bytes are written first, so a killed process leaves a whole file; only a power cut between
the two syncs can leave a row naming a file cut short, for an image that was never answered (its sender sends it
again; the cut file fails at the destination and its delivery ends dead).
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path


class Spool:
    """A directory tree under $SWF_DATA_DIR: one subdirectory per day, one file per received object.

    Names are made ahead, a batch at a time with one directory sync, so that storing an object costs one
    fsync of its own bytes instead of two (its data, then its directory entry); on this class of disk each is
    ~3 ms of the ~10 ms a modality waits per image. A name made and never used is an empty file:
    `sweep_empty` removes those at start, when no name is handed out yet.
    """

    BATCH = 32

    def __init__(self, root: Path) -> None:
        self.root = root
        self._free: dict[Path, list[Path]] = {}
        self._lock = threading.Lock()

    def _take(self, day: str) -> Path:
        directory = self.root / day
        with self._lock:
            free = self._free.setdefault(directory, [])
            if not free:
                created = not directory.exists()
                directory.mkdir(parents=True, exist_ok=True)
                if created:
                    sync_directory(directory.parent)  # the new day directory itself must survive a crash
                for _ in range(self.BATCH):
                    path = directory / f"{uuid.uuid4().hex}.dcm"
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                    free.append(path)
                sync_directory(directory)
            return free.pop()

    def write(self, day: str, parts: list[bytes], copies: int = 1, *, durable: bool = True) -> list[Path]:
        """Write `parts` as one file (and `copies - 1` hard links); returns one path per copy.

        durable=False leaves the bytes in the page cache (a killed process keeps them, a power cut may not) for
        `make_durable` to sync later: a caller can run that sync beside another, the journal commit's."""
        first = self._take(day)
        fd = os.open(first, os.O_WRONLY | os.O_TRUNC)
        try:
            views = [memoryview(part) for part in parts if part]
            while views:
                written = os.writev(fd, views)
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if views and written:
                    views[0] = views[0][written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        paths = [first]
        for n in range(1, copies):
            link = first.with_name(f"{first.name}.{n}")
            os.link(first, link)
            paths.append(link)
        if copies > 1:
            sync_directory(first.parent)  # the links are new names
        return paths

    @staticmethod
    def make_durable(paths: list[Path]) -> None:
        """fsync a file written with durable=False (its links share its bytes; their names were synced)."""
        if paths:
            _fsync(paths[0])

    def sweep_empty(self) -> int:
        """Remove names made ahead and never written (from an earlier run); call before the first write."""
        removed = 0
        if self.root.exists():
            for path in self.root.glob("*/*.dcm"):
                try:
                    if path.stat().st_size == 0:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    @staticmethod
    def remove(paths: list[Path]) -> None:
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def sync_directory(directory: Path) -> None:
    _fsync(directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
