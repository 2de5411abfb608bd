"""Two `swf-engine serve` instances on one PostgreSQL share a stream of orders; one is killed mid-stream
(issue 8, acceptance 1): every worklist entry and outbound message exists once, nothing acknowledged is lost,
nothing stays queued, and the HIS destination's queue stays in order across the takeover."""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import create_engine, text

from peers import EngineProcess, HisListener, free_port, msa, read_frame

pytestmark = pytest.mark.slow

TOTAL = int(os.environ.get('SWF_TEST_TOTAL', 2000))
SENDERS = 6
PATIENTS = 40  # few enough that both instances often write the same patient at once
LEASE_SECONDS = 3


def config_file(tmp_path, his_port: int):
    path = tmp_path / "channels.yaml"
    path.write_text(textwrap.dedent(f"""\
        engine: {{lease_seconds: {LEASE_SECONDS}}}
        dicom:
          port: ${{SWF_DICOM_PORT}}
        worklist:
          stations: [{{modality: CT, ae_titles: [CT01]}}]
          accession: {{source: generator, prefix: A}}
          unknown_patient: register  # orders register their patients: instances race to create the same one
        channels:
          - name: orders
            source:
              type: mllp
              port: ${{SWF_HL7_PORT}}
            steps:
              - {{type: actor, actor: order_filler}}
          # a copy of each order for a downstream system: the outbound message
          - name: feed
            source:
              type: mllp
              port: ${{SWF_FEED_PORT}}
            destinations:
              - name: his
                type: mllp
                host: 127.0.0.1
                port: {his_port}
                ack_timeout_seconds: 5
                retry: {{attempts: 1000, initial_seconds: 0.2, multiplier: 2, max_seconds: 1}}
        """), encoding="utf-8")
    return path


def order(n: int) -> bytes:
    """ORM^O01 NW without an accession number: the engine generates it, so both instances draw from one series."""
    patient = n % PATIENTS
    return (f"MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080500||ORM^O01|C{n:05d}|P|2.3.1|||||UNICODE UTF-8\r"
            f"PID|1||P{patient:04d}^^^HOSP^MR||王^小{patient}||19800315|M\r"
            f"ORC|NW|PL{n:05d}^HIS\r"
            f"OBR|1|PL{n:05d}^HIS||CT0101^胸部CT^99HIS|||20261122090000|||||||||||||||||CT\r").encode()


class Instance:
    def __init__(self, tmp_path, name: str, config, url: str) -> None:
        self.orders_port, self.feed_port = free_port(), free_port()
        env = {"SWF_DATABASE_URL": url, "SWF_HL7_PORT": str(self.orders_port), "SWF_FEED_PORT": str(self.feed_port),
               "SWF_DICOM_PORT": str(free_port())}
        # each instance its own data directory: HL7 relays keep nothing there (image spools would need one shared)
        self.process = EngineProcess(config, tmp_path / name, [self.orders_port, self.feed_port], env)
        self.acked = 0


def stream(instances: list[Instance], numbers: list[int], acknowledged: list[int], lock, stop) -> None:
    """A sender behind a load balancer: alternates instances per order, fails over (and resends) when one dies.
    Each order goes to the worklist channel, then to the feed channel; each is resent until it gets AA."""
    socks: dict[tuple[int, int], socket.socket] = {}

    def exchange(instance: Instance, port: int, payload: bytes) -> bool:
        key = (id(instance), port)
        try:
            sock = socks.get(key) or socket.create_connection(("127.0.0.1", port), timeout=10)
            socks[key] = sock
            sock.sendall(b"\x0b" + payload + b"\x1c\r")
            return msa(read_frame(sock))[1] == "AA"
        except (OSError, ConnectionError):
            dead = socks.pop(key, None)
            if dead is not None:
                dead.close()
            return False

    for n in numbers:
        payload = order(n)
        choice = n % len(instances)
        for port_of in (lambda i: i.orders_port, lambda i: i.feed_port):
            while not stop.is_set():
                instance = instances[choice]
                if exchange(instance, port_of(instance), payload):
                    with lock:
                        instance.acked += 1
                    break
                choice = (choice + 1) % len(instances)
                time.sleep(0.05)
        with lock:
            acknowledged.append(n)
    for sock in socks.values():
        sock.close()


