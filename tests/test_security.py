"""Issue 8, acceptance 3: MLLP and DICOM over (mutual) TLS with real peers; refusals are refused and logged.

One `swf-engine serve` for the module: an MLLP listener that wants client certificates and relays to a HIS that
wants the engine's, and the DICOM listener with a plain port and a TLS port, limited to listed calling AE
titles, 127.0.0.1, four associations and three per calling AE title. DCMTK echoscu/findscu are the modality.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from engine.config import load_config
from engine.errors import ConfigError
from peers import HisListener, dcmtk_tool, findscu, free_port, msa, read_frame, running_engine
from tls_certs import Pki, make_pki

pytestmark = pytest.mark.slow

ECHOSCU = dcmtk_tool("echoscu")
AET = "SWF_ENGINE"
ORM = (b"MSH|^~\\&|HIS|HOSP|SWF|RAD|20261122080500||ORM^O01|{cid}|P|2.3.1\r"
       b"PID|1||300101^^^HOSP^MR||WANG^XIAODONG||19800315|M\r"
       b"ORC|NW|P1^HIS|F1^RIS\rOBR|1|P1^HIS|F1^RIS|CT0101^CT^99HIS||||||||||||||A1||||||CT\r")


def orm(cid: str) -> bytes:
    return ORM.replace(b"{cid}", cid.encode())


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pki: Pki = make_pki(tmp / "pki")
        self.mllp, self.his_port = free_port(), free_port()
        self.dicom, self.dicom_tls = free_port(), free_port()
        self.log: Path = tmp / "var" / "engine.log"
        (tmp / "key-password").write_text(self.pki.password + "\n")

    def config(self) -> Path:
        p = self.pki
        path = self.tmp / "channels.yaml"
        path.write_text(textwrap.dedent(f"""\
            dicom:
              ae_title: {AET}
              port: {self.dicom}
              max_associations: 4
              max_associations_per_calling_ae: 3
              allowed_ips: ["127.0.0.1"]
              allowed_calling_ae_titles: [MODALITY1, F1, F2, F3, F4, F5, F6, F7]
              tls:
                port: {self.dicom_tls}
                cert: {p.server_cert}
                key: {p.server_key}
                key_password_file: {self.tmp / 'key-password'}
                ca: {p.ca}
                handshake_timeout_seconds: 20
            channels:
              - name: secure_in
                source:
                  type: mllp
                  port: {self.mllp}
                  allowed_ips: ["127.0.0.1/32"]
                  tls: {{cert: {p.server_cert}, key: {p.server_key}, key_password: "${{SWF_TEST_KEY_PASSWORD}}", ca: {p.ca}}}
                destinations:
                  - name: his
                    type: mllp
                    host: 127.0.0.1
                    port: {self.his_port}
                    ack_timeout_seconds: 2
                    retry: {{attempts: 50, initial_seconds: 0.2, multiplier: 2, max_seconds: 1}}
                    tls: {{ca: {p.ca}, cert: {p.client_cert}, key: {p.client_key}, server_name: localhost}}
            """), encoding="utf-8")
        return path

    def wait_log(self, *parts: str, timeout: float = 10.0) -> dict:
        """The first JSON log entry whose text holds every part."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
                if all(part in line for part in parts):
                    return json.loads(line) if line.startswith("{") else {"raw": line}
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {parts}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = Site(tmp_path_factory.mktemp("security"))
    his = HisListener(site.his_port, ssl_context=site.pki.server_context()).start()
    site.his = his
    env = {"SWF_TEST_KEY_PASSWORD": site.pki.password}
    with running_engine(site.config(), site.tmp / "var", [site.mllp, site.dicom, site.dicom_tls], env=env):
        yield site
    his.stop()
    # the key password came from the environment and a file: it must appear in no log line
    assert site.pki.password not in site.log.read_text(encoding="utf-8", errors="replace")


def tls_exchange(site: Site, payload: bytes, cert: Path | None = None, key: Path | None = None) -> bytes:
    context = site.pki.client_context(cert, key)
    with socket.create_connection(("127.0.0.1", site.mllp), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"\x0b" + payload + b"\x1c\r")
            return read_frame(sock)


# --- MLLP ---------------------------------------------------------------------------------------------------


def test_mllp_tls_with_client_certificate_is_acknowledged_and_relayed_over_mutual_tls(site):
    answer = tls_exchange(site, orm("TLS1"), site.pki.client_cert, site.pki.client_key)
    assert msa(answer)[1:3] == ["AA", "TLS1"]
    site.wait_log("mllp tls client", "CT01")  # the verified subject of the client certificate
    # the destination HIS wants the engine's client certificate: it got the message, so the engine showed one
    assert b"|TLS1|" in site.his.wait_for(1, timeout=15)[0]


