"""Crash safety: SIGKILL while a client streams, restart, nothing acknowledged is lost (issue 2, acceptance 5;
issue 8, acceptance 2: at least 10 kills, on SQLite and on PostgreSQL)."""

import socket
import threading
import time

import pytest
from sqlalchemy import create_engine, text

from peers import EngineProcess, HisListener, free_port, msa, read_frame, wait_port
from pg_peer import BACKENDS, database_url
from test_mllp_e2e import orm, relay_config

pytestmark = pytest.mark.slow

TOTAL = 500
SENDERS = 4
KILLS = 10


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


def journaled(url: str) -> dict[str, int]:
    """control id -> how many processed messages the journal holds for it."""
    database = create_engine(url)
    try:
        with database.connect() as connection:
            return dict(connection.execute(text("select control_id, count(*) from message where status='processed' "
                                                "group by control_id")).all())
    finally:
        database.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_during_a_stream_loses_nothing_and_processes_nothing_twice(tmp_path, request, backend):
    port, his_port = free_port(), free_port()
    his = HisListener(his_port).start()
    data_dir = tmp_path / "var"
    url = database_url(request, backend, data_dir)
    config = relay_config(tmp_path, port, his_port, attempts=1000)
    # a killed instance's destination lease (PostgreSQL) blocks its restarted self until it expires: keep it short
    config.write_text("engine: {lease_seconds: 2}\n" + config.read_text(encoding="utf-8"), encoding="utf-8")
    engine = EngineProcess(config, data_dir, [port], {"SWF_DATABASE_URL": url}).start()
    acknowledged: list[str] = []
    lock, stop = threading.Lock(), threading.Event()
    ids = [f"K{n:04d}" for n in range(TOTAL)]
    senders = [threading.Thread(target=stream, args=(port, ids[i::SENDERS], acknowledged, lock, stop))
               for i in range(SENDERS)]
    for thread in senders:
        thread.start()
    kills = 0
    try:
        while any(t.is_alive() for t in senders) and kills < KILLS:
            assert engine.process.poll() is None, f"the engine exited by itself: see {engine.log}"
            with lock:
                progress = len(acknowledged)
            if progress >= (kills + 1) * TOTAL // (KILLS + 2):
                engine.kill()
                kills += 1
                time.sleep(0.2)
                engine.start()
            time.sleep(0.01)
        for thread in senders:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in senders)
        assert kills >= KILLS, "the stream ended before the engine could be killed often enough"
        assert sorted(acknowledged) == ids
        assert journaled(url) == {i: 1 for i in ids}, "every acknowledged message is journaled exactly once"

        received = his.wait_for(TOTAL, timeout=60)
        deadline = time.monotonic() + 60
        while len({m.split(b"|")[9] for m in his.received}) < TOTAL and time.monotonic() < deadline:
            time.sleep(0.2)
        delivered = {m.split(b"\r")[0].split(b"|")[9].decode() for m in his.received}
        assert delivered == set(ids), "every acknowledged message is delivered"
        print(f"{backend}: kills={kills} deliveries={len(his.received)} "
              f"(resent after a kill: {len(his.received) - TOTAL})")
        del received
    finally:
        stop.set()
        engine.kill()
        his.stop()
