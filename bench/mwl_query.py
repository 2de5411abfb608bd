"""Modality Worklist query benchmark: the engine's SCP against DCMTK wlmscpfs, with DCMTK findscu as the modality.

For each size, scheduled steps spread over a year (today in the middle) and 20 station AE titles are written to a
fresh SQLite store (served by the engine's DICOM listener, in this process) and, as the same worklist items, to
.wl files (served by wlmscpfs -dfp, TCP_NODELAY=1). findscu is spawned per query, as a modality's worklist
client would be; echoscu against the same server, run just before each query, gives the floor every spawn pays
(process start, data dictionary, association): `net` is the median of (query - echo) over those pairs.

Queries: (a) station AE + today (what a modality asks, ~15 entries at 100k), (b) the whole of today.
Then, in process, where the time of the whole-day answer goes: SQL and rows, item values, encoding, and the
rest of the handler (sending through pynetdicom).

Usage: python bench/mwl_query.py [--sizes 1000,10000] [--large] [--runs 25] [--wl-runs 10]
                                 [--no-wlmscpfs] [--nagle]
(--nagle: the modality leaves Nagle on, as DCMTK's tools do without TCP_NODELAY=1; wlmscpfs keeps it off)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_file_meta_info  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from engine.app import build_engine  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.mappings.dicom_worklist import CharacterProfile, to_dataset, worklist_values  # noqa: E402
from engine.mwl.dicom_server import start_dicom_server  # noqa: E402
from engine.mwl.identifier import ResponsePlan  # noqa: E402
from engine.mwl.mwl_scp import Worklist  # noqa: E402
from engine.store.db import Store  # noqa: E402
from engine.store.tables import ImagingOrder, Patient, ScheduledStep  # noqa: E402
from peers import free_port, wait_port  # noqa: E402
from peers import dcmtk_tool  # noqa: E402
from mwl_fixture import patients as name_table  # noqa: E402

AET = "SWF_ENGINE"
STATIONS = [f"ST{n:02d}" for n in range(1, 21)]
ENV = {**os.environ, "TCP_NODELAY": "1"}
# --nagle: the modality as DCMTK ships it, Nagle on (its second small write waits for the server's ACK)
NAGLE_ENV = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
TODAY = date.today()
PROCEDURES = [("CT0101", "胸部CT平扫", "CT"), ("MR0301", "头颅MRI平扫", "MR"), ("US0101", "腹部彩超", "US"),
              ("DX0101", "胸部正位片", "DX"), ("CT9001", "CT Chest without contrast", "CT")]
# What a modality typically asks for (return keys), the matching keys are added per query.
RETURN_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyInstanceUID",
               "RequestedProcedureID", "RequestedProcedureDescription", "ReferringPhysicianName",
               "RequestedProcedureCodeSequence[0].CodeValue", "RequestedProcedureCodeSequence[0].CodeMeaning",
               *(f"ScheduledProcedureStepSequence[0].{k}" for k in (
                   "Modality", "ScheduledProcedureStepStartTime", "ScheduledProcedureStepDescription",
                   "ScheduledProcedureStepID", "ScheduledPerformingPhysicianName"))]


def generate(size: int, seed: int = 3) -> tuple[list[dict], list[dict], list[dict]]:
    """Patients, orders and steps (Core rows): one order and step per entry, two entries per patient."""
    rng = random.Random(seed)
    names = name_table()
    now = datetime.now(timezone.utc)
    patients, orders, steps = [], [], []
    for p in range((size + 1) // 2):
        family, given, fp, gp, latin = names[p % len(names)]
        patients.append(dict(id=p + 1, patient_id=f"B{p:07d}", issuer="HOSP", family_name=family, given_name=given,
                             family_pinyin=fp, given_pinyin=gp, name_is_latin=latin,
                             name_alphabetic=f"{fp}^{gp}".rstrip("^").upper(),
                             name_ideographic="" if latin else f"{family}^{given}",
                             birth_date=f"{1940 + p % 60}0{1 + p % 9}1{p % 10}", sex="MF"[p % 2], updated_at=now))
    for n in range(size):
        code, meaning, modality = PROCEDURES[n % len(PROCEDURES)]
        day = TODAY + timedelta(days=rng.randint(-182, 182))
        orders.append(dict(id=n + 1, patient_ref=n // 2 + 1, accession=f"B{n:08d}", requested_procedure_id=f"RP{n}",
                           procedure_code=code, procedure_scheme="99HIS", procedure_meaning=meaning,
                           study_instance_uid=f"1.2.826.0.1.3680043.10.543.{n}", priority="R",
                           referring_physician=("张^伟", "LI^MING", "")[n % 3], created_at=now, updated_at=now))
        steps.append(dict(order_ref=n + 1, step_id=f"S{n}", modality=modality, station_aet=STATIONS[n % 20],
                          station_name=STATIONS[n % 20], start_date=day.strftime("%Y%m%d"),
                          start_time=f"{rng.randint(7, 18):02d}{rng.randrange(0, 60, 5):02d}00", description=meaning,
                          status="SCHEDULED", updated_at=now))
    return patients, orders, steps


def write_worklist_files(directory: Path, patients, orders, steps) -> None:
    """The same items as .wl files for wlmscpfs (the engine's default unicode profile).

    Encoded with the engine's ResponsePlan from a template holding every key (tested byte-equal to pydicom's
    writer): pydicom's save_as takes ~3 ms a file, an hour for 100k.
    """
    directory.mkdir(parents=True)
    (directory / "lockfile").touch()
    profile = CharacterProfile("unicode").for_one_query()
    by_id = {p["id"]: SimpleNamespace(**p) for p in patients}
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.276.0.7230010.3.1.0.1"  # DCMTK's worklist file class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    header = DicomBytesIO()
    header.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(header, meta, enforce_standard=True)
    plan = None
    for order, step in zip(orders, steps):
        values = worklist_values(by_id[order["patient_ref"]], SimpleNamespace(**{
            "placer_number": "", "filler_number": "", "reason": "", "department": "", "patient_location": "",
            "admission_id": "",
            **order}), SimpleNamespace(location="", performing_physician="", **step), profile)
        if plan is None:  # every generated order has a procedure code: the first item shows every key
            plan = ResponsePlan(to_dataset(values), profile.charset, ExplicitVRLittleEndian)
        (directory / f"{order['accession']}.wl").write_bytes(header.getvalue() + plan.encode(values))


def timed(cmd: list[str], runs: int, env: dict = ENV) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
        times.append((time.perf_counter() - started) * 1000)
        if result.returncode:
            raise RuntimeError(f"{cmd[0]} failed: {result.stderr.decode(errors='replace')[-500:]}")
    return times


def count(findscu: str, port: int, keys: list[str], tmp: Path) -> int:
    out = Path(tempfile.mkdtemp(dir=tmp))
    args = [findscu, "-W", "-aec", AET, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    subprocess.run([*args, "127.0.0.1", str(port)], env=ENV, capture_output=True, timeout=600, check=True)
    found = len(list(out.glob("rsp*.dcm")))
    shutil.rmtree(out)
    return found


def stats(times: list[float]) -> tuple[float, float]:
    p95 = statistics.quantiles(times, n=20)[18] if len(times) >= 20 else max(times)
    return statistics.median(times), p95


class HandlerTimes(logging.Handler):
    """Collects the SCP's own handler time per query (its debug log line)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.ms: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "ms"):
            self.ms.append(record.ms)