@pytest.mark.parametrize("who", ["no certificate", "untrusted certificate"])
def test_mllp_tls_without_a_valid_client_certificate_is_refused_and_logged(site, who):
    cert, key = (None, None) if who == "no certificate" else (site.pki.rogue_cert, site.pki.rogue_key)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        # TLS 1.3: the client's side of the handshake may finish before the server has judged its certificate,
        # so the refusal shows as an alert or a closed connection on the first read, never as an ACK
        tls_exchange(site, orm("NOPE"), cert, key)
    entry = site.wait_log("mllp tls handshake refused", "certificate")
    assert entry["channel"] == "secure_in" and entry["peer"].startswith("127.0.0.1:")


def test_mllp_plain_tcp_to_the_tls_listener_gets_no_ack(site):
    with socket.create_connection(("127.0.0.1", site.mllp), timeout=10) as sock:
        sock.sendall(b"\x0b" + orm("PLAIN") + b"\x1c\r")
        assert sock.recv(65536) == b""  # closed without an answer
    site.wait_log("mllp tls handshake refused")


def test_mllp_address_not_allowed_is_refused_and_logged(site):
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.2", 0))  # another loopback address: not on the listener's allow-list
        sock.connect(("127.0.0.1", site.mllp))
        assert sock.recv(100) == b""
    site.wait_log("mllp connection refused: address not allowed", "127.0.0.2")


# --- DICOM --------------------------------------------------------------------------------------------------


