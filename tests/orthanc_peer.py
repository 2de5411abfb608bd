"""A real Orthanc (Debian's binary) started per test, DICOM studies written with pydicom, DCMTK storescu runs."""

from __future__ import annotations

import array
import json
import random
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from peers import dcmtk_tool, free_port

# Debian's DCMTK (and Orthanc, built on it) leave Nagle on unless this is set: ~40 ms per PDU exchange otherwise.
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (os.path.exists("/usr/sbin/Orthanc") and "/usr/sbin/Orthanc") or None


class Orthanc:
    """Orthanc with its storage, index and config in a temporary directory; REST on loopback only."""

    def __init__(self, root: Path, *, aet: str = "ORTHANC", port: int | None = None,
                 modalities: dict[str, tuple[str, str, int]] | None = None) -> None:
        self.root, self.aet = root, aet
        self.port = port or free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Orthanc":
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test", "DicomAet": self.aet, "DicomPort": self.port, "HttpPort": self.http_port,
            "StorageDirectory": str(self.root / "storage"), "IndexDirectory": str(self.root / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomModalities": {name: list(v) for name, v in self.modalities.items()},
            "DicomCheckCalledAet": True, "StableAge": 1,
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        log = open(self.root / "orthanc.log", "ab")
        self.process = subprocess.Popen([orthanc_binary(), str(path)], env=NODELAY_ENV, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: see {self.root / 'orthanc.log'}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("Orthanc's REST API did not come up")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _request(self, path: str, body: bytes | None = None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body,
                                         method="POST" if body is not None else "GET")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read() or b"null")

    def get(self, path: str):
        return self._request(path)

    def post(self, path: str, body) -> object:
        return self._request(path, body if isinstance(body, bytes) else json.dumps(body).encode())

    def sop_instance_uids(self) -> list[str]:
        """Every stored instance's SOP Instance UID (a list: duplicates would show)."""
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")]

    def instance_tags(self, sop_instance_uid: str) -> dict:
        found = self.post("/tools/lookup", sop_instance_uid.encode())
        [instance] = [f for f in found if f["Type"] == "Instance"]
        return self.get(f"/instances/{instance['ID']}/tags")

    def wait_for_count(self, count: int, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            uids = self.sop_instance_uids()
            if len(uids) >= count or time.monotonic() > deadline:
                return uids
            time.sleep(0.2)


@dataclass(frozen=True)
class Study:
    uid: str
    files: list[Path]
    sop_instance_uids: list[str]


def write_ct_study(directory: Path, count: int, *, accession: str, patient_name: str, patient_id: str,
                   size: int = 64, charset: str | None = None, seed: int = 1) -> Study:
    """A CT series of `count` images (size x size, 16-bit), one file each, Explicit VR Little Endian."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    rng = random.Random(seed)
    pixels = array.array("H", (rng.getrandbits(12) for _ in range(size * size)))
    if array.array("H", [1]).tobytes() != b"\x01\x00":
        pixels.byteswap()
    pixels = pixels.tobytes()
    files, uids = [], []
    for n in range(count):
        ds = Dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        ds.SOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261122"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = "TEST"
        ds.ReferringPhysicianName = ""
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.PatientPosition = "HFS"
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = n + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [0, 0, n]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 1
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = directory / f"img{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        uids.append(ds.SOPInstanceUID)
    return Study(study_uid, files, uids)


@dataclass
class StoreRun:
    returncode: int
    succeeded: list[Path]  # files storescu reported a success (or warning) status for
    output: str


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response.*\((\w+)")


def parse_storescu(output: str) -> list[Path]:
    """Files whose C-STORE-RSP storescu logged as Success or Warning (its -v log pairs them in order)."""
    succeeded, current = [], None
    for line in output.splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1).strip())
        elif (m := _RESPONSE.search(line)) and current is not None:
            if m.group(1) in ("Success", "Warning"):
                succeeded.append(current)
            current = None
    return succeeded


def storescu_command(port: int, files: list[Path], *, aet: str = "CT01", aec: str = "SWF_ENGINE") -> list[str]:
    tool = dcmtk_tool("storescu")
    assert tool, "DCMTK storescu is not installed (scripts/test installs it)"
    return [tool, "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)]


def storescu(port: int, files: list[Path], *, aet: str = "CT01", aec: str = "SWF_ENGINE",
             timeout: float = 300) -> StoreRun:
    done = subprocess.run(storescu_command(port, files, aet=aet, aec=aec), env=NODELAY_ENV, capture_output=True,
                          text=True, timeout=timeout)
    output = done.stdout + done.stderr
    return StoreRun(done.returncode, parse_storescu(output), output)


def instance_file(orthanc: Orthanc, sop_instance_uid: str) -> bytes:
    found = orthanc.post("/tools/lookup", sop_instance_uid.encode())
    [instance] = [f for f in found if f["Type"] == "Instance"]
    request = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/instances/{instance['ID']}/file")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.read()
