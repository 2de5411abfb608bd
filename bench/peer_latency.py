"""What one exchange costs a modality or a HIS before any work: association set-up, C-ECHO, a worklist C-FIND, an
MLLP ACK. `swf-engine serve` (shipped channels.yaml) against Orthanc as the DICOM peer of reference.

- associate: pynetdicom SCU, A-ASSOCIATE-RQ sent to A-ASSOCIATE-AC received (CT storage + verification proposed).
- echoscu / findscu: DCMTK, spawned per exchange as a modality's tools are, with TCP_NODELAY=1 and without it
  (Nagle on, as DCMTK ships: its second small write waits for the server's ACK of the first).
- MLLP: one ADT^A04 and its ACK on a kept connection, the frame in one write, or start block, message and end block
  written apart with Nagle on (as some HIS interface code does).

Usage: python bench/peer_latency.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, Verification  # noqa: E402

from orthanc_peer import Orthanc  # noqa: E402
from peers import dcmtk_tool, free_port, mllp_exchange, running_engine, sample_hl7  # noqa: E402

WITH_NODELAY = {**os.environ, "TCP_NODELAY": "1"}
NAGLE_ON = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}



def median_ms(samples: list[float]) -> float:
    return statistics.median(samples[1:] if len(samples) > 2 else samples) * 1000  # the first one warms up


def associate(port: int, aet: str, runs: int) -> float:
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        assoc = ae.associate("127.0.0.1", port, ae_title=aet)
        times.append(time.perf_counter() - started)
        if not assoc.is_established:
            raise RuntimeError(f"association with {aet} refused")
        assoc.release()
        time.sleep(0.05)
    return median_ms(times)


def spawned(command: list[str], env: dict, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, env=env, capture_output=True, check=True, timeout=60)
        times.append(time.perf_counter() - started)
    return median_ms(times)


def mllp_acks(port: int, message: bytes, runs: int, *, pieces: bool) -> float:
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:  # Nagle left on
        for n in range(runs):
            block = message.replace(b"HIS26112200001", f"LAT{int(pieces)}{n:06d}{time.time_ns() % 10**6}".encode())
            started = time.perf_counter()
            if pieces:
                for piece in (b"\x0b", block, b"\x1c\r"):
                    sock.sendall(piece)
            else:
                sock.sendall(b"\x0b" + block + b"\x1c\r")
            answer = b""
            while b"\x1c\r" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    raise RuntimeError("the listener closed the connection")
                answer += chunk
            times.append(time.perf_counter() - started)
    return median_ms(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    echoscu, findscu = dcmtk_tool("echoscu"), dcmtk_tool("findscu")
    if not echoscu or not findscu:
        sys.exit("DCMTK echoscu/findscu not found (scripts/test installs them)")
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="peer-latency-") as name:
        tmp = Path(name)
        orthanc = Orthanc(tmp / "orthanc").start()
        hl7_port, dicom_port = free_port(), free_port()
        env = {"SWF_HL7_PORT": str(hl7_port), "SWF_DICOM_PORT": str(dicom_port), "SWF_HTTP_PORT": str(free_port()),
               "SWF_HIS_PORT": str(free_port()), "SWF_PACS_PORT": str(orthanc.port), "SWF_LOG_LEVEL": "WARNING"}
        try:
            with running_engine(REPO / "channels.yaml", tmp / "var", [hl7_port, dicom_port], env):
                for message in ("01_adt_a04", "02_orm_o01"):
                    mllp_exchange(hl7_port, sample_hl7(message))
                find = [findscu, "-W", "-aec", "SWF_ENGINE", "-k", "AccessionNumber=A2611220001", "-k", "PatientName",
                        "127.0.0.1", str(dicom_port)]
                rows.append(("associate (pynetdicom SCU)", f"{associate(dicom_port, 'SWF_ENGINE', args.runs):.1f}",
                             f"{associate(orthanc.port, 'ORTHANC', args.runs):.1f}"))
                for label, client_env in (("TCP_NODELAY=1", WITH_NODELAY), ("Nagle on", NAGLE_ON)):
                    rows.append((f"echoscu, {label}",
                                 f"{spawned([echoscu, '-aec', 'SWF_ENGINE', '127.0.0.1', str(dicom_port)], client_env, args.runs):.1f}",
                                 f"{spawned([echoscu, '-aec', 'ORTHANC', '127.0.0.1', str(orthanc.port)], client_env, args.runs):.1f}"))
                    rows.append((f"findscu worklist query, {label}", f"{spawned(find, client_env, args.runs):.1f}", ""))
                adt = sample_hl7("01_adt_a04")
                rows.append(("MLLP ACK, frame in one write", f"{mllp_acks(hl7_port, adt, args.runs, pieces=False):.1f}", ""))
                rows.append(("MLLP ACK, frame in three writes, Nagle on",
                             f"{mllp_acks(hl7_port, adt, args.runs, pieces=True):.1f}", ""))
        finally:
            orthanc.stop()
    print(f"median of {args.runs} (the first left out), ms; Orthanc has no worklist or MLLP here")
    print(f"{'exchange':42} {'engine':>8} {'Orthanc':>8}")
    for label, engine_ms, orthanc_ms in rows:
        print(f"{label:42} {engine_ms:>8} {orthanc_ms:>8}")


if __name__ == "__main__":
    main()
