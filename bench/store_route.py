"""Store-and-forward benchmark: storescu -> engine -> Orthanc against storescu -> Orthanc directly (issue 4).

200 CT-like images (512x512, 16-bit, Explicit VR Little Endian, ~512 KiB each) carrying a wrong name and id and
an order's accession, so the routed path does the full work: parse the header, look up the order, coerce,
spool with fsync, journal, answer, then forward with C-STORE. Each path gets a fresh Orthanc.

- direct: DCMTK storescu -> Orthanc; storescu ends when Orthanc answered the last image (Orthanc answers after
  storing), so the time is storescu's wall time.
- routed: storescu -> `swf-engine serve` (shipped channels.yaml) -> Orthanc; the time runs until Orthanc's
  /statistics counts every image. The time until storescu ends (every image safe in the engine's spool) is
  shown too.

Nagle: Debian's DCMTK, and Orthanc built on it, leave it on unless TCP_NODELAY=1 is in their environment; this
bench sets it for storescu and both Orthanc instances. The engine sets TCP_NODELAY on its own sockets, in and out.
`--nagle` runs storescu without it, as a modality built on DCMTK sends unless someone set the variable (both
Orthanc instances keep it): the same comparison for such a modality.

Usage: python bench/store_route.py [--images 200] [--size 512] [--runs 1] [--nagle]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from orthanc_peer import NODELAY_ENV, Orthanc, storescu_command, write_ct_study  # noqa: E402
from peers import free_port, mllp_exchange, running_engine, sample_hl7  # noqa: E402

ACCESSION = "A2611220001"



MODALITY_ENV = dict(NODELAY_ENV)  # --nagle takes TCP_NODELAY out


def send(port: int, files: list[Path], aec: str) -> float:
    command = storescu_command(port, files, aec=aec)  # finding DCMTK's storescu on PATH takes a while the first time
    started = time.perf_counter()
    done = subprocess.run(command, env=MODALITY_ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or done.stdout.count("(Success") + done.stderr.count("(Success") != len(files):
        raise RuntimeError(f"storescu failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return elapsed


def wait_count(orthanc: Orthanc, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while orthanc.get("/statistics")["CountInstances"] < count:
        if time.monotonic() > deadline:
            raise TimeoutError("Orthanc did not receive every image")
        time.sleep(0.02)


def direct(tmp: Path, files: list[Path]) -> float:
    orthanc = Orthanc(tmp / "orthanc-direct").start()
    try:
        return send(orthanc.port, files, "ORTHANC")
    finally:
        orthanc.stop()


def routed(tmp: Path, files: list[Path]) -> tuple[float, float]:
    hl7_port, dicom_port = free_port(), free_port()
    orthanc = Orthanc(tmp / "orthanc-routed", modalities={"SWF_ENGINE": ("SWF_ENGINE", "127.0.0.1", dicom_port)})
    orthanc.start()
    env = {"SWF_HL7_PORT": str(hl7_port), "SWF_DICOM_PORT": str(dicom_port), "SWF_HTTP_PORT": str(free_port()),
           "SWF_HIS_PORT": str(free_port()), "SWF_PACS_PORT": str(orthanc.port), "SWF_LOG_LEVEL": "WARNING"}
    try:
        with running_engine(REPO / "channels.yaml", tmp / "var", [hl7_port, dicom_port], env):
            for name in ("01_adt_a04", "02_orm_o01"):
                mllp_exchange(hl7_port, sample_hl7(name))
            started = time.perf_counter()
            accepted = send(dicom_port, files, "SWF_ENGINE")
            wait_count(orthanc, len(files))
            return time.perf_counter() - started, accepted
    finally:
        orthanc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--nagle", action="store_true", help="storescu with Nagle on (no TCP_NODELAY=1)")
    args = parser.parse_args()
    if args.nagle:
        MODALITY_ENV.pop("TCP_NODELAY", None)
    with tempfile.TemporaryDirectory(prefix="store-route-") as name:
        tmp = Path(name)
        study = write_ct_study(tmp / "study", args.images, accession=ACCESSION, patient_name="WRONG^PATIENT",
                               patient_id="WRONG-ID", size=args.size)
        megabytes = sum(f.stat().st_size for f in study.files) / 1e6
        print(f"{args.images} images {args.size}x{args.size} 16-bit, {megabytes:.0f} MB; "
              f"TCP_NODELAY=1 set for {'Orthanc (storescu with Nagle on)' if args.nagle else 'storescu and Orthanc'}; "
              f"cpus={os.cpu_count()}")
        direct_times, routed_times, accepted_times = [], [], []
        for run in range(args.runs):
            direct_times.append(direct(tmp / f"run{run}", study.files))
            total, accepted = routed(tmp / f"run{run}", study.files)
            routed_times.append(total)
            accepted_times.append(accepted)
        d, r, a = (statistics.median(t) for t in (direct_times, routed_times, accepted_times))
        n = args.images
        print(f"direct  storescu -> Orthanc:           {n / d:7.1f} images/s ({d:.2f} s)")
        print(f"routed  storescu -> engine -> Orthanc: {n / r:7.1f} images/s ({r:.2f} s until all in Orthanc)")
        print(f"        storescu -> engine (spooled):  {n / a:7.1f} images/s ({a:.2f} s)")
        print(f"ratio routed/direct: {d / r:.2f} (target >= 0.7)")


if __name__ == "__main__":
    main()
