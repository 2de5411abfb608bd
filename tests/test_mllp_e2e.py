"""The MLLP listener and journal end to end, with `swf-engine serve` and `swf-engine send` (issue 2)."""

import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from peers import HL7_DIR, REPO, HisListener, free_port, mllp_exchange, msa, read_frame, running_engine

pytestmark = pytest.mark.slow


def relay_config(tmp_path, port, his_port, *, attempts=5, extra_steps=""):
    path = tmp_path / "channels.yaml"
    # the DICOM listener starts with every engine: never on the default 11112 beside other test engines
    path.write_text(textwrap.dedent(f"""\
        dicom: {{port: {free_port()}}}
        channels:
          - name: relay
            source: {{type: mllp, port: {port}, fallback_charset: gb18030, max_message_bytes: 65536}}
            steps:
              - type: filter
                message_types: ["ADT^*", "ORM^O01", "OMG^O19", "ORU^R01"]
                on_mismatch: reject
        {textwrap.indent(extra_steps, '      ')}
            destinations:
              - name: his
                type: mllp
                host: 127.0.0.1
                port: {his_port}
                ack_timeout_seconds: 2
                retry: {{attempts: {attempts}, initial_seconds: 0.2, multiplier: 2, max_seconds: 1}}
        """), encoding="utf-8")
    return path


def journal(data_dir, sql, *args):
    with sqlite3.connect(data_dir / "swf-engine.db") as db:
        return db.execute(sql, args).fetchall()


def orm(control_id, name="王小东", charset="UNICODE UTF-8", codec="utf-8", accession="A1"):
    text = (f"MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080500||ORM^O01|{control_id}|P|2.3.1|||||{charset and '|' + charset or ''}\r"
            f"PID|1||300101^^^HOSP^MR||{name}||19800315|M\r"
            f"ORC|NW|P{control_id}^HIS|F{control_id}^RIS\r"
            f"OBR|1|P{control_id}^HIS|F{control_id}^RIS|CT0101^胸部CT^99HIS||||||||||||||{accession}||||||CT\r")
    return text.encode(codec)


@pytest.fixture
def relay(tmp_path):
    port, his_port = free_port(), free_port()
    his = HisListener(his_port).start()
    config = relay_config(tmp_path, port, his_port)
    with running_engine(config, tmp_path / "var", [port]) as engine:
        yield port, his, tmp_path / "var", engine
    his.stop()