def dcmtk(site: Site, tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk_tool(tool), "-d", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TCP_NODELAY": "1"})


@pytest.mark.dcmtk
def test_dicom_tls_echo_and_worklist_find_with_dcmtk(site):
    p = site.pki
    tls = ["+tls", str(p.client_key), str(p.client_cert), "+cf", str(p.ca)]
    echo = dcmtk(site, "echoscu", "-aet", "MODALITY1", "-aec", AET, *tls, "127.0.0.1", str(site.dicom_tls))
    assert echo.returncode == 0, echo.stdout + echo.stderr
    found = findscu(site.dicom_tls, site.tmp / "find", ["ScheduledProcedureStepSequence[0].Modality=CT",
                                                        "AccessionNumber", "PatientName"],
                    aet="MODALITY1", aec=AET, extra=tls)
    assert found.status == 0x0000
    site.wait_log("dicom tls client", "CT01")


@pytest.mark.dcmtk
@pytest.mark.parametrize("who", ["no certificate", "untrusted certificate"])
def test_dicom_tls_without_a_valid_client_certificate_is_refused_and_logged(site, who):
    p = site.pki
    tls = ["+tla"] if who == "no certificate" else ["+tls", str(p.rogue_key), str(p.rogue_cert)]
    echo = dcmtk(site, "echoscu", "-aet", "MODALITY1", "-aec", AET, *tls, "+cf", str(p.ca),
                 "127.0.0.1", str(site.dicom_tls))
    assert echo.returncode != 0
    site.wait_log("dicom tls handshake refused", "certificate")


@pytest.mark.dcmtk
def test_dicom_stalled_tls_handshake_does_not_block_other_modalities(site):
    p = site.pki
    with socket.create_connection(("127.0.0.1", site.dicom_tls), timeout=30):  # connects, says nothing
        started = time.monotonic()
        echo = dcmtk(site, "echoscu", "-aet", "MODALITY1", "-aec", AET, "+tls", str(p.client_key),
                     str(p.client_cert), "+cf", str(p.ca), "127.0.0.1", str(site.dicom_tls))
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert time.monotonic() - started < 10  # not after the stalled client's 20 s handshake timeout


@pytest.mark.dcmtk
def test_dicom_calling_ae_not_listed_is_rejected_and_logged(site):
    echo = dcmtk(site, "echoscu", "-aet", "INTRUDER", "-aec", AET, "127.0.0.1", str(site.dicom))
    assert echo.returncode != 0
    out = echo.stdout + echo.stderr
    assert "Association Rejected" in out and "Calling AE Title Not Recognized" in out, out[-2000:]
    entry = site.wait_log("dicom association rejected", "INTRUDER")
    assert "calling AE title not allowed" in entry["event"]


def test_dicom_address_not_allowed_is_refused_and_logged(site):
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", site.dicom))
        assert sock.recv(100) == b""
    site.wait_log("dicom connection refused: address not allowed", "127.0.0.2")


def associate(title: str, port: int):
    ae = AE(ae_title=title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 15
    return ae.associate("127.0.0.1", port, ae_title=AET)


def rejection(assoc) -> tuple[int, int, int]:
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


def test_association_flood_rejects_the_excess_and_serves_the_rest(site):
    """Seven modalities at once against a limit of four: exactly three A-ASSOCIATE-RJ (transient, local limit
    exceeded), and the four admitted keep working."""
    barrier = threading.Barrier(7)
    results: dict[str, object] = {}

    def attempt(title: str) -> None:
        barrier.wait()
        results[title] = associate(title, site.dicom)

    threads = [threading.Thread(target=attempt, args=(f"F{n}",)) for n in range(1, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    admitted = [a for a in results.values() if a.is_established]
    rejected = [a for a in results.values() if a.is_rejected]
    try:
        assert (len(admitted), len(rejected)) == (4, 3)
        assert {rejection(a) for a in rejected} == {(0x02, 0x03, 0x02)}
        assert all(a.send_c_echo().Status == 0x0000 for a in admitted)
    finally:
        for assoc in admitted:
            assoc.release()
    site.wait_log("dicom association rejected: association limit reached")
    # the slots come back once released
    again = associate("F5", site.dicom)
    assert again.is_established
    again.release()


def test_one_calling_ae_cannot_take_every_association(site):
    first = [associate("F1", site.dicom) for _ in range(3)]
    try:
        assert all(a.is_established for a in first)
        fourth = associate("F1", site.dicom)
        assert fourth.is_rejected and rejection(fourth) == (0x02, 0x03, 0x02)
        other = associate("F2", site.dicom)  # another modality still gets the last slot
        assert other.is_established
        other.release()
        site.wait_log("dicom association rejected: association limit for this calling AE title", "F1")
    finally:
        for assoc in first:
            assoc.release()


# --- secrets ------------------------------------------------------------------------------------------------


def test_a_key_password_written_into_the_file_is_refused_with_its_line(tmp_path):
    pki = make_pki(tmp_path / "pki")
    path = tmp_path / "channels.yaml"
    path.write_text(textwrap.dedent(f"""\
        channels:
          - name: secure_in
            source:
              type: mllp
              port: 2575
              tls:
                cert: {pki.server_cert}
                key: {pki.server_key}
                key_password: {pki.password}
                ca: {pki.ca}
            destinations: [{{name: his, type: mllp, host: 127.0.0.1, port: 2576}}]
        """), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.problems == [f"{path}:9: key_password must be written as ${{NAME}} (from the environment) "
                                     f"or given as key_password_file: secrets stay out of this file"]
    assert pki.password not in str(caught.value)
    path.write_text(path.read_text().replace(pki.password, "${SWF_KEY_PASSWORD}"))
    config = load_config(path, environ={"SWF_KEY_PASSWORD": pki.password})
    assert pki.password not in repr(config) and pki.password not in str(config.model_dump())


def test_a_wrong_key_password_fails_at_start_without_showing_it(tmp_path):
    from engine.config import TlsServer
    from engine.tls import server_context

    pki = make_pki(tmp_path / "pki")
    settings = TlsServer(cert=str(pki.server_cert), key=str(pki.server_key), key_password="not-the-password",
                         ca=str(pki.ca))
    with pytest.raises(ConfigError) as caught:
        server_context(settings)
    assert "not-the-password" not in str(caught.value)
    good = TlsServer(cert=str(pki.server_cert), key=str(pki.server_key), key_password=pki.password, ca=str(pki.ca))
    assert server_context(good).verify_mode == ssl.CERT_REQUIRED


def test_listeners_default_to_loopback():
    from engine.config import DicomSettings, HttpSettings, MllpSource

    assert MllpSource(type="mllp", port=2575).host == "127.0.0.1"
    assert DicomSettings().host == "127.0.0.1"
    assert HttpSettings().host == "127.0.0.1"
    shipped = load_config(Path(__file__).resolve().parents[1] / "channels.yaml", environ={})
    hosts = [shipped.dicom.host, shipped.http.host if shipped.http else "127.0.0.1",
             *[c.source.host for c in shipped.channels if c.source.type == "mllp"]]
    assert set(hosts) == {"127.0.0.1"}


# --- outbound DICOM over TLS --------------------------------------------------------------------------------


def _spooled_image(path: Path) -> str:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.PatientID, ds.Modality = "300101", "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID


def test_c_store_to_a_pacs_over_mutual_tls(tmp_path):
    """The DICOM destination presents the engine's certificate; without it the PACS refuses and it is retried."""
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
    from pynetdicom import evt

    from engine.channels.dicom import DicomSender
    from engine.config import DicomDestination

    pki = make_pki(tmp_path / "pki")
    received: list[str] = []

    def on_store(event) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False, ssl_context=pki.server_context(),
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        tls = {"ca": str(pki.ca), "server_name": "localhost"}
        mutual = DicomDestination(type="dicom", name="pacs", ae_title="PACS", host="127.0.0.1", port=port,
                                  keep_sent_files=True, connect_timeout_seconds=5,
                                  tls={**tls, "cert": str(pki.client_cert), "key": str(pki.client_key)})
        uid = _spooled_image(tmp_path / "image.dcm")

        async def send(destination: DicomDestination):
            sender = DicomSender(destination, calling_ae_title=AET)
            try:
                return await sender.send(str(tmp_path / "image.dcm").encode())
            finally:
                await sender.close()

        attempt = asyncio.run(send(mutual))
        assert attempt.ok, attempt.error
        assert received == [uid]
        refused = asyncio.run(send(mutual.model_copy(update={"tls": mutual.tls.model_copy(
            update={"cert": None, "key": None})})))
        assert not refused.ok and refused.retry and received == [uid]
    finally:
        server.shutdown()
