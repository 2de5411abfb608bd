"""Message browser search over a large journal (issue 7, acceptance 4: 100,000 messages, < 300 ms per search).

Fills a fresh SQLite journal (the schema of `swf-engine serve`, migrated) with N HL7 messages spread over
channels, statuses, types, patients and accessions and a week of receive times, then times the filtered searches
the message browser sends (admin_ui.queries.search_messages, as GET /api/messages does), first page of 50.

Usage: python bench/message_search.py [--messages 100000] [--repeat 15] [--db PATH]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert  # noqa: E402

from admin_ui.queries import MessageFilter, search_messages  # noqa: E402
from engine.store.db import Store  # noqa: E402
from engine.store.tables import Message  # noqa: E402

CHANNELS = [("his_inbound", 0.7), ("mpps", 0.15), ("his_fhir", 0.1), ("image_router", 0.05)]
TYPES = ["ADT^A04", "ORM^O01", "ADT^A08", "ORU^R01", "OMG^O19"]
STATUSES = [("processed", 0.95), ("filtered", 0.03), ("error", 0.02)]
START = datetime(2026, 11, 20, tzinfo=timezone.utc)
SPAN = timedelta(days=7)


def _pick(rng: random.Random, weighted):
    names, weights = zip(*weighted)
    return rng.choices(names, weights)[0]


def hl7_text(n: int, message_type: str, patient: str, accession: str, at: datetime) -> str:
    kind, event = message_type.split("^")
    return "\r".join([
        f"MSH|^~\\&|HIS|HOSP|SWF|RAD|{at:%Y%m%d%H%M%S}||{message_type}|C{n:09d}|P|2.3.1|||||CHN|UNICODE UTF-8",
        f"EVN|{event}|{at:%Y%m%d%H%M%S}",
        f"PID|1||{patient}^^^HOSP^MR||王^小东{n % 97}^^^^^L~WANG^XIAODONG^^^^^P||19800315|M|||"
        f"北京市海淀区中关村大街{n % 500}号^^北京^^100080^CHN||^PRN^PH^^86^10^{60000000 + n % 9999999}",
        f"PV1|1|O|CT^^^RAD||||D{n % 300:04d}^李^医生|||||||||||V{n:09d}",
        f"ORC|NW|HO{n:09d}^HIS|RF{n:09d}^RIS||SC||^^^{at:%Y%m%d%H%M%S}^^R||{at:%Y%m%d%H%M%S}|||D0001^张^医生",
        f"OBR|1|HO{n:09d}^HIS|RF{n:09d}^RIS|CT{n % 40:03d}^胸部CT平扫^99HIS|||{at:%Y%m%d%H%M%S}|||||||||"
        f"D0001^张^医生||{accession}|RP{n:09d}|SPS{n:09d}||||CT|||^^^{at:%Y%m%d%H%M%S}^^R",
        f"ZDS|2.25.{n}{n % 9973}^100^Application^DICOM",
    ]) + "\r"


def fill(store: Store, count: int, seed: int = 7) -> dict:
    rng = random.Random(seed)
    sample: dict = {}
    last_accession = ""
    batch = []
    for n in range(1, count + 1):
        at = START + SPAN * (n / count) + timedelta(milliseconds=rng.randint(0, 500))
        channel = _pick(rng, CHANNELS)
        message_type = rng.choice(TYPES)
        patient = f"P{rng.randint(1, count // 4):07d}"
        accession = f"A{n:09d}" if message_type in ("ORM^O01", "OMG^O19", "ORU^R01") else None
        text = hl7_text(n, message_type, patient, accession or "", at)
        last_accession = accession or last_accession
        status = _pick(rng, STATUSES)
        batch.append(dict(channel=channel, received_at=at, peer="10.0.0.5:40000", content_type="hl7v2",
                          sender="HIS^HOSP", control_id=f"C{n:09d}", message_type=message_type, charset="utf-8",
                          raw=text.encode(), text=text, status=status, accepted_key=None,
                          ack_code="AA" if status != "error" else "AE", error="" if status != "error" else "bad",
                          patient_id=patient, accession=accession))
        if n == count // 2:
            sample = {"patient_id": patient, "accession": last_accession, "control_id": f"C{n:09d}",
                      "at": at}
        if len(batch) == 5000:
            with store.session() as session:
                session.execute(insert(Message), batch)
            batch = []
    if batch:
        with store.session() as session:
            session.execute(insert(Message), batch)
    return sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--db", type=Path, help="keep the journal here (default: a temporary directory)")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory()
    path = args.db or Path(scratch.name) / "bench.db"
    path.unlink(missing_ok=True)
    store = Store(f"sqlite:///{path}")
    store.migrate()
    started = time.perf_counter()
    sample = fill(store, args.messages)
    store.checkpoint()
    print(f"journal: {args.messages} messages in {time.perf_counter() - started:.1f} s ({path.stat().st_size >> 20} MiB)")
    day = sample["at"].replace(hour=0, minute=0, second=0, microsecond=0)
    cases = {
        "no filter (newest 50)": MessageFilter(),
        "channel": MessageFilter(channel="his_inbound"),
        "status=error": MessageFilter(status="error"),
        "channel + status=error": MessageFilter(channel="mpps", status="error"),
        "message type": MessageFilter(message_type="ORU^R01"),
        "message type pattern ADT*": MessageFilter(message_type="ADT*"),
        "one day": MessageFilter(since=day, until=day + timedelta(days=1)),
        "channel + type + one day": MessageFilter(channel="his_inbound", message_type="ORM^O01", since=day,
                                                  until=day + timedelta(days=1)),
        "patient id": MessageFilter(patient_id=sample["patient_id"]),
        "accession": MessageFilter(accession=sample["accession"]),
        "control id": MessageFilter(control_id=sample["control_id"]),
        "free text, common (胸部CT)": MessageFilter(text="胸部CT"),
        "free text, one message": MessageFilter(text=f"V{args.messages // 2:09d}"),
        "free text, no match": MessageFilter(text="no such text anywhere"),
        "free text + channel + one day": MessageFilter(text="XIAODONG", channel="his_fhir", since=day,
                                                       until=day + timedelta(days=1)),
    }
    worst = 0.0
    print(f"{'search':40} {'rows':>5} {'median ms':>10} {'p95 ms':>8}")
    for name, where in cases.items():
        timings = []
        rows = []
        for _ in range(args.repeat):
            with store.sessions() as session:
                t0 = time.perf_counter()
                rows = search_messages(session, where, limit=50)
                timings.append((time.perf_counter() - t0) * 1000)
        timings.sort()
        p95 = timings[min(len(timings) - 1, int(len(timings) * 0.95))]
        worst = max(worst, p95)
        print(f"{name:40} {len(rows):>5} {statistics.median(timings):>10.1f} {p95:>8.1f}")
    from admin_ui.queries import dashboard
    from engine.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "channels.yaml", environ={})
    timings = []
    for _ in range(5):
        with store.sessions() as session:
            t0 = time.perf_counter()
            dashboard(session, config, {}, sample["at"])
            timings.append((time.perf_counter() - t0) * 1000)
    print(f"{'dashboard (all channels, counts + last hour)':40} {'':>5} {statistics.median(timings):>10.1f}")
    print(f"worst p95: {worst:.1f} ms ({'under' if worst < 300 else 'OVER'} the 300 ms of acceptance 4)")
    store.dispose()
    scratch.cleanup()
    return 0 if worst < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
