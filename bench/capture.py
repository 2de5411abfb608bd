"""Capture bench (issue 5): 1920x1080 at 30 fps for 60 s from a file source, played in real time.

While one clip records the whole minute, a still is taken every half second. Reports frames decoded by the hub
vs frames the clip recorder got and encoded (no drops is the target), still-to-DICOM-file latency p50/p95
(target p95 < 200 ms: frame to RGB, JPEG, DICOM header, file written and synced, row committed), clip encoding
speed as a multiple of real time, and the process's CPU use.

    python bench/capture.py [--seconds 60] [--preset superfast] [--still-every 0.5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.app import build_engine  # noqa: E402
from engine.config import CaptureDevice, CaptureSettings, CaptureStation, Config  # noqa: E402
from engine.non_dicom_capture.service import CaptureService  # noqa: E402
from engine.store.db import Store, default_url  # noqa: E402

W, H, FPS = 1920, 1080, 30


def make_video(path: Path, seconds: int) -> None:
    """A moving 1080p pattern, encoded once and cached (the bench measures capture, not this)."""
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "23"}
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    for n in range(seconds * FPS):
        frame = np.roll(base, n * 8, axis=1)
        frame[:64, : (n % W)] = 255  # a bar that grows with the frame counter
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--preset", default="superfast")
    parser.add_argument("--still-every", type=float, default=0.5)
    parser.add_argument("--video", default=str(Path(tempfile.gettempdir()) / "swf_capture_bench_1080p30.mp4"))
    args = parser.parse_args()

    video = Path(args.video)
    if not video.exists():
        print(f"making {video} ({args.seconds} s of 1920x1080 at 30 fps) ...", file=sys.stderr)
        make_video(video, args.seconds)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        station = CaptureStation(name="bench", ae_title="ES01", modality="ES", clip_preset=args.preset,
                                 device=CaptureDevice(type="file", path=str(video), realtime=True))
        config = Config.model_validate({
            "channels": [{"name": "image_router", "source": {"type": "dicom"},
                          "destinations": [{"name": "pacs", "type": "dicom", "ae_title": "PACS",
                                            "host": "127.0.0.1", "port": 4242}]}],
            "capture": CaptureSettings(stations=[station]).model_dump()})
        store = Store(default_url(data_dir))
        store.migrate()
        engine = build_engine(config, store, data_dir)
        engine.writer.start()
        service = CaptureService(engine)
        st = service.station("bench")
        service.open_session(st, service.manual_subject("BENCH1", "王小东"))
        usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        st.hub.start()
        while st.hub.state != "running":
            time.sleep(0.01)
        service.start_clip(st)
        latencies: list[float] = []
        next_still = time.monotonic()
        while st.hub.state == "running":
            now = time.monotonic()
            if now >= next_still:
                began = time.perf_counter()
                service.still(st)
                latencies.append((time.perf_counter() - began) * 1000)
                next_still += args.still_every
            time.sleep(max(0.0, min(0.05, next_still - time.monotonic())))
        wall_played = time.monotonic() - wall0
        recorder = st.recorder
        stop_began = time.perf_counter()
        item = service.stop_clip(st)
        stop_ms = (time.perf_counter() - stop_began) * 1000
        usage1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        seconds_recorded = item["frames"] / FPS
        print(f"source: {video.name}, {W}x{H} at {FPS} fps, played {wall_played:.1f} s in real time")
        print(f"frames decoded by the hub: {st.hub.decoded}; delivered to the clip recorder: {recorder.received}; "
              f"dropped: {recorder.dropped}; in the DICOM clip: {item['frames']}")
        print(f"stills: {len(latencies)}; still-to-DICOM-file latency p50 {statistics.median(latencies):.1f} ms, "
              f"p95 {percentile(latencies, 95):.1f} ms, max {max(latencies):.1f} ms")
        print(f"clip: {seconds_recorded:.1f} s, {item['size'] / 1e6:.1f} MB; x264 {args.preset}: encoding "
              f"{seconds_recorded / recorder.encode_seconds:.2f}x real time ({recorder.encode_seconds:.1f} s of "
              f"encoder time); stop-to-DICOM-file {stop_ms:.0f} ms")
        print(f"CPU: {100 * cpu / (wall1 - wall0):.0f}% of one core on average ({cpu:.1f} s over {wall1 - wall0:.1f} s, "
              f"{os.cpu_count()} cores)")
        service.stop()
        engine.writer.stop()
        store.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