def breakdown(store: Store, config: Config, keys_query) -> dict[str, float]:
    """In process, per response of the whole-day answer: SQL and rows, item values, encoding (µs)."""
    worklist = Worklist(store, config.worklist)
    worklist.find(keys_query, "BENCH")  # a warm connection and page cache, as the serving threads have
    t0 = time.perf_counter()
    matches = worklist.find(keys_query, "BENCH")
    t1 = time.perf_counter()
    items = list(matches.items())
    t2 = time.perf_counter()
    plan = ResponsePlan(keys_query, matches.profile.charset)
    for item in items:
        plan.encode(item)
    t3 = time.perf_counter()
    n = max(1, len(items))
    return {"sql_rows": (t1 - t0) * 1e6 / n, "values": (t2 - t1) * 1e6 / n, "encode": (t3 - t2) * 1e6 / n}


def query_dataset(day: str):
    from pydicom.dataset import Dataset

    q = Dataset()
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyInstanceUID",
                "RequestedProcedureID", "RequestedProcedureDescription", "ReferringPhysicianName"):
        setattr(q, key, "")
    code = Dataset()
    code.CodeValue = code.CodeMeaning = ""
    q.RequestedProcedureCodeSequence = [code]
    item = Dataset()
    for key in ("Modality", "ScheduledProcedureStepStartTime", "ScheduledProcedureStepDescription",
                "ScheduledProcedureStepID", "ScheduledPerformingPhysicianName"):
        setattr(item, key, "")
    item.ScheduledProcedureStepStartDate = day
    q.ScheduledProcedureStepSequence = [item]
    return q


