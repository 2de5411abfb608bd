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


def test_an_idle_connection_is_closed_and_a_busy_one_is_not():
    """The listener closes a connection after `idle_timeout` without a byte, however long it was busy before;
    a slow answer does not count as idle, and a sender that keeps talking is served throughout."""
    import asyncio
    import time

    from engine.channels.mllp import MllpServer
    from peers import free_port

    async def answer(block, peer):
        if block.payload == b"SLOW":
            await asyncio.sleep(0.6)  # longer than the idle timeout, but the peer is waiting for us
        return b"ACK " + block.payload

    async def scenario():
        port = free_port()
        server = MllpServer("127.0.0.1", port, answer, max_bytes=1024, idle_timeout=0.4, max_connections=4)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            answers = []
            for payload in (b"A", b"SLOW", b"B", b"C", b"D"):  # 1.2 s in all, with pauses under 0.4 s
                writer.write(frame(payload))
                answers.append(await reader.readuntil(b"\x1c\x0d"))
                await asyncio.sleep(0.15)
            busy_for = time.monotonic() - started
            idle_started = time.monotonic()
            closed = await asyncio.wait_for(reader.read(), timeout=5)  # EOF once the listener gives up on us
            return answers, busy_for, time.monotonic() - idle_started, closed
        finally:
            await server.close()

    answers, busy_for, idle_for, closed = asyncio.run(scenario())
    assert [a.strip(b"\x0b\x1c\r") for a in answers] == [b"ACK A", b"ACK SLOW", b"ACK B", b"ACK C", b"ACK D"]
    assert busy_for > 1.2  # served past three idle timeouts, since it never went quiet for one
    assert closed == b"" and 0.2 < idle_for < 2.0


def test_a_frame_written_in_pieces_is_answered_and_each_piece_is_acknowledged_at_once(monkeypatch):
    """Some HIS write the start block, the message and the end block one by one with Nagle on: each piece then waits
    for our ACK of the one before, which Linux delays up to 40 ms. While a frame is incomplete the listener asks its
    socket for quick ACKs after every read (the real setsockopt runs, and is recorded); a frame read whole needs none."""
    import asyncio
    import socket

    import engine.channels.mllp as mllp
    from engine.tcp import TCP_QUICKACK
    from peers import free_port

    asked: list[int] = []
    real = mllp.quick_ack

    def recording(sock):
        real(sock)
        asked.append(sock.getsockopt(socket.IPPROTO_TCP, TCP_QUICKACK) if TCP_QUICKACK is not None else 1)

    monkeypatch.setattr(mllp, "quick_ack", recording)

    async def answer(block, peer):
        return b"ACK " + block.payload

    async def scenario():
        port = free_port()
        server = mllp.MllpServer("127.0.0.1", port, answer, max_bytes=1024, idle_timeout=5, max_connections=4)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(frame(b"WHOLE"))
            whole = await reader.readuntil(b"\x1c\x0d")
            calls_for_whole = len(asked)
            for piece in (b"\x0b", b"MSH|PIECES", b"\x1c\x0d"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)  # each piece its own read on the listener's side
            pieces = await reader.readuntil(b"\x1c\x0d")
            writer.close()
            return whole, calls_for_whole, pieces
        finally:
            await server.close()

    whole, calls_for_whole, pieces = asyncio.run(scenario())
    assert whole.strip(b"\x0b\x1c\r") == b"ACK WHOLE" and pieces.strip(b"\x0b\x1c\r") == b"ACK MSH|PIECES"
    assert calls_for_whole == 0
    # after the start block and after the message (one call if a loaded machine joined two pieces in one read)
    assert 1 <= len(asked) <= 2 and all(state == 1 for state in asked)
