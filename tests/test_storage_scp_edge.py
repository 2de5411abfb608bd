"""The storage SCP's edge on a real association: a C-STORE's header read while its pixel data is still arriving,
and C-STORE responses encoded by hand, as a pynetdicom modality and DCMTK's storescu decode them."""

from __future__ import annotations

import socket
import subprocess
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from engine.mappings.dicom_coercion import split_header
from engine.mwl.dicom_transport import TUNING, read_exactly
from engine.tcp import TCP_QUICKACK
from engine.mwl.storage_scp import failure, tune_storage
from orthanc_peer import NODELAY_ENV, storescu_command
from peers import free_port

PDU = 16384  # the SCP's maximum: a 512 KiB image comes in ~32 P-DATA PDUs


def ct(n: int, ts) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.AccessionNumber, ds.Modality = "WRONG^NAME", "W1", f"A{n}", "CT"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * 2048
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
    return ds


def encoded(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    ts = ds.file_meta.TransferSyntaxUID
    fp.is_implicit_VR, fp.is_little_endian = ts.is_implicit_VR, ts.is_little_endian
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.fixture
def scp():
    """An SCP with the storage role's association tuning; its C-STORE handler answers what the test asks."""
    seen: list[dict] = []
    answers: list = []

    def on_store(event):
        data = event.request.DataSet.getvalue()
        start = getattr(event.request.DataSet, "swf_header_start", None)
        seen.append(dict(data=data, start=start, ts=str(event.context.transfer_syntax)))
        return answers.pop(0) if answers else 0x0000

    ae = AE(ae_title="SWF_ENGINE")
    ae.maximum_pdu_size = PDU
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[*TUNING, (evt.EVT_CONN_OPEN, tune_storage), (evt.EVT_C_STORE, on_store)])
    try:
        yield port, seen, answers
    finally:
        server.shutdown()


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_header_is_read_while_the_pixel_data_arrives_and_is_the_datasets_own(scp, ts):
    port, seen, _ = scp
    modality = AE(ae_title="CT01")
    modality.add_requested_context(CTImageStorage, ts)
    assoc = modality.associate("127.0.0.1", port, ae_title="SWF_ENGINE")
    assert assoc.is_established
    images = [ct(n, ts) for n in range(3)]
    statuses = [assoc.send_c_store(image).Status for image in images]
    assoc.release()
    assert statuses == [0x0000] * 3
    assert len(seen) == 3
    for image, received in zip(images, seen):
        assert received["data"] == encoded(image)
        start = received["start"]
        assert start is not None  # read before the last of ~32 PDUs was in
        whole = split_header(received["data"], received["ts"])
        assert start.raw == whole.raw and start.dataset.SOPInstanceUID == image.SOPInstanceUID
        assert split_header(received["data"], received["ts"], start).tail == whole.tail


def test_hand_encoded_answers_and_pynetdicoms_are_what_the_modality_reads(scp):
    """Success and warning go out encoded here; a failure with a comment takes pynetdicom's path: the modality
    reads each as sent, for the request it sent."""
    port, _, answers = scp
    answers.extend([0x0000, 0xB000, failure(0xA700, "journal unavailable; send again later")])
    modality = AE(ae_title="CT01")
    modality.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = modality.associate("127.0.0.1", port, ae_title="SWF_ENGINE")
    responses = [assoc.send_c_store(ct(n, ExplicitVRLittleEndian)) for n in range(3)]
    assoc.release()
    assert [r.Status for r in responses] == [0x0000, 0xB000, 0xA700]
    assert "ErrorComment" not in responses[0] and "ErrorComment" not in responses[1]
    assert responses[2].ErrorComment == "journal unavailable; send again later"


def test_storescu_takes_the_hand_encoded_success(scp, tmp_path):
    port, seen, _ = scp
    files = []
    for n in range(2):
        image = ct(n, ExplicitVRLittleEndian)
        path = tmp_path / f"{n}.dcm"
        image.save_as(path, enforce_file_format=True)
        files.append(path)
    done = subprocess.run(storescu_command(port, files, aec="SWF_ENGINE"), env=NODELAY_ENV, capture_output=True,
                          text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-2000:]
    assert output.count("(Success") == 2 and len(seen) == 2


def test_every_read_leaves_the_connection_acknowledging_at_once():
    """A peer that leaves Nagle on (DCMTK's tools unless TCP_NODELAY=1) holds its second small write until we ACK
    the first, and Linux delays that ACK up to 40 ms once a connection looks interactive: each such request stalled.
    After every read the engine's DICOM sockets are back in quick-ACK mode."""
    if TCP_QUICKACK is None:
        pytest.skip("TCP_QUICKACK is Linux only")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            for request in (b"\x04\x00\x00\x00\x00\x4a" + bytes(74), b"\x05\x00\x00\x00\x00\x04" + bytes(4)):
                server.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 0)  # delayed ACKs, as Linux sets them itself
                client.sendall(request)
                assert bytes(read_exactly(SimpleNamespace(socket=server), len(request))) == request
                assert server.getsockopt(socket.IPPROTO_TCP, TCP_QUICKACK) == 1
