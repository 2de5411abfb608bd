"""An image's file and its journal rows are synced side by side; the modality is answered once both are on disk.

The router runs in-process here (real SQLite journal, real group-commit writer, real spool directory), with a
spool whose sync can be held or made to fail: the DICOM edge and the PACS are covered by test_image_router.py.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from sqlalchemy import select

from engine.actors.image_router import ImageRouter, ReceivedImage
from engine.channels.journal_writer import JournalWriter
from engine.clock import Clock
from engine.config import load_config
from engine.errors import Unavailable
from engine.store.db import Store
from engine.store.spool import Spool
from engine.store.tables import Delivery, Message
from peers import REPO

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def ct_image(sop_instance_uid: str) -> ReceivedImage:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, sop_instance_uid
    ds.StudyInstanceUID, ds.AccessionNumber, ds.Modality = "1.2.3.4", "NO-SUCH-ORDER", "CT"
    ds.PatientName, ds.PatientID = "TEST^IMAGE", "T1"
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * 8
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return ReceivedImage(calling_ae="CT1", peer="127.0.0.1:11112", sop_class_uid=CT_IMAGE,
                         sop_instance_uid=sop_instance_uid, transfer_syntax=EXPLICIT_LE, data=fp.getvalue())


class WatchedSpool(Spool):
    """The real spool; its sync first looks at what the journal holds, and fails when told to."""

    def __init__(self, root: Path, store: Store, *, fail: bool = False) -> None:
        super().__init__(root)
        self.store, self.fail = store, fail
        self.synced: list[tuple[Path, int, int]] = []  # file, its size, journal rows naming it at the time

    def make_durable(self, paths: list[Path]) -> None:
        deadline = time.monotonic() + 10
        while not (rows := self._rows_naming(paths[0])) and time.monotonic() < deadline:
            time.sleep(0.005)  # the journal commit runs beside this sync: its row appears meanwhile
        self.synced.append((paths[0], paths[0].stat().st_size, rows))
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().make_durable(paths)

    def _rows_naming(self, path: Path) -> int:
        with self.store.session() as session:
            return len(session.scalars(select(Delivery.id).where(Delivery.payload == str(path).encode())).all())


@pytest.fixture
def site(tmp_path):
    config = load_config(REPO / "channels.yaml", environ={})
    channel = next(c for c in config.channels if c.name == "image_router")
    store = Store(f"sqlite:///{tmp_path / 'swf.db'}")
    store.migrate()
    writer = JournalWriter(store)
    writer.start()

    def router(spool: Spool) -> ImageRouter:
        return ImageRouter(channel, store, writer, Clock(), spool, ae_title=config.dicom.ae_title,
                           names=config.worklist)

    yield store, router
    writer.stop()
    store.dispose()


def test_the_file_is_synced_while_its_journal_commit_runs_and_answered_after_both(site, tmp_path):
    store, router = site
    spool = WatchedSpool(tmp_path / "store", store)
    image = ct_image("1.2.3.4.1")

    stored = router(spool).receive(image)

    [(path, size, rows_at_sync)] = spool.synced
    assert rows_at_sync == 1  # the delivery row was committed while the file's sync ran, not after it
    assert size > len(image.data)  # the whole file (meta and dataset) was written before its sync began
    assert stored.message_id is not None and stored.destinations == ("pacs",)
    with store.session() as session:
        message = session.get(Message, stored.message_id)
        assert message is not None and message.status == "processed"
        [delivery] = session.scalars(select(Delivery).where(Delivery.message_id == stored.message_id)).all()
        assert delivery.status == "queued" and Path(delivery.payload.decode()) == path
    assert path.read_bytes().endswith(image.data)


def test_an_image_whose_file_cannot_be_synced_is_refused_and_its_rows_withdrawn(site, tmp_path):
    store, router = site
    spool = WatchedSpool(tmp_path / "store", store, fail=True)

    with pytest.raises(Unavailable) as refused:
        router(spool).receive(ct_image("1.2.3.4.2"))

    assert refused.value.dimse == 0xA700  # out of resources: the modality keeps the image and sends it again
    assert "No space left on device" in str(refused.value)
    [(path, _size, rows_at_sync)] = spool.synced
    assert rows_at_sync == 1 and not path.exists()
    with store.session() as session:
        [message] = session.scalars(select(Message)).all()
        assert message.status == "error" and "No space left on device" in message.error
        assert session.scalars(select(Delivery)).all() == []  # nothing left to forward

    # the modality's next try is taken as any image
    stored = router(WatchedSpool(tmp_path / "store", store)).receive(ct_image("1.2.3.4.2"))
    with store.session() as session:
        assert session.get(Message, stored.message_id).status == "processed"