def test_send_command_gets_aa_and_gb18030_is_stored_decoded(relay, tmp_path):
    port, his, data_dir, _ = relay
    files = [HL7_DIR / "02_orm_o01_nw_utf8_v231.hl7", HL7_DIR / "04_orm_o01_nw_gb18030_v231.hl7"]
    result = subprocess.run([sys.executable, "-m", "engine.cli", "send", f"127.0.0.1:{port}", *map(str, files)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "MSA|AA|HIS26112200002" in result.stdout
    assert "MSA|AA|HIS26112200004" in result.stdout
    rows = journal(data_dir, "select control_id, charset, text, status from message order by id")
    assert [(r[0], r[1], r[3]) for r in rows] == [("HIS26112200002", "utf-8", "processed"),
                                                  ("HIS26112200004", "gb18030", "processed")]
    assert "单雄信" in rows[1][2] and "磁共振" not in rows[0][2]
    # the relayed GB18030 message reaches the destination byte for byte
    received = his.wait_for(2)
    assert received[1] == (HL7_DIR / "04_orm_o01_nw_gb18030_v231.hl7").read_bytes().strip(b"\r\n")


def test_ack_goes_back_in_the_senders_charset(relay):
    port, *_ = relay
    answer = mllp_exchange(port, orm("GB1", name="區億東", charset="GB 18030-2000", codec="gb18030"))
    assert msa(answer, "gb18030")[1:3] == ["AA", "GB1"]
    assert b"GB 18030-2000" in answer


def test_repeated_control_id_is_acknowledged_again_but_processed_once(relay):
    port, his, data_dir, _ = relay
    first = msa(mllp_exchange(port, orm("DUP1")))
    again = msa(mllp_exchange(port, orm("DUP1")))
    assert first[1:3] == again[1:3] == ["AA", "DUP1"]
    assert journal(data_dir, "select count(*) from message where control_id='DUP1'") == [(1,)]
    his.wait_for(1)
    time.sleep(0.5)
    assert len(his.received) == 1


@pytest.mark.parametrize("payload,code,err_code", [
    (b"PID|1||123\r", "AR", "100"),  # no MSH
    (b"MSH|^^\\&|HIS|HOSP|SWF|RAD|2026||ADT^A04|BAD1|P|2.3.1\r", "AR", "100"),  # bad encoding characters
    (b"MSH|^~\\&|HIS|HOSP|SWF|RAD|2026||ZZZ^Z99|UNK1|P|2.3.1\r", "AR", "200"),  # unknown message type
    ("MSH|^~\\&|HIS|HOSP|SWF|RAD|2026||ADT^A04|CS1|P|2.3.1||||||UNICODE UTF-8\rPID|1||1||王".encode("gb18030"),
     "AE", "102"),  # bytes not in the declared charset
])
def test_malformed_input_gets_an_error_ack_with_err(relay, payload, code, err_code):
    port, _, data_dir, _ = relay
    answer = mllp_exchange(port, payload)
    fields = msa(answer)
    assert fields[1] == code
    err = [s for s in answer.decode("latin-1").split("\r") if s.startswith("ERR")]
    assert err and err_code in err[0]
    # kept in the journal as an error, for the analyst to see
    assert journal(data_dir, "select status, ack_code from message") == [("error", code)]


def test_truncated_frame_garbage_and_oversize_leave_the_listener_serving(relay):
    port, *_ = relay
    # a block cut short by a new start block: answered AR, then the whole one AA
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x0bMSH|^~\\&|HIS|HOSP|SWF|RAD|2026||ADT^A04|TR1|P|2.3.1\rPID|1|")
        sock.sendall(b"\x0b" + orm("TR2") + b"\x1c\r")
        assert msa(read_frame(sock))[1:3] == ["AR", "TR1"]
        assert msa(read_frame(sock))[1:3] == ["AA", "TR2"]
    # a block larger than the limit: AR, and the connection still works
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x0bMSH|" + b"x" * 70000 + b"\x1c\r")
        assert msa(read_frame(sock))[1] == "AR"
        sock.sendall(b"\x0b" + orm("BIG2") + b"\x1c\r")
        assert msa(read_frame(sock))[1:3] == ["AA", "BIG2"]
    # garbage bytes and a connection dropped mid-frame, while another client keeps being served
    stop = threading.Event()
    results = []

    def steady_client():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            n = 0
            while not stop.is_set():
                n += 1
                sock.sendall(b"\x0b" + orm(f"ST{n}") + b"\x1c\r")
                results.append(msa(read_frame(sock))[1])

    thread = threading.Thread(target=steady_client)
    thread.start()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(bytes(range(256)) * 4)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"\x0bMSH|^~\\&|HIS|HOSP|SWF|RAD|2026||ADT^A04|HALF")
    time.sleep(0.5)
    stop.set()
    thread.join(timeout=10)
    assert results and set(results) == {"AA"}
    assert msa(mllp_exchange(port, orm("AFTER")))[1:3] == ["AA", "AFTER"]


def test_destination_down_then_up_delivers_everything_in_order(tmp_path):
    port, his_port = free_port(), free_port()
    config = relay_config(tmp_path, port, his_port, attempts=100)
    data_dir = tmp_path / "var"
    with running_engine(config, data_dir, [port]):
        for n in range(20):
            assert msa(mllp_exchange(port, orm(f"Q{n:02d}")))[1] == "AA"
        deadline = time.monotonic() + 20  # retried at 0.2 s, then 0.4 s: a loaded machine may take longer
        while (waiting := journal(data_dir, "select status, attempts, last_error from delivery order by id"))[0][1] < 2:
            assert time.monotonic() < deadline, waiting[0]
            time.sleep(0.1)
        assert len(waiting) == 20
        assert waiting[0][0] == "error" and waiting[0][1] >= 2 and "connection" in waiting[0][2]
        assert {row[0] for row in waiting[1:]} == {"queued"}  # held behind the head, in order
        his = HisListener(his_port).start()
        try:
            received = his.wait_for(20, timeout=30)
        finally:
            his.stop()
        ids = [m.split(b"\r")[0].split(b"|")[9].decode() for m in received]
        assert ids == [f"Q{n:02d}" for n in range(20)]
        # the HIS has them; each is recorded sent once its ACK is back in the engine
        deadline = time.monotonic() + 20
        while (statuses := journal(data_dir, "select distinct status from delivery")) != [("sent",)]:
            assert time.monotonic() < deadline, statuses
            time.sleep(0.1)


def test_dead_delivery_can_be_reprocessed(tmp_path):
    port, his_port = free_port(), free_port()
    config = relay_config(tmp_path, port, his_port, attempts=2)
    data_dir = tmp_path / "var"
    env = {"SWF_DATA_DIR": str(data_dir)}
    with running_engine(config, data_dir, [port]):
        assert msa(mllp_exchange(port, orm("DEAD1")))[1] == "AA"
        deadline = time.monotonic() + 15
        while journal(data_dir, "select status from delivery") != [("dead",)]:
            assert time.monotonic() < deadline, journal(data_dir, "select status, attempts from delivery")
            time.sleep(0.2)
        attempts = journal(data_dir, "select count(*) from delivery_attempt")
        assert attempts == [(2,)]
        his = HisListener(his_port).start()
        try:
            import os
            result = subprocess.run([sys.executable, "-m", "engine.cli", "reprocess", "--all-dead"],
                                    capture_output=True, text=True, cwd=REPO, env={**os.environ, **env})
            assert result.returncode == 0 and "requeued 1" in result.stdout, result.stderr
            received = his.wait_for(1, timeout=15)
        finally:
            his.stop()
        assert b"DEAD1" in received[0]


def test_negative_ack_is_retried_by_policy(tmp_path):
    port, his_port = free_port(), free_port()
    his = HisListener(his_port, answer="AE").start()
    config = relay_config(tmp_path, port, his_port, attempts=3)
    data_dir = tmp_path / "var"
    try:
        with running_engine(config, data_dir, [port]):
            assert msa(mllp_exchange(port, orm("NEG1")))[1] == "AA"
            his.wait_for(3, timeout=15)
            time.sleep(0.5)
            rows = journal(data_dir, "select status, attempts, response from delivery")
            assert rows[0][0] == "dead" and rows[0][1] == 3 and "MSA|AE" in rows[0][2]
    finally:
        his.stop()
