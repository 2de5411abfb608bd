"""Crash safety: SIGKILL while a client streams, restart, nothing acknowledged is lost (issue 2, acceptance 5)."""

import socket
import sqlite3
import threading
import time

import pytest

from peers import EngineProcess, HisListener, free_port, msa, read_frame, wait_port
from test_mllp_e2e import orm, relay_config

pytestmark = pytest.mark.slow

TOTAL = 500
SENDERS = 4


def stream(port, ids, acknowledged, lock, stop):
    """A HIS that resends the same message (same MSH-10) until it gets AA, as real senders do."""
    sock = None
    for control_id in ids:
        while not stop.is_set():
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"\x0b" + orm(control_id) + b"\x1c\r")
                if msa(read_frame(sock))[1] == "AA":
                    with lock:
                        acknowledged.append(control_id)
                    break
            except (OSError, ConnectionError):
                if sock is not None:
                    sock.close()
                sock = None
                time.sleep(0.05)
    if sock is not None:
        sock.close()


def test_sigkill_during_a_stream_loses_nothing_and_processes_nothing_twice(tmp_path):
    port, his_port = free_port(), free_port()
    his = HisListener(his_port).start()
    data_dir = tmp_path / "var"
    engine = EngineProcess(relay_config(tmp_path, port, his_port, attempts=1000), data_dir, [port]).start()
    acknowledged: list[str] = []
    lock, stop = threading.Lock(), threading.Event()
    ids = [f"K{n:04d}" for n in range(TOTAL)]
    senders = [threading.Thread(target=stream, args=(port, ids[i::SENDERS], acknowledged, lock, stop))
               for i in range(SENDERS)]
    for thread in senders:
        thread.start()
    kills = 0
    try:
        while any(t.is_alive() for t in senders) and kills < 6:
            with lock:
                progress = len(acknowledged)
            if progress >= (kills + 1) * TOTAL // 8:
                engine.kill()
                kills += 1
                time.sleep(0.2)
                engine.start()
            time.sleep(0.01)
        for thread in senders:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in senders)
        assert kills >= 3, "the stream ended before the engine could be killed several times"
        assert sorted(acknowledged) == ids

        with sqlite3.connect(data_dir / "swf-engine.db") as db:
            rows = db.execute("select control_id, count(*) from message where status='processed' "
                              "group by control_id").fetchall()
        assert dict(rows) == {i: 1 for i in ids}, "every acknowledged message is journaled exactly once"

        received = his.wait_for(TOTAL, timeout=60)
        deadline = time.monotonic() + 60
        while len({m.split(b"|")[9] for m in his.received}) < TOTAL and time.monotonic() < deadline:
            time.sleep(0.2)
        delivered = {m.split(b"\r")[0].split(b"|")[9].decode() for m in his.received}
        assert delivered == set(ids), "every acknowledged message is delivered"
        print(f"kills={kills} deliveries={len(his.received)} (resent after a kill: {len(his.received) - TOTAL})")
        del received
    finally:
        stop.set()
        engine.kill()
        his.stop()
