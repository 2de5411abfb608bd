"""Real socket peers for tests: an MLLP receiver playing the HIS, and helpers to run the engine."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HL7_DIR = SHARED / "data" / "hl7"


@functools.lru_cache(maxsize=None)
def sample_hl7(name: str) -> bytes:
    """The shared sample message whose file name starts with `name`, its segments ended by CR alone."""
    data = next(HL7_DIR.glob(f"{name}*")).read_bytes()
    return data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r")


def dcmtk_tool(name: str) -> str | None:
    """The DCMTK binary of that name on PATH: pynetdicom installs Python apps with the same names (cached: asking
    pyenv's shim of pynetdicom's script for --version costs most of a second)."""
    for directory in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        path = Path(directory) / name
        if path.is_file() and os.access(path, os.X_OK):
            try:
                out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return str(path)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"engine exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def mllp_exchange(port: int, payload: bytes, timeout: float = 10.0, sock: socket.socket | None = None) -> bytes:
    """Send one framed message and read one framed answer."""
    own = sock is None
    if own:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(VT + payload + FS + CR)
        return read_frame(sock)
    finally:
        if own:
            sock.close()


def read_frame(sock: socket.socket) -> bytes:
    data = b""
    while FS not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full frame; got {data!r}")
        data += chunk
    start = data.index(VT) + 1
    return data[start:data.index(FS)]


def msa(answer: bytes, codec: str = "utf-8") -> list[str]:
    for segment in answer.decode(codec, errors="replace").split("\r"):
        if segment.startswith("MSA"):
            return segment.split("|")
    raise AssertionError(f"no MSA in {answer!r}")


def worker_processes(engine_pid: int, kind: str) -> list[int]:
    """The engine's sending processes of one kind, by the name they give themselves: `forward` (C-STORE to a
    PACS) or `deliver` (HL7 over MLLP)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            name = (stat.parent / "comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue
        if parent == engine_pid and name.startswith(f"{kind}-"):
            found.append(int(stat.parent.name))
    return found


class HisListener:
    """An MLLP receiver in a thread: records every message, answers AA (or what `answer` says)."""

    def __init__(self, port: int | None = None, answer: str | None = "AA", ssl_context=None) -> None:
        self.port = port or free_port()
        self.answer = answer  # None: read and never answer (a HIS that hangs)
        self.ssl_context = ssl_context  # a server-side ssl.SSLContext: the HIS speaks MLLP over TLS
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> "HisListener":
        self._stop.clear()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", self.port))
        self._server.listen(16)
        self._server.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._server:
            self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.ssl_context is not None:
            try:
                conn.settimeout(5)
                conn = self.ssl_context.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
        conn.settimeout(0.2)
        buffer = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while FS in buffer:
                    block, buffer = buffer.split(FS, 1)
                    buffer = buffer.lstrip(CR)
                    message = block[block.index(VT) + 1:] if VT in block else block
                    control_id = message.split(b"\r")[0].split(b"|")[9] if message.count(b"|") > 9 else b""
                    with self._lock:
                        self.received.append(message)
                    if self.answer is None:
                        continue
                    ack = b"MSH|^~\\&|HIS|HOSP|SWF|RAD|20260101||ACK|A" + control_id + b"|P|2.3.1\rMSA|" + \
                        self.answer.encode() + b"|" + control_id + b"\r"
                    try:
                        conn.sendall(VT + ack + FS + CR)
                    except OSError:
                        return

    def wait_for(self, count: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        with self._lock:
            raise TimeoutError(f"received {len(self.received)} of {count}")


class EngineProcess:
    """`swf-engine serve` as a subprocess, as an operator runs it."""

    def __init__(self, config: Path, data_dir: Path, wait_ports: list[int], env: dict[str, str] | None = None) -> None:
        self.config, self.data_dir, self.ports = config, data_dir, wait_ports
        self.env = {**os.environ, "SWF_DATA_DIR": str(data_dir), **(env or {})}
        # the shipped channels.yaml opens the HTTP listener: never on a fixed port beside other test engines
        self.env.setdefault("SWF_HTTP_PORT", str(free_port()))
        self.process: subprocess.Popen | None = None
        self.log = data_dir / "engine.log"

    def start(self) -> "EngineProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--config", str(self.config)],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        for port in self.ports:
            wait_port(port, process=self.process)
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def running_engine(config: Path, data_dir: Path, ports: list[int], env: dict[str, str] | None = None) -> Iterator[EngineProcess]:
    engine = EngineProcess(config, data_dir, ports, env).start()
    try:
        yield engine
    finally:
        engine.stop()


def add_user(data_dir: Path, name: str, role: str, password: str) -> None:
    """`swf-engine user add` on the engine's data directory, before or while it serves."""
    subprocess.run([sys.executable, "-m", "engine.cli", "user", "add", name, "--role", role, "--password-stdin"],
                   input=password + "\n", text=True, check=True, cwd=REPO, capture_output=True,
                   env={**os.environ, "SWF_DATA_DIR": str(data_dir)})


def logged_in(base: str, name: str, password: str):
    """An httpx.Client with the session cookie of that user and its CSRF token on every request."""
    import httpx

    client = httpx.Client(base_url=base, timeout=60)
    answer = client.post("/api/session", json={"username": name, "password": password})
    assert answer.status_code == 200, answer.text
    client.headers["X-CSRF-Token"] = answer.json()["csrf_token"]
    return client


@dataclass
class FindResult:
    """One DCMTK `findscu -W` run: the final DIMSE status, the pending identifiers and their bytes, the log."""

    status: int
    responses: list = field(default_factory=list)  # pydicom Datasets, in the order they came
    raw: list[bytes] = field(default_factory=list)  # each response file as findscu wrote it (-X)
    detail: str = ""


def findscu(port: int, out_dir: Path, keys: list[str | bytes], *, aet: str = "MODALITY1", aec: str = "SWF_ENGINE",
            files: list[Path] = (), extra: list[str] = ()) -> FindResult:
    """Run DCMTK findscu -W; the final status from its debug log, the responses from -X files.

    A key named twice is sent once, the first time: the return keys a test adds never blank a matching key it set.
    """
    from pydicom import dcmread

    tool = dcmtk_tool("findscu")
    assert tool, "DCMTK findscu is not installed"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="q", dir=out_dir))
    args: list[str | bytes] = [tool, "-d", "-W", "-aet", aet, "-aec", aec, "-X", "-od", str(out), *extra]
    named: set[bytes] = set()
    for key in keys:
        raw = key if isinstance(key, bytes) else key.encode()
        name = raw.split(b"=", 1)[0]
        if name in named:
            continue
        named.add(name)
        args += ["-k", key]
    args += ["127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(args, capture_output=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=60)
    log = (result.stdout + result.stderr).decode("utf-8", "replace")
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", log)
    assert statuses, f"no C-FIND response from the SCP:\n{log[-2000:]}"
    paths = sorted(out.glob("rsp*.dcm"))
    return FindResult(int(statuses[-1], 16), [dcmread(p) for p in paths], [p.read_bytes() for p in paths], log)
