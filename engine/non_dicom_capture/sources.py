"""Frame sources behind one interface: a V4L2 card, a video file, an RTSP or HTTP MJPEG stream (PyAV / FFmpeg).

A FrameHub decodes its device once, on its own thread, and shares every frame: the latest one for the preview
and for stills, each one for the clip recorders that subscribed. A device that cannot be opened or stops
delivering puts the hub in `error` with a readable reason and is opened again after `reopen_seconds`; the hub
never stops the station.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from engine.config import CaptureDevice
from engine.errors import EngineError

log = logging.getLogger(__name__)

OPEN_TIMEOUT, READ_TIMEOUT = 5.0, 5.0



def frame_rgb(frame: av.VideoFrame, width: int | None = None, height: int | None = None) -> np.ndarray:
    """A decoded frame as RGB pixels, converted with a scaler of this call's own.

    One frame is read by several threads at once (stills, preview, the clip encoder); PyAV's
    `to_ndarray`/`reformat` keep one swscale context per frame, which is not safe to share between threads.
    """
    return VideoReformatter().reformat(frame, width=width, height=height, format="rgb24").to_ndarray()


class SourceUnavailable(EngineError):
    """The station's device gives no frame: not opened, unreadable, or ended (HTTP 503 on the capture API)."""

    http = 503


@dataclass(frozen=True)
class Frame:
    index: int  # counts every frame the hub decoded, from 1
    frame: av.VideoFrame
    at: float  # monotonic time it was decoded


def open_container(device: CaptureDevice) -> av.container.InputContainer:
    """The device as an FFmpeg input (v4l2 demuxer for cards; FFmpeg guesses files and URLs unless told)."""
    fmt = device.format or ("v4l2" if device.type == "v4l2" else None)
    options = dict(device.options)
    if device.type == "stream" and device.path.startswith("rtsp"):
        options.setdefault("rtsp_transport", "tcp")
    return av.open(device.path, format=fmt, options=options, timeout=(OPEN_TIMEOUT, READ_TIMEOUT))


class FrameHub:
    """One decoding thread per device; frames are shared, never decoded twice."""

    def __init__(self, device: CaptureDevice, name: str, *, opener: Callable = open_container) -> None:
        self.device, self.name, self.opener = device, name, opener
        self.state = "stopped"  # starting | running | ended | error | stopped
        self.error = ""
        self.decoded = 0
        self.width = self.height = 0
        self.fps = 0.0
        self._latest: Frame | None = None
        self._cond = threading.Condition()
        self._subscribers: list[queue.Queue] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._preview: tuple[int, bytes] | None = None
        self._preview_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "FrameHub":
        self._stop.clear()
        self.state = "starting"
        self._thread = threading.Thread(target=self._run, name=f"capture:{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.state = "stopped"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ended = self._play_once()
            except Exception as exc:  # every FFmpeg or OS failure: report, wait, open again
                self._fail(_reason(exc))
                self._stop.wait(self.device.reopen_seconds)
                continue
            if self._stop.is_set():
                break
            if ended and self.device.type == "file" and not self.device.loop:
                self.state = "ended"
                log.info("capture source ended", extra={"station": self.name})
                self._stop.wait()
                break
            if ended and self.device.type != "file":
                self._fail("the stream ended")
                self._stop.wait(self.device.reopen_seconds)

    def _fail(self, reason: str) -> None:
        if self.state != "error" or self.error != reason:
            log.error("capture source failed: %s", reason, extra={"station": self.name, "device": self.device.type})
        self.state, self.error = "error", reason
        with self._cond:
            self._cond.notify_all()

    def _play_once(self) -> bool:
        """Decode until the input ends (True) or the hub stops (False)."""
        container = self.opener(self.device)
        try:
            if not container.streams.video:
                raise SourceUnavailable("the input has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            self.fps = float(stream.average_rate or stream.base_rate or 30)
            paced = self.device.type == "file" and self.device.realtime
            started = time.monotonic()
            first_time: float | None = None
            for frame in container.decode(stream):
                if self._stop.is_set():
                    return False
                if paced and frame.time is not None:
                    first_time = frame.time if first_time is None else first_time
                    delay = started + (frame.time - first_time) - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return False
                self._publish(frame)
            return True
        finally:
            container.close()

    def _publish(self, frame: av.VideoFrame) -> None:
        self.decoded += 1
        item = Frame(self.decoded, frame, time.monotonic())
        self.width, self.height = frame.width, frame.height
        with self._cond:
            self._latest = item
            if self.state != "running":
                self.state, self.error = "running", ""
                log.info("capture source running", extra={"station": self.name, "width": frame.width,
                                                           "height": frame.height})
            subscribers = list(self._subscribers)
            self._cond.notify_all()
        for q in subscribers:
            try:
                q.put_nowait(item)
            except queue.Full:
                q.dropped = getattr(q, "dropped", 0) + 1  # counted by the recorder; the device is not held up

    # --- consumers ------------------------------------------------------------------------------

    def latest(self, max_age: float = 2.0) -> Frame:
        """The newest frame; SourceUnavailable with the reason when the device gives none."""
        with self._cond:
            item = self._latest
        if self.state == "running" and item is not None:
            return item
        if item is not None and self.state == "ended":
            return item  # a played-out file: its last frame is still what the operator sees
        if self.state == "error":
            raise SourceUnavailable(f"device unavailable: {self.error}")
        if item is not None and time.monotonic() - item.at < max_age:
            return item
        raise SourceUnavailable(f"device not delivering frames ({self.state})")

    def wait_next(self, after: int, timeout: float = 1.0) -> Frame | None:
        with self._cond:
            self._cond.wait_for(lambda: self._stop.is_set() or (self._latest is not None and self._latest.index > after)
                                or self.state == "error", timeout)
            item = self._latest
        return item if item is not None and item.index > after else None

    def subscribe(self, maxsize: int = 240) -> queue.Queue:
        q: queue.Queue = queue.Queue(maxsize=maxsize)
        q.dropped = 0
        with self._cond:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._cond:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def preview_jpeg(self, item: Frame, width: int = 960) -> bytes:
        """The frame as a small JPEG, encoded once however many viewers ask for it."""
        with self._preview_lock:
            if self._preview is not None and self._preview[0] == item.index:
                return self._preview[1]
            frame = item.frame
            w = min(width, frame.width) // 2 * 2
            h = max(2, int(frame.height * w / frame.width) // 2 * 2)
            rgb = frame_rgb(frame, w, h)
            buffer = io.BytesIO()
            Image.fromarray(rgb).save(buffer, format="JPEG", quality=75)
            self._preview = (item.index, buffer.getvalue())
            return self._preview[1]

    def status(self) -> dict:
        return {"state": self.state, "error": self.error, "frames": self.decoded, "width": self.width,
                "height": self.height, "fps": round(self.fps, 3), "device": self.device.type}


def _reason(exc: Exception) -> str:
    if isinstance(exc, EngineError):
        return str(exc)
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:300]
