"""Outbound C-STORE from the forwarding process (engine.channels.dicom), against a real SCP over a socket.

The request and the dataset are framed by the engine itself (not by pynetdicom's send_c_store), so what the
PACS reassembles must be the spooled file's dataset byte for byte, in PDUs no longer than the PACS accepts, with
a message ID per request; its statuses must become the dispatcher's outcomes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt

from engine.channels.dicom import DicomSender, c_store_rq, p_data_tf
from engine.config import DicomDestination
from peers import free_port

MAX_PDU = 4096  # small, so that even the command set of a long UID and every image span several PDUs


def spooled(path: Path, sop_class: str, syntax: str, pixels: int, status_hint: str = "") -> bytes:
    """A Part 10 file as the spool holds it; returns its dataset bytes (what follows the file meta)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.PatientID, ds.Modality, ds.StudyDescription = "300101", "CT", status_hint
    ds.BitsAllocated = 8
    ds.PixelData = bytes(range(256)) * (pixels // 256) + b"\x01" * (pixels % 256)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) group length after preamble, DICM, header
    return data[144 + meta_length:]


@pytest.fixture
def pacs():
    received: list[tuple[int, str, bytes]] = []
    pdus: list[int] = []

    def on_store(event) -> int:
        received.append((event.request.MessageID, event.request.AffectedSOPInstanceUID,
                         event.request.DataSet.getvalue()))
        hint = dcmread(event.request.DataSet, force=True).get("StudyDescription", "")
        return {"FULL": 0xA700, "REFUSE": 0xC000, "WARN": 0xB007}.get(hint, 0x0000)

    def on_pdu(event) -> None:
        pdus.append(len(event.data))

    ae = AE(ae_title="PACS")
    ae.maximum_pdu_size = MAX_PDU
    for sop_class in (CTImageStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_DATA_RECV, on_pdu)])
    try:
        yield port, received, pdus
    finally:
        server.shutdown()


def test_files_arrive_byte_for_byte_in_pdus_the_pacs_accepts(pacs, tmp_path):
    port, received, pdus = pacs
    files = [(tmp_path / f"{n}.dcm", sop_class, syntax, size) for n, (sop_class, syntax, size) in enumerate([
        (CTImageStorage, ExplicitVRLittleEndian, 200_000),
        (CTImageStorage, ImplicitVRLittleEndian, 10),  # one PDU of data
        (SecondaryCaptureImageStorage, ExplicitVRLittleEndian, MAX_PDU * 3),  # a fragment boundary on the pixels
        (CTImageStorage, ExplicitVRLittleEndian, 65_537),
    ])]
    datasets = [spooled(path, sop_class, syntax, size) for path, sop_class, syntax, size in files]
    destination = DicomDestination(type="dicom", name="pacs", ae_title="PACS", host="127.0.0.1", port=port,
                                   keep_sent_files=True, associations=1)

    async def send() -> list:
        sender = DicomSender(destination, calling_ae_title="SWF_ENGINE")
        try:
            return await sender.send_many([str(path).encode() for path, *_ in files])
        finally:
            await sender.close()

    attempts = asyncio.run(send())
    assert [a.ok for a in attempts] == [True] * 4, [a.error for a in attempts]
    assert [dataset for _, _, dataset in received] == datasets
    assert [uid for _, uid, _ in received] == [dcmread(path).SOPInstanceUID for path, *_ in files]
    assert len({message_id for message_id, _, _ in received}) == 4  # one message ID per request on the association
    assert max(pdus) <= MAX_PDU + 6 and len(pdus) > 60  # PDU length counts after its 6-byte header


def test_statuses_become_outcomes(pacs, tmp_path):
    port, received, _ = pacs
    paths = []
    for hint in ("WARN", "FULL", "REFUSE"):
        paths.append(tmp_path / f"{hint}.dcm")
        spooled(paths[-1], CTImageStorage, ExplicitVRLittleEndian, 1000, hint)
    destination = DicomDestination(type="dicom", name="pacs", ae_title="PACS", host="127.0.0.1", port=port,
                                   keep_sent_files=True, associations=1)

    async def send(path: Path):
        sender = DicomSender(destination, calling_ae_title="SWF_ENGINE")
        try:
            return await sender.send(str(path).encode())
        finally:
            await sender.close()

    warned, full, refused = (asyncio.run(send(path)) for path in paths)
    assert warned.ok and warned.response.startswith("status 0xB007")
    assert not full.ok and full.retry and "out of resources" in full.error
    assert not refused.ok and not refused.retry and "refused" in refused.error
    assert len(received) == 3


def test_request_and_framing_follow_ps3_7_and_ps3_8():
    from io import BytesIO

    from pydicom.filereader import read_dataset

    command = read_dataset(BytesIO(c_store_rq(65535, CTImageStorage, "1.2.3.4")), True, True)
    assert (command.CommandField, command.MessageID, command.Priority) == (0x0001, 65535, 0)
    assert command.CommandDataSetType != 0x0101 and command.AffectedSOPInstanceUID == "1.2.3.4"
    assert command.CommandGroupLength == len(c_store_rq(65535, CTImageStorage, "1.2.3.4")) - 12
    pdus = p_data_tf(5, b"x" * 10_000, 4096)
    assert [len(p) for p in pdus] == [4096 + 6, 4096 + 6, 10_000 - 2 * 4090 + 12]
    assert [p[0] for p in pdus] == [0x04] * 3 and [p[10] for p in pdus] == [5] * 3
    assert [p[11] for p in pdus] == [0x00, 0x00, 0x02]  # data fragments; the last marked last
    assert p_data_tf(1, b"cmd", 0, command_set=True) == [b"\x04\x00" + (9).to_bytes(4, "big")
                                                         + (5).to_bytes(4, "big") + b"\x01\x03cmd"]