def run_size(size: int, args, tools: dict[str, str], rows: list[list]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"mwl{size}-"))
    try:
        started = time.perf_counter()
        patients, orders, steps = generate(size)
        store = Store(f"sqlite:///{tmp / 'swf.db'}")
        store.migrate()
        with store.session() as session:
            session.execute(insert(Patient), patients)
            session.execute(insert(ImagingOrder), orders)
            session.execute(insert(ScheduledStep), steps)
        print(f"# {size}: store loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        port = free_port()
        config = Config.model_validate({
            "channels": [{"name": "out", "source": {"type": "internal"},
                          "destinations": [{"name": "his", "type": "mllp", "host": "127.0.0.1", "port": 9}]}],
            "dicom": {"ae_title": AET, "port": port}})
        engine = build_engine(config, store, tmp)
        stop = asyncio.run(start_dicom_server(engine))
        handler_times = HandlerTimes()
        scp_log = logging.getLogger("engine.mwl.mwl_scp")
        scp_log.setLevel(logging.DEBUG)
        scp_log.addHandler(handler_times)
        servers = {"engine": port}
        wl_process = None
        if tools.get("wlmscpfs") and not args.no_wlmscpfs:
            started = time.perf_counter()
            write_worklist_files(tmp / "wl" / AET, patients, orders, steps)
            print(f"# {size}: .wl files written in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            wl_port = free_port()
            wl_process = subprocess.Popen([tools["wlmscpfs"], "-dfp", str(tmp / "wl"), "-csk", "-dhl", str(wl_port)],
                                          env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(wl_port)
            servers["wlmscpfs"] = wl_port
        today = TODAY.strftime("%Y%m%d")
        # A typical station: the median of the stations' entries today (~15 at 100k, as a modality sees it).
        per_station = Counter(s["station_aet"] for s in steps if s["start_date"] == today)
        station = sorted(STATIONS, key=lambda st: per_station[st])[len(STATIONS) // 2]
        queries = {
            "station+today": [f"ScheduledProcedureStepSequence[0].ScheduledStationAETitle={station}",
                              f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={today}"],
            "whole day": [f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={today}"],
        }
        client_env = NAGLE_ENV if args.nagle else ENV
        for server, server_port in servers.items():
            runs = args.runs if server == "engine" else args.wl_runs
            echo_cmd = [tools["echoscu"], "-aec", AET, "127.0.0.1", str(server_port)]
            echoes: list[float] = []
            measured = []
            for name, matching in queries.items():
                keys = [*matching, *(k for k in RETURN_KEYS if not any(m.startswith(k + "=") for m in matching))]
                found = count(tools["findscu"], server_port, keys, tmp)
                cmd = [tools["findscu"], "-W", "-aec", AET]
                for key in keys:
                    cmd += ["-k", key]
                handler_times.ms.clear()
                finds, nets = [], []
                for _ in range(runs):  # echo and query in turn: the floor is paired with each query
                    echo = timed(echo_cmd, 1, client_env)[0]
                    finds.append(timed([*cmd, "127.0.0.1", str(server_port)], 1, client_env)[0])
                    echoes.append(echo)
                    nets.append(finds[-1] - echo)
                scp = f"{statistics.median(handler_times.ms):.1f}" if server == "engine" and handler_times.ms else ""
                measured.append([size, server, name, found, *stats(finds), statistics.median(nets), scp])
            rows.append([size, server, "C-ECHO floor", "", *stats(echoes), "", ""])
            rows.extend(measured)
        parts = breakdown(store, config, query_dataset(today))
        whole = [r for r in rows if r[:3] == [size, "engine", "whole day"]][0]
        if whole[3] >= 20 and whole[7]:
            # the handler's time not spent computing: handing PDUs to pynetdicom's DUL thread and waiting on it
            parts["send"] = float(whole[7]) * 1000 / whole[3] - sum(parts.values())
        rows.append([size, "engine", "whole day, µs/response: " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()),
                     "", "", "", "", ""])
        asyncio.run(stop())
        scp_log.removeHandler(handler_times)
        if wl_process:
            wl_process.terminate()
            wl_process.wait(timeout=10)
        store.dispose()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--large", action="store_true", help="add 100000")
    parser.add_argument("--runs", type=int, default=25, help="findscu runs per query against the engine")
    parser.add_argument("--wl-runs", type=int, default=10, help="findscu runs per query against wlmscpfs")
    parser.add_argument("--no-wlmscpfs", action="store_true")
    parser.add_argument("--nagle", action="store_true",
                        help="run findscu and echoscu without TCP_NODELAY=1, as DCMTK-based modalities do by default")
    args = parser.parse_args()
    tools = {name: dcmtk_tool(name) for name in ("findscu", "echoscu", "wlmscpfs")}
    if not tools["findscu"] or not tools["echoscu"]:
        print("DCMTK findscu/echoscu not found", file=sys.stderr)
        return 1
    sizes = [int(s) for s in args.sizes.split(",") if s] + ([100_000] if args.large else [])
    rows: list[list] = []
    for size in sizes:
        run_size(size, args, tools, rows)
    print(f"{'steps':>7} {'server':9} {'query':15} {'resp':>5} {'median ms':>10} {'p95 ms':>8} {'net ms':>8} "
          f"{'handler ms':>10}")
    for size, server, name, found, median, p95, net, scp in rows:
        if median == "":
            print(f"{size:>7} {server:9} {name}")
            continue
        net_text = f"{net:8.1f}" if net != "" else f"{'':8}"
        print(f"{size:>7} {server:9} {name:15} {found!s:>5} {median:10.1f} {p95:8.1f} {net_text} {scp:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
