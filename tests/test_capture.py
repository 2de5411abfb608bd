"""Non-DICOM capture end to end (issue 5): video and exported files into valid DICOM in a real Orthanc.

Real peers only: `swf-engine serve` as a subprocess with capture stations, orders over MLLP, a synthetic video made
here with PyAV (a 16-bit frame counter burned in as blocks, so that stills and clips can be read back), the same
frames served as an HTTP MJPEG stream from a real socket, Orthanc as the PACS, dciodvfy on every stored object.
"""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import generate_frames

from orthanc_peer import Orthanc, instance_file, orthanc_binary
from peers import HL7_DIR, REPO, add_user, free_port, logged_in, mllp_exchange, msa, running_engine

USERS = {"operator": ("capture", "operator-secret-1"), "viewer": ("viewer", "viewer-secret-1")}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed: run scripts/test"),
              pytest.mark.skipif(subprocess.run(["which", "dciodvfy"], capture_output=True).returncode != 0,
                                 reason="dicom3tools is not installed: run scripts/test")]

W, H, FPS = 320, 240, 25
BLOCK, BITS = 20, 16
US_IMAGE, US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1"
VL_ENDOSCOPIC, VIDEO_ENDOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.1", "1.2.840.10008.5.1.4.1.1.77.1.1.1"


# --- synthetic video with a readable frame counter ---------------------------------------------

def frame_with_counter(n: int) -> np.ndarray:
    """A moving gradient with the frame number as 16 black/white blocks along the top."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([(x + n * 3) % 256, (y + n * 2) % 256, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    rgb[:BLOCK + 8] = 128
    for bit in range(BITS):
        value = 255 if (n >> (BITS - 1 - bit)) & 1 else 0
        rgb[4:4 + BLOCK, bit * BLOCK:(bit + 1) * BLOCK] = value
    return rgb


def read_counter(grey: np.ndarray) -> int:
    n = 0
    for bit in range(BITS):
        n = (n << 1) | int(grey[4 + BLOCK // 2, bit * BLOCK + BLOCK // 2] > 128)
    return n


def write_video(path: Path, seconds: float, codec: str = "libx264", fmt: str | None = None) -> None:
    container = av.open(str(path), "w", format=fmt)
    stream = container.add_stream(codec, rate=FPS)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    for n in range(int(seconds * FPS)):
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame_with_counter(n), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()


class MjpegServer:
    """multipart/x-mixed-replace JPEG frames at FPS, as IP cameras and video encoders serve them."""

    def __init__(self) -> None:
        self.port = free_port()
        frames = [self._jpeg(n) for n in range(FPS * 4)]

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                started, n = time.monotonic(), 0
                try:
                    while True:
                        jpeg = frames[n % len(frames)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
                                         + jpeg + b"\r\n")
                        n += 1
                        delay = started + n / FPS - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                except (BrokenPipeError, ConnectionResetError):
                    return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def _jpeg(n: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(frame_with_counter(n)).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    def stop(self) -> None:
        self.server.shutdown()


# --- orders over MLLP ---------------------------------------------------------------------------

def order_messages(n: int, patient_id: str, name: str, accession: str, modality: str) -> list[bytes]:
    """The shared sample ADT^A04 + ORM^O01 with this patient, accession and modality."""
    out = []
    for sample in ("01_adt_a04", "02_orm_o01"):
        text = next(HL7_DIR.glob(f"{sample}*")).read_text(encoding="utf-8")
        text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
        text = "\r".join(seg for seg in text.split("\r") if not seg.startswith("ZDS"))  # the engine makes the UID
        for old, new in (("300101", patient_id), ("王小东", name), ("A2611220001", accession),
                         ("RP2611220001", f"RP{n:04d}"), ("SPS2611220001", f"SPS{n:04d}"),
                         ("HO2611220001", f"HO{n:04d}"), ("RF2611220001", f"RF{n:04d}"),
                         ("||||CT|||", f"||||{modality}|||"), ("CT0101^胸部CT平扫", f"{modality}0101^检查"),
                         ("HIS26112200001", f"CAP{n:04d}A"), ("HIS26112200002", f"CAP{n:04d}O")):
            text = text.replace(old, new)
        out.append(text.encode("utf-8"))
    return out


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hl7, self.dicom, self.http, self.pacs = free_port(), free_port(), free_port(), free_port()
        self.data = tmp / "var"
        self.folder = tmp / "us_export"
        self.video = tmp / "endoscope.mp4"
        self.mjpeg = MjpegServer()
        self.orthanc = Orthanc(tmp / "orthanc", port=self.pacs)
        self.config = tmp / "channels.yaml"
        self.env = {"SWF_HL7_PORT": str(self.hl7), "SWF_DICOM_PORT": str(self.dicom), "SWF_HTTP_PORT": str(self.http),
                    "SWF_PACS_PORT": str(self.pacs)}
        self.orders = 0

    def write_config(self) -> None:
        self.config.write_text(f"""
