"""Pixels in and out: JPEG Baseline stills (Pillow), H.264 clips (PyAV's FFmpeg with libx264), exported files.

DICOM's MPEG-4 AVC transfer syntax fixes the stream (PS3.5 8.2.8): High Profile, Level 4.1, 4:2:0, at most
1920x1080 and 30 frames/s, so frames larger than that are scaled down and faster sources are decimated.
Nothing here touches the database or the network.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, UnidentifiedImageError

from engine.errors import Malformed
from engine.non_dicom_capture.sources import frame_rgb
from engine.non_dicom_capture.wrap import Clip, Still

MAX_WIDTH, MAX_HEIGHT, MAX_FPS = 1920, 1080, 30.0
STILL_SUFFIXES = {".jpg", ".jpeg", ".bmp", ".png", ".tif", ".tiff"}
CLIP_SUFFIXES = {".avi", ".mp4", ".mov", ".mkv", ".mpg", ".mpeg", ".m4v", ".wmv"}


class MediaError(Malformed):
    """A file or frame that cannot be read or encoded: the item is refused, the station goes on."""

    http = 422


def still_from_rgb(rgb: np.ndarray, *, jpeg: bool, quality: int = 90) -> Still:
    """An RGB (or grey) frame as a Still: JPEG Baseline with 4:2:2 chroma, or raw interleaved bytes."""
    rows, columns = rgb.shape[:2]
    monochrome = rgb.ndim == 2
    if not jpeg:
        return Still(rows, columns, np.ascontiguousarray(rgb).tobytes(), jpeg=False, monochrome=monochrome)
    buffer = io.BytesIO()
    # subsampling 1 = 4:2:2, which YBR_FULL_422 describes (PS3.3 C.7.6.3.1.2); no progressive, no optimize
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality, subsampling=1 if not monochrome else 0)
    return Still(rows, columns, buffer.getvalue(), jpeg=True, monochrome=monochrome)


def read_still_file(path: Path) -> np.ndarray:
    """An exported still (JPEG, BMP, PNG, TIFF) as 8-bit RGB or grey."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("L", "1") or (image.mode.startswith("I") and image.mode != "I;16"):
                return np.asarray(image.convert("L"))
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{path.name}: not a readable image ({exc.__class__.__name__})") from None


def even_size(width: int, height: int) -> tuple[int, int]:
    """The largest even size within the H.264 Level 4.1 bound that keeps the aspect ratio."""
    scale = min(1.0, MAX_WIDTH / width, MAX_HEIGHT / height)
    w, h = int(width * scale) // 2 * 2, int(height * scale) // 2 * 2
    return max(2, w), max(2, h)


class ClipEncoder:
    """Frames in, an H.264 Annex B stream out; feed() in order, finish() once (one thread)."""

    def __init__(self, width: int, height: int, fps: float, *, preset: str = "veryfast", crf: int = 20,
                 threads: int = 0) -> None:
        self.width, self.height = even_size(width, height)
        self.source_fps = fps if fps and fps > 0 else MAX_FPS
        # decimate by an integer step so that frame times stay regular
        self.step = max(1, int(np.ceil(self.source_fps / MAX_FPS - 1e-6)))
        self.fps = self.source_fps / self.step
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="h264")  # raw Annex B, no MP4 boxes
        self.rate = Fraction(self.fps).limit_denominator(1001)
        self.stream = self.container.add_stream("libx264", rate=self.rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"
        if threads:
            self.stream.codec_context.thread_count = threads
        # Level 4.1 caps High Profile at 62.5 Mbit/s (ITU-T H.264 Table A-1); keep well below it
        self.stream.options = {"preset": preset, "profile": "high", "level": "4.1", "crf": str(crf),
                               "maxrate": "20M", "bufsize": "25M", "x264-params": "aud=1:repeat-headers=1"}
        self.seen = 0
        self.frames = 0
        self.first_rgb: np.ndarray | None = None
        self._scaler = VideoReformatter()

    def feed(self, frame: av.VideoFrame) -> None:
        self.seen += 1
        if (self.seen - 1) % self.step:
            return
        if self.first_rgb is None:
            self.first_rgb = frame_rgb(frame, min(frame.width, 320),
                                       max(2, int(frame.height * min(frame.width, 320) / frame.width)))
        if frame.width != self.width or frame.height != self.height or frame.format.name != "yuv420p":
            # the encoder's own scaler: the frame's is shared with the threads taking stills and previews
            frame = self._scaler.reformat(frame, width=self.width, height=self.height, format="yuv420p")
        frame.pts = self.frames
        frame.time_base = 1 / self.rate
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def finish(self) -> Clip:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        if self.frames == 0:
            raise MediaError("the clip has no frames")
        return Clip(self.height, self.width, self.frames, self.fps, self.buffer.getvalue())

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:
            pass


def read_clip_file(path: Path, *, preset: str = "veryfast", max_seconds: float = 3600.0) -> Clip:
    """An exported clip (AVI, MP4 ...) decoded and encoded again as DICOM's H.264 stream."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise MediaError(f"{path.name}: not a readable video ({exc.__class__.__name__})") from None
    encoder: ClipEncoder | None = None
    try:
        if not container.streams.video:
            raise MediaError(f"{path.name}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.base_rate or MAX_FPS)
        limit = int(max_seconds * fps)
        for n, frame in enumerate(container.decode(stream)):
            if encoder is None:
                encoder = ClipEncoder(frame.width, frame.height, fps, preset=preset)
            if n >= limit:
                break
            encoder.feed(frame)
        if encoder is None:
            raise MediaError(f"{path.name}: no decodable frame")
        return encoder.finish()
    except av.FFmpegError as exc:
        if encoder is not None:
            encoder.abort()
        raise MediaError(f"{path.name}: video cannot be decoded ({exc.__class__.__name__})") from None
    finally:
        container.close()


def thumbnail(rgb: np.ndarray, width: int = 160) -> bytes:
    image = Image.fromarray(rgb)
    image.thumbnail((width, width * 3 // 4 or 1))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def file_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in STILL_SUFFIXES:
        return "still"
    if suffix in CLIP_SUFFIXES:
        return "clip"
    return None

