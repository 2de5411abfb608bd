"""HL7 ingest benchmark: messages/s and ACK latency into a channel with one MLLP destination.

Prints, from one run on this machine:
  - the engine: N concurrent MLLP senders, throughput and p50/p99 ACK latency;
  - paced load (default 200 msg/s): p50/p99 ACK latency;
  - floor: the database's rate of durable single-row commits (what "committed before ACK" costs unbatched);
  - ceiling: a bare asyncio MLLP server that ACKs without storing or parsing.
Usage: python bench/hl7_ingest.py [--messages 20000] [--connections 8] [--rate 200] [--his-down]
(--his-down: the same with the destination refusing connections, as during a HIS outage)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from peers import free_port, wait_port  # noqa: E402

MESSAGE = ("MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080500||ORM^O01|{cid}|P|2.3.1||||||UNICODE UTF-8\r"
           "PID|1||300101^^^HOSP^MR||王小东||19800315|M\r"
           "PV1|1|O|放射科门诊^^^HOSP\r"
           "ORC|NW|HO{cid}^HIS|RF{cid}^RIS||||^^^20261122093000^^R\r"
           "OBR|1|HO{cid}^HIS|RF{cid}^RIS|CT0101^胸部CT平扫^99HIS||||||||||||||A{cid}|RP1|SPS1||||CT\r")

# A bare MLLP server: ACKs every block without storing or parsing. It is the ceiling reference, and it
# plays the HIS destination too, in its own process so that the receiving side does not share the
# load generator's GIL. With a count file it writes how many blocks it received, every 0.2 s.
BARE_SERVER = textwrap.dedent("""
    import asyncio, sys
    ACK = b"\\x0bMSH|^~\\\\&|SWF|RAD|HIS|HOSP|2026||ACK|1|P|2.3.1\\rMSA|AA|1\\r\\x1c\\r"
    received = 0
    async def serve(reader, writer):
        global received
        buffer = b""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            buffer += data
            while b"\\x1c" in buffer:
                _, buffer = buffer.split(b"\\x1c", 1)
                received += 1
                writer.write(ACK)
            await writer.drain()
        writer.close()
    async def report(path):
        while True:
            with open(path, "w") as out:
                out.write(str(received))
            await asyncio.sleep(0.2)
    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
        if len(sys.argv) > 2:
            asyncio.ensure_future(report(sys.argv[2]))
        async with server:
            await server.serve_forever()
    asyncio.run(main())
