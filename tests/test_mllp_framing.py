"""MLLP block framing (HL7 v2.5 Appendix C)."""

from engine.channels.mllp import FrameReader, frame


def test_frames_split_across_reads_and_several_per_read():
    reader = FrameReader(1024)
    data = frame(b"MSH|one") + frame(b"MSH|two") + frame(b"MSH|three")
    got = []
    for i in range(0, len(data), 3):
        got += reader.feed(data[i:i + 3])
    assert [f.payload for f in got] == [b"MSH|one", b"MSH|two", b"MSH|three"]
    assert reader.junk_bytes == 0


def test_fs_without_cr_and_cr_in_next_read():
    reader = FrameReader(1024)
    assert [f.payload for f in reader.feed(b"\x0bMSH|a\x1c")] == [b"MSH|a"]
    assert [f.payload for f in reader.feed(b"\r\x0bMSH|b\x1c\r")] == [b"MSH|b"]
    assert reader.junk_bytes == 0


def test_new_start_before_end_marks_the_old_block_truncated():
    frames = FrameReader(1024).feed(b"\x0bMSH|cut\x0bMSH|whole\x1c\r")
    assert [(f.payload, f.truncated) for f in frames] == [(b"MSH|cut", True), (b"MSH|whole", False)]


def test_oversized_block_is_flagged_not_buffered():
    reader = FrameReader(10)
    frames = reader.feed(b"\x0b" + b"x" * 50 + b"\x1c\r\x0bMSH|ok\x1c\r")
    assert frames[0].oversized and frames[0].payload == b""
    assert frames[1].payload == b"MSH|ok" and not frames[1].oversized


def test_bytes_outside_frames_are_counted_and_skipped():
    reader = FrameReader(1024)
    frames = reader.feed(b"garbage\r\n\x0bMSH|x\x1c\rmore")
    assert [f.payload for f in frames] == [b"MSH|x"]
    assert reader.junk_bytes == len(b"garbage") + len(b"more")


def test_gb18030_payload_bytes_pass_untouched():
    payload = "MSH|^~\\&|\rPID|1||1||區億東".encode("gb18030")
    assert FrameReader(1024).feed(frame(payload))[0].payload == payload