dicom: {{ae_title: SWF_ENGINE, host: 127.0.0.1, port: "${{SWF_DICOM_PORT}}"}}
http: {{host: 127.0.0.1, port: "${{SWF_HTTP_PORT}}"}}
worklist:
  stations:
    - {{modality: US, ae_titles: [US01]}}
    - {{modality: ES, ae_titles: [ES01]}}
mpps: {{status_channel: null}}
channels:
  - name: his_inbound
    source: {{type: mllp, host: 127.0.0.1, port: "${{SWF_HL7_PORT}}"}}
    steps: [{{type: actor, actor: order_filler}}]
  - name: image_router
    source: {{type: dicom, coerce: true, unmatched: forward}}
    destinations:
      - name: pacs
        type: dicom
        ae_title: ORTHANC
        host: 127.0.0.1
        port: "${{SWF_PACS_PORT}}"
        connect_timeout_seconds: 2
        retry: {{attempts: 1000, initial_seconds: 0.5, multiplier: 2, max_seconds: 2}}
capture:
  channel: image_router
  reconcile_seconds: 0.5
  stations:
    - name: endo
      ae_title: ES01
      modality: ES
      device: {{type: file, path: "{self.video}", loop: true}}
      mpps: true
      clip_preset: ultrafast
    - name: endo_stream
      ae_title: ES02
      modality: ES
      device: {{type: stream, path: "http://127.0.0.1:{self.mjpeg.port}/stream.mjpg", format: mpjpeg}}
      clip_preset: ultrafast
    - name: us
      ae_title: US01
      modality: US
      folder: {{path: "{self.folder}", poll_seconds: 0.2, settle_seconds: 0.3}}
      send: immediately
      clip_preset: ultrafast
    - name: broken
      ae_title: XC01
      modality: XC
      device: {{type: v4l2, path: /dev/video97, reopen_seconds: 1}}