""")



async def sender(port: int, ids: list[str], latencies: list[float], rate_interval: float | None = None,
                 offset: float = 0.0) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Paced senders start staggered, so together they make an even stream rather than bursts.
    next_at = time.perf_counter() + offset
    for cid in ids:
        if rate_interval:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at += rate_interval
        payload = b"\x0b" + MESSAGE.format(cid=cid).encode() + b"\x1c\r"
        started = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        answer = await reader.readuntil(b"\x1c\r")
        latencies.append(time.perf_counter() - started)
        if b"MSA|AA" not in answer:
            raise RuntimeError(f"not AA: {answer[:200]!r}")
    writer.close()


async def load(port: int, total: int, connections: int, prefix: str, rate: float | None = None) -> tuple[float, list[float]]:
    ids = [f"{prefix}{n:07d}" for n in range(total)]
    latencies: list[float] = []
    interval = connections / rate if rate else None
    started = time.perf_counter()
    await asyncio.gather(*(sender(port, ids[i::connections], latencies, interval, i * (interval or 0) / connections)
                           for i in range(connections)))
    return time.perf_counter() - started, latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), robust to other load on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds(pid: int) -> float:
    """CPU time so far of a process's children: the engine's delivery process (its sending, off the engine's GIL)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def durable_commit_rate(directory: Path, seconds: float = 3.0) -> float:
    db = sqlite3.connect(directory / "floor.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("create table t (id integer primary key, raw blob)")
    payload = MESSAGE.format(cid="X").encode()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        db.execute("begin")
        db.execute("insert into t (raw) values (?)", (payload,))
        db.execute("commit")
        count += 1
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument("--commit-delay-ms", type=float, default=None,
                        help="engine.commit_delay_ms for this run (default: the engine's default)")
    parser.add_argument("--profile", metavar="FILE", help="run the engine under py-spy, writing collapsed stacks here")
    parser.add_argument("--his-down", action="store_true",
                        help="the destination refuses connections: deliveries queue behind a head in backoff")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="swf-bench-"))
    port, his_port, bare_port = free_port(), free_port(), free_port()
    # --his-down: the destination is a port nothing listens on (the HIS listener below is then never reached)
    destination_port = free_port() if args.his_down else his_port
    config = work / "channels.yaml"
    engine_section = f"engine: {{commit_delay_ms: {args.commit_delay_ms}}}\n" if args.commit_delay_ms is not None else ""
    config.write_text(engine_section + textwrap.dedent(f"""\
        channels:
          - name: bench
            source: {{type: mllp, port: {port}}}
            destinations:
              - {{name: his, type: mllp, host: 127.0.0.1, port: {destination_port}}}
        """))
    his_count = work / "his-received"
    his = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(his_port), str(his_count)])
    env = {**os.environ, "SWF_DATA_DIR": str(work / "var"), "SWF_LOG_LEVEL": "INFO"}
    command = [sys.executable, "-m", "engine.cli", "serve", "--config", str(config)]
    if args.profile:
        command = ["py-spy", "record", "--rate", "400", "--gil", "--threads", "--format", "raw", "--output", args.profile, "--", *command]
    engine = subprocess.Popen(command, cwd=REPO, env=env, stderr=open(work / "engine.log", "wb"))
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port)])

    def delivered() -> int:
        try:
            return int(his_count.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def drain(expected: int) -> float:
        """Wait until the destination has everything; returns when it did (perf_counter)."""
        if args.his_down:
            return time.perf_counter()
        deadline = time.monotonic() + 180
        while delivered() < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return time.perf_counter()

    try:
        wait_port(port, process=engine)
        wait_port(his_port)
        wait_port(bare_port)
        asyncio.run(load(port, 500, args.connections, "W"))  # warm-up
        drain(500)
        started, cpu_before = time.perf_counter(), cpu_seconds(engine.pid)
        children_before = children_cpu_seconds(engine.pid)
        elapsed, latencies = asyncio.run(load(port, args.messages, args.connections, "B"))
        engine_rate = args.messages / elapsed
        delivered_rate = args.messages / (drain(500 + args.messages) - started)
        cpu_per_message = (cpu_seconds(engine.pid) - cpu_before) / args.messages
        children_per_message = (children_cpu_seconds(engine.pid) - children_before) / args.messages
        # Paced latency is measured on an idle engine: the burst's deliveries are done.
        paced_total = int(args.rate * args.paced_seconds)
        _, paced = asyncio.run(load(port, paced_total, args.connections, "P", rate=args.rate))
        bare_elapsed, bare_lat = asyncio.run(load(bare_port, args.messages, args.connections, "R"))
        bare_rate = args.messages / bare_elapsed
        floor = durable_commit_rate(work)
        expected = args.messages + 500 + paced_total
        drain(expected)
        received = delivered()
    finally:
        engine.send_signal(signal.SIGINT) if args.profile else engine.terminate()
        bare.terminate()
        engine.wait(timeout=20)
        his.terminate()

    print(f"hl7_ingest: {args.messages} ORM^O01 over {args.connections} connections, SQLite WAL synchronous=FULL, "
          f"{os.cpu_count()} cores")
    print(f"{'what':44} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    label = "engine (journal before ACK, " + ("destination down)" if args.his_down else "1 destination)")
    print(f"{label:44} {engine_rate:9.0f} {pct(latencies, .5):8.2f} {pct(latencies, .99):8.2f}")
    if not args.his_down:
        print(f"{'engine, until all delivered to the destination':44} {delivered_rate:9.0f}")
    print(f"{f'engine paced at {args.rate:.0f} msg/s':44} {len(paced) / args.paced_seconds:9.0f} {pct(paced, .5):8.2f} {pct(paced, .99):8.2f}")
    print(f"{'floor: durable single-row commits (SQLite)':44} {floor:9.0f}")
    print(f"{'ceiling: bare MLLP server, ACK only':44} {bare_rate:9.0f} {pct(bare_lat, .5):8.2f} {pct(bare_lat, .99):8.2f}")
    if not args.profile:
        done = "received, its delivery waiting" if args.his_down else "received and delivered"
        print(f"engine CPU per message, {done}: {cpu_per_message * 1e6:.0f} us "
              f"(+ {children_per_message * 1e6:.0f} us in its delivery process)")
    print(f"ratio engine / single-row commit rate: {engine_rate / floor:.2f}  (target >= 0.4)")
    print(f"ratio engine / bare MLLP ceiling:      {engine_rate / bare_rate:.2f}")
    print(f"delivered to the destination: {received} of {expected}" + (" (--his-down: none expected)" if args.his_down else ""))
    for line in (work / "engine.log").read_text(errors="replace").splitlines():
        if "journal writer stopped" in line:
            print(f"engine: {line}")


if __name__ == "__main__":
    main()