def test_two_instances_share_a_stream_and_survive_one_being_killed(tmp_path, postgres):
    url = postgres.create_database("two")
    his = HisListener().start()
    config = config_file(tmp_path, his.port)
    a, b = Instance(tmp_path, "a", config, url), Instance(tmp_path, "b", config, url)
    # started together on an empty database: the migration lock lets exactly one create the schema
    starters = [threading.Thread(target=i.process.start) for i in (a, b)]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join()
    assert all(i.process.process.poll() is None for i in (a, b)), "both instances started"
    acknowledged: list[int] = []
    lock, stop = threading.Lock(), threading.Event()
    senders = [threading.Thread(target=stream, args=([a, b], list(range(TOTAL))[i::SENDERS], acknowledged, lock, stop))
               for i in range(SENDERS)]
    started = time.monotonic()
    for thread in senders:
        thread.start()
    database = create_engine(url)
    try:
        while len(acknowledged) < TOTAL * 2 // 5 and any(t.is_alive() for t in senders):
            time.sleep(0.01)
        acked_before_kill = (a.acked, b.acked)
        with database.connect() as connection:
            holder = connection.execute(text("select holder from destination_lease")).scalar_one()
        # kill the instance sending to the HIS: its lease, a batch being committed and its sockets die with it
        victim, survivor = (a, b) if holder.split(":")[1] == str(a.process.process.pid) else (b, a)
        victim.process.kill()
        killed_at = len(acknowledged)
        for thread in senders:
            thread.join(timeout=300)
        assert not any(t.is_alive() for t in senders)
        stream_seconds = time.monotonic() - started
        assert min(acked_before_kill) > 100, f"both instances took orders before the kill: {acked_before_kill}"
        assert sorted(acknowledged) == list(range(TOTAL))

        with database.connect() as connection:
            steps = Counter(dict(connection.execute(text(
                "select o.placer_number, count(*) from scheduled_step s join imaging_order o on o.id = s.order_ref "
                "group by o.placer_number")).all()))
            accessions = connection.execute(text("select count(distinct accession), count(*) from imaging_order")).one()
            patients = connection.execute(text("select count(*) from patient")).scalar_one()
            messages = Counter(dict(connection.execute(text(
                "select channel || ':' || control_id, count(*) from message where status = 'processed' "
                "group by channel, control_id")).all()))
            deliveries = Counter(dict(connection.execute(text(
                "select m.control_id, count(*) from delivery d join message m on m.id = d.message_id "
                "group by m.control_id")).all()))
        assert steps == Counter({f"PL{n:05d}": 1 for n in range(TOTAL)}), "each worklist entry exists exactly once"
        assert tuple(accessions) == (TOTAL, TOTAL), "generated accessions are unique across instances"
        assert patients == PATIENTS, "concurrent creates of one patient end in one row"
        assert messages == Counter({f"{c}:C{n:05d}": 1 for n in range(TOTAL) for c in ("orders", "feed")})
        assert deliveries == Counter({f"C{n:05d}": 1 for n in range(TOTAL)}), "each outbound message exists once"

        # the survivor takes the HIS queue over once the killed holder's lease expires, and drains it
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with database.connect() as connection:
                pending = connection.execute(text(
                    "select count(*) from delivery where status <> 'sent'")).scalar_one()
            if pending == 0:
                break
            time.sleep(0.2)
        assert pending == 0, "nothing stays queued after an instance dies"
        drained_seconds = time.monotonic() - started
        with database.connect() as connection:
            order_of = dict(connection.execute(text(
                "select m.control_id, d.id from delivery d join message m on m.id = d.message_id")).all())
            holders = connection.execute(text("select holder from destination_lease")).scalars().all()
        received = [m.split(b"\r")[0].split(b"|")[9].decode() for m in his.received]
        assert set(received) == {f"C{n:05d}" for n in range(TOTAL)}, "every outbound message reached the HIS"
        first_seen = list(dict.fromkeys(received))
        assert [order_of[c] for c in first_seen] == sorted(order_of.values()), "the HIS queue stays FIFO"
        assert holders and all(h.split(":")[1] == str(survivor.process.process.pid) for h in holders if h)
        print(f"stream of {TOTAL} orders x 2 channels: {stream_seconds:.1f}s, drained at {drained_seconds:.1f}s; "
              f"acked by a/b before the kill: {acked_before_kill}, killed after {killed_at}; "
              f"HIS got {len(received)} ({len(received) - TOTAL} resent after the kill)")
    finally:
        stop.set()
        database.dispose()
        for instance in (a, b):
            instance.process.stop()
        his.stop()