""", encoding="utf-8")

    def login(self, name: str) -> httpx.Client:
        return logged_in(f"http://127.0.0.1:{self.http}", name, USERS[name][1])

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        """As the capture operator, logged in (the page and its API are for people with role capture)."""
        return self.operator.request(method, f"/capture/api{path}", **kwargs)

    def ok(self, method: str, path: str, **kwargs):
        answer = self.api(method, path, **kwargs)
        assert answer.status_code < 300, answer.text
        return answer.json()

    def order(self, patient_id: str, name: str, accession: str, modality: str) -> str:
        self.orders += 1
        for message in order_messages(self.orders, patient_id, name, accession, modality):
            assert msa(mllp_exchange(self.hl7, message))[1] == "AA"
        return self.study_uid(accession)

    def sql(self, query: str, *args):
        with sqlite3.connect(self.data / "swf-engine.db") as db:
            return db.execute(query, args).fetchall()

    def study_uid(self, accession: str) -> str:
        [(uid,)] = self.sql("SELECT study_instance_uid FROM imaging_order WHERE accession = ?", accession)
        return uid

    def wait_running(self, station: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ok("GET", f"/stations/{station}")["device"]["state"] == "running":
                return
            time.sleep(0.1)
        raise TimeoutError(f"{station} not running: {self.ok('GET', f'/stations/{station}')}")


def dciodvfy_errors(data: bytes, path: Path) -> list[str]:
    path.write_bytes(data)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capture")
    site = Site(tmp)
    write_video(site.video, 6)
    site.write_config()
    site.orthanc.start()
    for name, (role, password) in USERS.items():
        add_user(site.data, name, role, password)
    try:
        with running_engine(site.config, site.data, [site.hl7, site.dicom, site.http], site.env) as engine:
            site.engine, site.operator = engine, site.login("operator")
            yield site
    finally:
        site.orthanc.stop()
        site.mjpeg.stop()


def stored(site: Site, uid: str) -> tuple[dict, bytes]:
    return site.orthanc.instance_tags(uid), instance_file(site.orthanc, uid)


def tag(tags: dict, key: str) -> str:
    return tags[key]["Value"] if isinstance(tags[key]["Value"], str) else ""


def test_stills_and_clip_from_file_and_mjpeg_stream_arrive_valid_in_orthanc(site, tmp_path):
    """Acceptance 1: 5 stills and a 10 s clip from each source, under the order's patient and study."""
    study = site.order("700001", "李明", "ACAP0001", "ES")
    worklist = site.ok("GET", "/stations/endo/worklist")
    assert [w["accession"] for w in worklist] == ["ACAP0001"]
    for station in ("endo", "endo_stream"):
        site.wait_running(station)
        session = site.ok("POST", f"/stations/{station}/session", json={"accession": "ACAP0001"})["session"]
        assert session["patient_id"] == "700001" and not session["manual"]
    preview = site.api("GET", "/stations/endo/snapshot.jpg")
    assert preview.status_code == 200 and preview.content[:2] == b"\xff\xd8"
    assert "<title>Capture station" in site.operator.get("/capture").text
    items = []
    for station in ("endo", "endo_stream"):
        site.ok("POST", f"/stations/{station}/clip/start")
    for _ in range(5):
        for station in ("endo", "endo_stream"):
            items.append(site.ok("POST", f"/stations/{station}/still"))
        time.sleep(0.3)
    time.sleep(10 - 1.5)
    clips = [site.ok("POST", f"/stations/{station}/clip/stop") for station in ("endo", "endo_stream")]
    for clip in clips:
        assert clip["recorded"]["dropped"] == 0
        assert 9 * FPS <= clip["frames"] <= 11 * FPS, clip
    items += clips
    assert all(i["state"] == "review" for i in items)
    sent = site.ok("POST", "/stations/endo/send", json={}) + site.ok("POST", "/stations/endo_stream/send", json={})
    assert len(sent) == 12 and all(i["state"] == "sent" for i in sent)
    uids = {i["sop_instance_uid"] for i in items}
    wait_for(lambda: uids <= set(site.orthanc.sop_instance_uids()), 90, "12 objects in Orthanc")
    stills_by_station: dict[str, list[int]] = {}
    for item in items:
        tags, data = stored(site, item["sop_instance_uid"])
        assert tag(tags, "0010,0020") == "700001"
        assert tag(tags, "0010,0010") == "LI^MING=李^明"
        assert tag(tags, "0020,000d") == study
        assert tag(tags, "0008,0050") == "ACAP0001"
        errors = dciodvfy_errors(data, tmp_path / f"{item['id']}.dcm")
        assert errors == [], errors
        ds = dcmread(io.BytesIO(data))
        if item["kind"] == "still":
            assert ds.SOPClassUID == VL_ENDOSCOPIC
            jpeg = next(generate_frames(ds.PixelData, number_of_frames=1))
            grey = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"))
            stills_by_station.setdefault(item["station"], []).append(read_counter(grey))
        else:
            assert ds.SOPClassUID == VIDEO_ENDOSCOPIC and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.102"
            stream = b"".join(generate_frames(ds.PixelData, number_of_frames=1))
            decoded = [frame.to_ndarray(format="gray") for frame in av.open(io.BytesIO(stream), format="h264").decode(video=0)]
            assert len(decoded) == int(ds.NumberOfFrames)
            counters = [read_counter(g) for g in decoded]
            steps = {(b - a) % (6 * FPS if item["station"] == "endo" else 4 * FPS) for a, b in zip(counters, counters[1:])}
            assert steps == {1}, f"{item['station']}: frames missing or repeated in the clip: {sorted(steps)[:10]}"
    for station, counters in stills_by_station.items():
        assert len(counters) == 5 and len(set(counters)) == 5, (station, counters)
    for station in ("endo", "endo_stream"):
        site.ok("DELETE", f"/stations/{station}/session")
    # the endo station reported its procedure like a modality (MPPS to the engine's own SCP)
    assert site.sql("SELECT status FROM performed_procedure_step WHERE accession = 'ACAP0001'") == [("COMPLETED",)]


