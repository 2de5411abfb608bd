"""HL7 through the Order Filler: what each ADT and order costs `swf-engine serve` on the shipped channels.yaml.

`hl7_ingest.py` measures the journal and a relay channel (no parsing beyond the header). Here every message runs
the order filler's work as a hospital's feed does: ADT^A08 updates the patient (name read into pinyin, open orders'
location), ORM^O01 NW schedules a new order (patient look-up, accession, station, worklist step). N senders on
kept MLLP connections, each waiting for its ACK; prints messages/s, ACK latency and the engine's CPU per message
(from /proc, user and system apart).

Usage: python bench/order_ingest.py [--messages 4000] [--connections 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from peers import free_port, mllp_exchange, read_frame, running_engine, sample_hl7  # noqa: E402

VT, FS, CR = b"\x0b", b"\x1c", b"\r"



def cpu_seconds(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def a08(sender: int, n: int) -> bytes:
    return sample_hl7("18_adt_a08").replace(b"HIS26112200018", f"A08S{sender}N{n}".encode())


def orm(sender: int, n: int) -> bytes:
    """02's order with numbers of its own: control id, placer and filler numbers, accession, Study Instance UID."""
    tag = f"{sender:02d}{n:05d}"
    out = sample_hl7("02_orm_o01")
    for old, new in ((b"HIS26112200002", f"ORM{tag}".encode()), (b"HO2611220001", f"HO{tag}".encode()),
                     (b"RF2611220001", f"RF{tag}".encode()), (b"A2611220001", f"A{tag}".encode()),
                     (b"RP2611220001", f"RP{tag}".encode()), (b"SPS2611220001", f"SPS{tag}".encode()),
                     (b"2.25.47985188803147648814405824755018894578", f"2.25.9{tag}".encode())):
        out = out.replace(old, new)
    return out


def run(port: int, pid: int, make, messages: int, connections: int) -> dict:
    latencies: list[float] = []
    failures: list[bytes] = []

    def sender(k: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mine = []
        for n in range(messages // connections):
            started = time.perf_counter()
            sock.sendall(VT + make(k, n) + FS + CR)
            answer = read_frame(sock)
            mine.append(time.perf_counter() - started)
            if b"MSA|AA" not in answer:
                failures.append(answer)
        sock.close()
        latencies.extend(mine)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(connections)]
    user0, sys0 = cpu_seconds(pid)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    user1, sys1 = cpu_seconds(pid)
    if failures:
        raise RuntimeError(f"{len(failures)} messages not AA, e.g. {failures[0][:300]!r}")
    latencies.sort()
    count = len(latencies)
    return dict(rate=count / elapsed, p50=statistics.median(latencies) * 1000,
                p99=latencies[int(count * 0.99)] * 1000, user=(user1 - user0) / count * 1e6,
                system=(sys1 - sys0) / count * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="order-ingest-") as name:
        ports = {key: free_port() for key in ("SWF_DICOM_PORT", "SWF_HL7_PORT", "SWF_HIS_PORT", "SWF_HTTP_PORT",
                                              "SWF_PACS_PORT")}
        env = {key: str(port) for key, port in ports.items()} | {"SWF_LOG_LEVEL": "WARNING"}
        port = ports["SWF_HL7_PORT"]
        with running_engine(REPO / "channels.yaml", Path(name) / "var", [port], env) as engine:
            for registration in ("01_adt_a04", "16_adt_a04"):  # the patients of 02's order and of the A08
                assert b"MSA|AA" in mllp_exchange(port, sample_hl7(registration))
            pid = engine.process.pid
            print(f"swf-engine serve, shipped channels.yaml, SQLite; {args.messages} messages per kind over "
                  f"{args.connections} connections; cpus={os.cpu_count()}")
            print(f"{'what':<44}{'msg/s':>7}{'p50 ms':>9}{'p99 ms':>9}{'user us':>9}{'sys us':>8}")
            for label, make in (("ADT^A08 (patient update)", a08), ("ORM^O01 NW (new order, worklist entry)", orm)):
                r = run(port, pid, make, args.messages, args.connections)
                print(f"{label:<44}{r['rate']:7.0f}{r['p50']:9.2f}{r['p99']:9.2f}{r['user']:9.0f}{r['system']:8.0f}")


if __name__ == "__main__":
    main()
