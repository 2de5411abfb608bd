"""Outbound HL7 over MLLP: each destination's connection lives in a delivery process of its own.

Under a stream of inbound messages, sending their copies on (a write, a read and an ACK to judge per message,
through asyncio's streams) took about a sixth of the engine's GIL time, which the listener and the journal
writer needed. The dispatcher stays in the engine with the journal and hands over runs of due messages; the
delivery process sends them in order on its kept connection and answers once per run. A process that dies or
stops answering is replaced and the run is retried: the journal still has every message of it queued, so a
receiver may see one message twice after such a fault (as after a crash of the engine), never none.
"""

from __future__ import annotations

import asyncio
import logging
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from engine.channels.attempt import Attempt
from engine.channels.mllp import MllpClient
from engine.channels.worker_process import end_worker, pipe_messages, spawn_worker
from engine.config import MllpDestination
from engine.mappings.ack import ack_code_of
from engine.tls import client_context

log = logging.getLogger(__name__)

# A run whose bytes might not fit the pipe's buffer is handed over from a worker thread: a delivery process
# still starting up does not read yet, and the event loop must not wait for it.
PIPE_BUFFER_SAFE = 32 * 1024
_ENDED = object()


class MllpLink:
    """Sends HL7 bytes over a kept MLLP connection and judges the ACK by the destination's policy."""

    def __init__(self, destination: MllpDestination) -> None:
        self.destination = destination
        tls = destination.tls
        self.client = MllpClient(destination.host, destination.port,
                                 connect_timeout=destination.connect_timeout_seconds,
                                 answer_timeout=destination.ack_timeout_seconds,
                                 ssl_context=client_context(tls) if tls else None,
                                 server_hostname=tls.server_name if tls else None)

    async def send(self, payload: bytes) -> Attempt:
        try:
            answer = await self.client.send(payload)
        except asyncio.TimeoutError:
            return Attempt(False, error="no ACK within the timeout")
        except (OSError, ConnectionError) as exc:
            return Attempt(False, error=f"connection failed: {exc.__class__.__name__}: {exc.strerror or exc}"
                           if isinstance(exc, OSError) else f"connection failed: {exc}")
        text = answer.decode("utf-8", errors="replace")
        code = ack_code_of(text)
        if code in ("AA", "CA"):
            return Attempt(True, response=text)
        reason = f"receiver answered {code or 'without MSA'}"
        return Attempt(False, response=text, error=reason, retry=self.destination.on_negative_ack == "retry")

    async def send_run(self, payloads: list[bytes]) -> list[Attempt]:
        """In order, stopping at the first failure: the receiver must never get a message before an earlier one."""
        attempts: list[Attempt] = []
        for payload in payloads:
            attempts.append(await self.send(payload))
            if not attempts[-1].ok:
                break
        return attempts

    async def close(self) -> None:
        await self.client.close()


class MllpSender:
    """The dispatcher's side: hands runs to the destination's delivery process and awaits their outcomes.

    All on the event loop: the answer is read when the pipe becomes readable, so no thread waits per run.
    """

    def __init__(self, destination: MllpDestination) -> None:
        self.destination = destination
        self._process: BaseProcess | None = None
        self._pipe: Connection | None = None
        self._answers: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # the longest one message may take before the process counts as hung: connecting and waiting for its ACK
        self._per_message = destination.connect_timeout_seconds * 2 + destination.ack_timeout_seconds + 5
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._started()  # now: the process takes about a second to start, which the first message should not wait

    async def send(self, payload: bytes) -> Attempt:
        return (await self.send_many([payload]))[0]

    async def send_many(self, payloads: list[bytes]) -> list[Attempt]:
        """One outcome per message, in order, up to the first that failed."""
        pipe = self._started()
        assert self._answers is not None
        request = ("send", payloads)
        try:
            if sum(map(len, payloads)) > PIPE_BUFFER_SAFE:
                await asyncio.to_thread(pipe.send, request)
            else:
                pipe.send(request)
            async with asyncio.timeout(10 + self._per_message * len(payloads)):
                answer = await self._answers.get()
        except OSError as exc:
            answer = exc
        except TimeoutError:
            await self._replace()
            return [Attempt(False, error="the delivery process did not answer in time; it was restarted")]
        if answer is _ENDED or isinstance(answer, OSError):
            await self._replace()
            return [Attempt(False, error="the delivery process ended; it was restarted")]
        return answer

    def _started(self) -> Connection:
        if self._process is not None and self._pipe is not None and self._process.is_alive():
            return self._pipe
        self._forget()
        process, pipe = spawn_worker(deliver, f"deliver-{self.destination.name}", self.destination)
        self._answers = pipe_messages(pipe, _ENDED)
        self._process, self._pipe, self._loop = process, pipe, asyncio.get_running_loop()
        return pipe

    def _forget(self) -> tuple[BaseProcess | None, Connection | None]:
        """Stop listening to the current process; it and its pipe are the caller's to end."""
        process, pipe = self._process, self._pipe
        if pipe is not None and self._loop is not None and not pipe.closed:
            self._loop.remove_reader(pipe.fileno())
        self._process = self._pipe = self._answers = None
        return process, pipe

    async def _replace(self) -> None:
        process, pipe = self._forget()
        await asyncio.to_thread(end_worker, process, pipe, kill=True)
        self._started()

    async def close(self) -> None:
        process, pipe = self._forget()
        if pipe is None:
            return
        try:
            pipe.send(("close", None))  # it closes its connection and ends
        except OSError:
            pass
        await asyncio.to_thread(end_worker, process, pipe, kill=False)


def deliver(pipe: Connection, destination: MllpDestination, log_level: int) -> None:
    """The delivery process: send each run asked for on `pipe` until asked to close or the engine is gone."""
    from engine import logs

    logs.setup(logging.getLevelName(log_level))
    asyncio.run(_deliver_runs(pipe, MllpLink(destination)))


async def _deliver_runs(pipe: Connection, link: MllpLink) -> None:
    requests = pipe_messages(pipe, None)  # None: the engine ended (or was killed), nothing more will be asked
    try:
        while (request := await requests.get()) is not None:
            kind, payloads = request
            if kind != "send":
                return
            attempts = await link.send_run(payloads)
            try:
                pipe.send(attempts)
            except OSError:
                return  # the engine went away during the run: it sends the run again itself
    finally:
        await link.close()