def _ultrasound_exports(folder: Path) -> dict[str, str]:
    """What a legacy ultrasound leaves in its export folder: stills in four formats, an AVI clip, one corrupt file."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / "staging"
    staging.mkdir(exist_ok=True)
    image = Image.fromarray(frame_with_counter(42))
    image.save(staging / "us1.jpg", quality=90)
    image.convert("L").save(staging / "us2.png")
    image.save(staging / "us3.bmp")
    image.save(staging / "us4.tif")
    write_video(staging / "us5.avi", 2, codec="mpeg4", fmt="avi")
    (staging / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    names = {}
    for path in sorted(staging.iterdir()):
        path.rename(folder / path.name)  # appear whole, as a device's copy-then-rename would
        names[path.name] = "clip" if path.suffix == ".avi" else "still"
    return names


def test_watched_folder_exports_become_us_images_of_the_selected_patient(site, tmp_path):
    """Acceptance 2, and a corrupt file: reported on the station and in the log, the folder keeps working."""
    site.order("700002", "赵静", "ACAP0002", "US")
    before = set(site.orthanc.sop_instance_uids())
    site.ok("POST", "/stations/us/session", json={"accession": "ACAP0002"})
    names = _ultrasound_exports(site.folder)
    wait_for(lambda: len(set(site.orthanc.sop_instance_uids()) - before) >= 5, 90, "5 US objects in Orthanc")
    new = set(site.orthanc.sop_instance_uids()) - before
    assert len(new) == 5
    classes = []
    for uid in new:
        tags, data = stored(site, uid)
        assert tag(tags, "0010,0020") == "700002" and tag(tags, "0008,0060") == "US"
        assert tag(tags, "0010,0010") == "ZHAO^JING=赵^静"
        assert dciodvfy_errors(data, tmp_path / f"{uid}.dcm") == []
        classes.append(tag(tags, "0008,0016"))
    assert sorted(classes) == sorted([US_IMAGE] * 4 + [US_MULTIFRAME])
    wait_for(lambda: (site.folder / "failed" / "broken.jpg").exists(), 10, "corrupt file set aside")
    assert sorted(p.name for p in (site.folder / "done").iterdir()) == sorted(n for n in names if n != "broken.jpg")
    events = site.ok("GET", "/stations/us")["events"]
    assert any(e["level"] == "error" and "broken.jpg" in e["text"] for e in events), events
    assert "broken.jpg: not a readable image" in site.engine.log.read_text()
    site.ok("DELETE", "/stations/us/session")


def test_manual_capture_is_held_then_reconciled_when_its_order_arrives(site, tmp_path):
    """Acceptance 3: no worklist at capture time; the order arrives over MLLP afterwards."""
    site.wait_running("endo")
    site.ok("POST", "/stations/endo/session",
            json={"patient_id": "700003", "name": "张三", "birth_date": "1970-01-01", "sex": "M"})
    items = [site.ok("POST", "/stations/endo/still") for _ in range(2)]
    assert all(i["manual"] for i in items)
    held = site.ok("POST", "/stations/endo/send", json={})
    assert [i["state"] for i in held] == ["held", "held"]
    uids = {i["sop_instance_uid"] for i in items}
    time.sleep(1.5)
    assert not uids & set(site.orthanc.sop_instance_uids())
    study = site.order("700003", "张三", "ACAP0003", "ES")
    wait_for(lambda: uids <= set(site.orthanc.sop_instance_uids()), 60, "reconciled objects in Orthanc")
    for uid in uids:
        tags, data = stored(site, uid)
        assert tag(tags, "0020,000d") == study and tag(tags, "0008,0050") == "ACAP0003"
        assert tag(tags, "0010,0010") == "ZHANG^SAN=张^三"
        assert dciodvfy_errors(data, tmp_path / f"{uid}.dcm") == []
    # the open session follows its order now: the next still goes straight to it
    after = site.ok("POST", "/stations/endo/still")
    assert not after["manual"] and after["accession"] == "ACAP0003"
    site.ok("DELETE", f"/items/{after['id']}")
    site.ok("DELETE", "/stations/endo/session")


def test_cli_import_prints_uids_and_reports_a_corrupt_file(site, tmp_path):
    still = tmp_path / "export.jpg"
    Image.fromarray(frame_with_counter(7)).save(still, quality=90)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    done = subprocess.run([sys.executable, "-m", "engine.cli", "capture", "import", "--accession", "ACAP0002",
                           "--config", str(site.config), str(still), str(corrupt)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**site.engine.env})
    assert done.returncode == 1, done.stderr
    [uid] = done.stdout.split()
    assert "corrupt.png" in done.stderr and "not a readable image" in done.stderr
    wait_for(lambda: uid in site.orthanc.sop_instance_uids(), 30, "imported still in Orthanc")
    tags, data = stored(site, uid)
    assert tag(tags, "0008,0016") == US_IMAGE and tag(tags, "0010,0020") == "700002"
    assert dciodvfy_errors(data, tmp_path / "cli.dcm") == []


def test_pacs_down_loses_nothing_and_a_broken_device_does_not_stop_the_station(site):
    """Acceptance 4."""
    site.order("700004", "孙丽", "ACAP0004", "ES")
    broken = site.ok("GET", "/stations/broken")["device"]
    assert broken["state"] == "error" and "/dev/video97" in broken["error"], broken
    site.ok("POST", "/stations/broken/session", json={"accession": "ACAP0004"})
    refused = site.api("POST", "/stations/broken/still")
    assert refused.status_code == 503 and "device unavailable" in refused.json()["error"]
    assert "capture source failed" in site.engine.log.read_text()

    site.orthanc.stop()
    site.wait_running("endo")
    site.ok("POST", "/stations/endo/session", json={"accession": "ACAP0004"})
    items = [site.ok("POST", "/stations/endo/still") for _ in range(3)]
    sent = site.ok("POST", "/stations/endo/send", json={})
    assert [i["state"] for i in sent] == ["sent"] * 3

    def failing():  # deliveries go in order: the oldest is retried, the others wait behind it
        listed = site.ok("GET", "/stations/endo/items?session_only=true")
        return any(i["deliveries"]["pacs"]["status"] == "error" and i["deliveries"]["pacs"]["error"] for i in listed)
    wait_for(failing, 30, "a failed delivery attempt while the PACS is down")
    assert site.ok("GET", "/stations/endo")["device"]["state"] == "running"
    site.orthanc.start()
    uids = {i["sop_instance_uid"] for i in items}
    wait_for(lambda: uids <= set(site.orthanc.sop_instance_uids()), 60, "queued stills delivered after the PACS returned")
    statuses = [i["deliveries"]["pacs"]["status"] for i in site.ok("GET", "/stations/endo/items?session_only=true")]
    assert statuses == ["sent"] * 3
    site.ok("DELETE", "/stations/endo/session")
    site.ok("DELETE", "/stations/broken/session")


def test_the_page_and_its_api_are_for_capture_operators_only(site):
    """No session: the page sends the browser to the login page and back, the API answers 401; a viewer gets 403;
    the operator's cookie without the CSRF token changes nothing; the operator's nav leads to the page."""
    base = f"http://127.0.0.1:{site.http}"
    page = httpx.get(f"{base}/capture")
    assert page.status_code == 303 and page.headers["location"] == "/ui/login?next=/capture"
    for method, path in (("GET", "/stations"), ("GET", "/stations/endo/worklist"), ("POST", "/stations/endo/still"),
                         ("GET", "/stations/endo/snapshot.jpg"), ("DELETE", "/items/1")):
        assert httpx.request(method, f"{base}/capture/api{path}").status_code == 401, path
    login = httpx.post(f"{base}/ui/login", data={"username": "operator", "password": USERS["operator"][1],
                                                 "next": "/capture"})
    assert login.status_code == 303 and login.headers["location"] == "/capture"
    viewer = site.login("viewer")
    assert viewer.get("/capture").status_code == 403
    assert viewer.get("/capture/api/stations").status_code == 403
    viewer.close()
    forged = httpx.post(f"{base}/capture/api/stations/endo/still", cookies=site.operator.cookies)
    assert forged.status_code == 403 and "X-CSRF-Token" in forged.text
    assert "X-CSRF-Token" in site.operator.get("/capture").text  # the page sends it on its POSTs
    assert 'href="/capture"' in site.operator.get("/ui/worklist").text
    assert {s["name"] for s in site.ok("GET", "/stations")} == {"endo", "endo_stream", "us", "broken"}
