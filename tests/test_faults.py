"""Issue 8, fault behaviour: storage that fails, peers that stall or never answer, clocks that jump.

Never acknowledge what was not stored: with the database locked past its busy timeout, or the disk full, the
engine answers AR (HL7 table 0008: the sender keeps the message and resends) and AA again once it can store.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
import textwrap
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from engine.channels.dispatcher import Attempt, DestinationDispatcher, due_in
from engine.channels.mllp import MllpClient
from engine.clock import FixedClock
from engine.config import MllpDestination
from peers import HisListener, free_port, msa, mllp_exchange, read_frame, running_engine, worker_processes

ORM = ("MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080500||ORM^O01|{cid}|P|2.3.1\r"
       "PID|1||300101^^^HOSP^MR||WANG^XIAODONG||19800315|M\r"
       "ORC|NW|P1^HIS|F1^RIS\rOBR|1|P1^HIS|F1^RIS|CT0101^CT^99HIS||||||||||||||A1||||||CT\r"
       "NTE|1||{note}\r")


def orm(cid: str, note_bytes: int = 0) -> bytes:
    return ORM.format(cid=cid, note="x" * note_bytes).encode()


def relay_config(tmp_path: Path, port: int, his_port: int, *, ack_timeout: float = 2.0) -> Path:
    path = tmp_path / "channels.yaml"
    path.write_text(textwrap.dedent(f"""\
        channels:
          - name: relay
            source: {{type: mllp, port: {port}}}
            destinations:
              - name: his
                type: mllp
                host: 127.0.0.1
                port: {his_port}
                ack_timeout_seconds: {ack_timeout}
                retry: {{attempts: 100, initial_seconds: 0.2, multiplier: 2, max_seconds: 1}}
        """), encoding="utf-8")
    return path


def stored(db: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(db, timeout=30) as connection:
        return connection.execute(sql, args).fetchall()


# --- storage that fails -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_database_locked_by_another_process_answers_ar_and_recovers(tmp_path):
    """Another process holds SQLite's exclusive lock: the journal cannot commit (at once, or after the busy
    timeout), so no AA; the listener and the dispatcher both outlive it."""
    port, his_port = free_port(), free_port()
    data = tmp_path / "var"
    his = HisListener(his_port).start()
    try:
        with running_engine(relay_config(tmp_path, port, his_port), data, [port]):
            assert msa(mllp_exchange(port, orm("LK1")))[1] == "AA"
            locker = sqlite3.connect(data / "swf-engine.db", isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                answer = msa(mllp_exchange(port, orm("LK2"), timeout=60))
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            assert answer[1:3] == ["AR", "LK2"]
            assert msa(mllp_exchange(port, orm("LK2")))[1:3] == ["AA", "LK2"]  # the sender's resend
            assert stored(data / "swf-engine.db", "select control_id from message order by id") == [("LK1",), ("LK2",)]
            received = his.wait_for(2, timeout=20)
            assert [m.split(b"|")[9] for m in received][-1] == b"LK2"
        assert "message not journaled" in (data / "engine.log").read_text() or \
            "journal commit failed" in (data / "engine.log").read_text()
    finally:
        his.stop()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 24 MiB tmpfs for the data directory (root only: skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(path: Path) -> None:
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        # the last partial blocks too, so that not even a page is left
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


@pytest.mark.slow
def test_disk_full_answers_ar_never_aa_and_recovers_when_space_returns(tmp_path, tiny_disk):
    port, his_port = free_port(), free_port()
    his = HisListener(his_port).start()
    db = tiny_disk / "swf-engine.db"
    try:
        with running_engine(relay_config(tmp_path, port, his_port), tmp_path / "run", [port],
                            env={"SWF_DATA_DIR": str(tiny_disk)}):
            assert msa(mllp_exchange(port, orm("DF0")))[1] == "AA"
            fill(tiny_disk / "filler")
            acknowledged, refused = ["DF0"], None
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                for n in range(1, 400):
                    code = msa(mllp_exchange(port, orm(f"DF{n}", 8000), sock=sock, timeout=60))[1]
                    if code == "AA":
                        acknowledged.append(f"DF{n}")  # room was left in the WAL: stored, so AA is right
                        continue
                    refused = (f"DF{n}", code)
                    break
            assert refused is not None and refused[1] in ("AR", "AE"), "the full disk never showed"
            (tiny_disk / "filler").unlink()
            # space is back: the refused message, resent, is acknowledged (the listener never stopped)
            deadline = time.monotonic() + 20
            while msa(mllp_exchange(port, orm(refused[0], 8000), timeout=60))[1] != "AA":
                assert time.monotonic() < deadline, "no AA after the disk had room again"
                time.sleep(0.5)
            his.wait_for(len(acknowledged) + 1, timeout=30)
        rows = {r[0] for r in stored(db, "select control_id from message")}
        assert set(acknowledged) | {refused[0]} <= rows  # every AA was on disk
    finally:
        his.stop()


# --- peers that stall ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_peer_stalled_mid_frame_does_not_delay_the_others(tmp_path):
    port, his_port = free_port(), free_port()
    his = HisListener(his_port).start()
    try:
        with running_engine(relay_config(tmp_path, port, his_port), tmp_path / "var", [port]):
            staller = socket.create_connection(("127.0.0.1", port), timeout=30)
            staller.sendall(b"\x0b" + orm("HALF")[:40])  # half a frame, then nothing
            silent = socket.create_connection(("127.0.0.1", port), timeout=30)  # connects, never sends
            latencies: list[float] = []
            errors: list[BaseException] = []

            def client(k: int) -> None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                        for n in range(20):
                            started = time.monotonic()
                            sock.sendall(b"\x0b" + orm(f"C{k}-{n}") + b"\x1c\r")
                            assert msa(read_frame(sock))[1] == "AA"
                            latencies.append(time.monotonic() - started)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert not errors and len(latencies) == 60
            assert max(latencies) < 2.0, max(latencies)
            # the stalled sender finishing its frame later is served as well
            staller.sendall(orm("HALF")[40:] + b"\x1c\r")
            assert msa(read_frame(staller))[1:3] == ["AA", "HALF"]
            staller.close()
            silent.close()
    finally:
        his.stop()


@pytest.mark.slow
def test_a_his_that_accepts_but_never_acks_times_out_and_is_retried(tmp_path):
    port, his_port = free_port(), free_port()
    his = HisListener(his_port, answer=None).start()  # reads every message, answers none
    data = tmp_path / "var"
    try:
        with running_engine(relay_config(tmp_path, port, his_port, ack_timeout=0.5), data, [port]):
            assert msa(mllp_exchange(port, orm("MUTE1")))[1] == "AA"
            his.wait_for(2, timeout=20)  # sent, no ACK in time, sent again
            deadline = time.monotonic() + 20
            while True:
                row = stored(data / "swf-engine.db", "select status, attempts, last_error from delivery")[0]
                if row[1] >= 2:
                    break
                assert time.monotonic() < deadline, row
                time.sleep(0.2)
            assert row[0] == "error" and "no ACK within the timeout" in row[2]
            his.answer = "AA"  # the HIS recovers
            deadline = time.monotonic() + 20
            while stored(data / "swf-engine.db", "select status from delivery") != [("sent",)]:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert all(b"|MUTE1|" in m for m in his.received)  # the same message each time, nothing else
    finally:
        his.stop()


@pytest.mark.slow
def test_a_killed_delivery_process_is_replaced_and_every_message_still_arrives(tmp_path):
    """The connection to the HIS lives in a delivery process of its own: killed while messages stream in, it is
    replaced, the senders never notice, and every acknowledged message reaches the HIS in order."""
    port, his_port = free_port(), free_port()
    his = HisListener(his_port).start()
    try:
        with running_engine(relay_config(tmp_path, port, his_port), tmp_path / "var", [port]) as engine:
            deadline = time.monotonic() + 30
            while not (first := worker_processes(engine.process.pid, "deliver")) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(first) == 1, first
            sent = [f"KD{n:03d}" for n in range(80)]
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                for n, cid in enumerate(sent):
                    if n == 30:
                        subprocess.run(["kill", "-9", str(first[0])], check=True)
                    assert msa(mllp_exchange(port, orm(cid), sock=sock))[1:3] == ["AA", cid]
            def received() -> list[str]:
                return [m.split(b"|")[9].decode() for m in his.wait_for(0)]

            while set(sent) - set(received()) and time.monotonic() < deadline + 60:
                time.sleep(0.05)
            # a message the killed process had sent but not yet reported may come twice; none is missing,
            # and the order of first arrivals is the order sent
            assert list(dict.fromkeys(received())) == sent
            while (time.monotonic() < deadline + 30 and
                   stored(tmp_path / "var" / "swf-engine.db", "select count(*) from delivery where status != 'sent'")[0][0]):
                time.sleep(0.1)
            assert stored(tmp_path / "var" / "swf-engine.db", "select status, count(*) from delivery group by status") \
                == [("sent", 80)]
            replaced = worker_processes(engine.process.pid, "deliver")
            assert len(replaced) == 1 and replaced != first
    finally:
        his.stop()


def test_mllp_client_gives_up_on_a_receiver_that_stops_reading():
    """A receiver that accepts and never reads: the write itself stalls once the buffers fill; the answer
    timeout covers it, so the dispatcher is not held forever."""

    async def scenario() -> float:
        accepted: list[asyncio.StreamWriter] = []

        async def never_read(reader, writer):
            accepted.append(writer)
            await asyncio.sleep(30)

        server = await asyncio.start_server(never_read, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = MllpClient("127.0.0.1", port, connect_timeout=2, answer_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.send(b"MSH|" + b"x" * (32 * 1024 * 1024))
        elapsed = time.monotonic() - started
        server.close()
        for writer in accepted:
            writer.close()
        return elapsed

    assert asyncio.run(scenario()) < 5


# --- clocks that jump ---------------------------------------------------------------------------------------

T = datetime(2026, 11, 22, 8, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class SteppedClock(FixedClock):
    """Wall time as given, and a monotonic clock the test moves by hand."""

    mono: float = 1000.0

    def monotonic(self) -> float:
        return self.mono


def dispatcher(clock) -> DestinationDispatcher:
    destination = MllpDestination(type="mllp", name="his", host="127.0.0.1", port=9,
                                  retry={"attempts": 10, "initial_seconds": 2, "multiplier": 2, "max_seconds": 30})
    return DestinationDispatcher(None, None, clock, "relay", destination, sender=object())


def test_due_in_prefers_the_monotonic_deadline_and_caps_wall_clock_waits():
    assert due_in(T + timedelta(hours=1), T, retry_at=1005.0, monotonic=1000.0, max_wait=30) == 5.0
    assert due_in(T + timedelta(hours=1), T, retry_at=999.0, monotonic=1000.0, max_wait=30) == 0.0
    assert due_in(T + timedelta(seconds=3), T, retry_at=None, monotonic=0, max_wait=30) == 3.0
    assert due_in(T + timedelta(hours=2), T, retry_at=None, monotonic=0, max_wait=30) == 30.0
    assert due_in(T - timedelta(seconds=1), T, retry_at=None, monotonic=0, max_wait=30) == 0.0
    assert due_in(T.replace(tzinfo=None), T, retry_at=None, monotonic=0, max_wait=30) == 0.0  # naive = UTC


def test_a_wall_clock_jumping_back_does_not_stall_a_scheduled_retry():
    d = dispatcher(SteppedClock(T, mono=1000.0))
    d._failure(7, 1, Attempt(False, error="connection refused"))
    next_at, _ = d._retry_at[7]
    assert next_at == T + timedelta(seconds=2)
    assert d._wait(7, next_at) == 2.0
    # NTP steps the wall clock back an hour; one monotonic second later the retry is one second away, not 3601
    d.clock = SteppedClock(T - timedelta(hours=1), mono=1001.0)
    assert d._wait(7, next_at) == 1.0
    d.clock = SteppedClock(T - timedelta(hours=1), mono=1002.0)
    assert d._wait(7, next_at) == 0.0
    # a reprocess rewrote the row (next_attempt_at = its now): the row's own time counts again
    assert d._wait(7, T - timedelta(hours=1)) == 0.0
    # a restarted engine has no monotonic record: the wall clock, but never longer than the longest backoff
    assert dispatcher(SteppedClock(T - timedelta(hours=1)))._wait(7, next_at) == 30.0
    # and the wall clock jumping forward makes it due at once, as it would be anyway
    assert dispatcher(SteppedClock(T + timedelta(hours=1)))._wait(7, next_at) == 0.0
