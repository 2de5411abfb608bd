"""The running engine: builds channels from the config and runs sources, the journal and dispatchers."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping

from engine.actors.base import Actor
from engine.channels.dispatcher import DestinationDispatcher, sender_for
from engine.channels.journal_writer import JournalWriter
from engine.channels.mllp import Frame, MllpServer
from engine.channels.pipeline import Inbound, Outcome, Pipelines
from engine.clock import Clock, Ids
from engine.config import Channel, Config, MllpSource
from engine.errors import EngineError, Malformed, Unavailable
from engine.mappings.ack import FALLBACK_HEADER, build_ack, decide
from engine.mappings.hl7_message import DecodedMessage, sniff_header
from engine.store.db import Store
from engine.store.leases import Lease, instance_name
from engine.tls import AddressList, server_context

if TYPE_CHECKING:
    from engine.channels.reload import ReloadReport

log = logging.getLogger(__name__)


@dataclass
class _ChannelRun:
    """What one started channel runs: its listener (MLLP sources) and one dispatcher per destination."""

    server: MllpServer | None = None
    dispatchers: list[DestinationDispatcher] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)

# A service is anything else `serve` runs beside the channels (DICOM SCP, HTTP): started with the
# engine, it returns an awaitable that stops it.
Service = Callable[["Engine"], Awaitable[Callable[[], Awaitable[None]]]]


@dataclass
class Engine:
    """Built once by `serve` and passed down: config, store, clock, ids. No global state."""

    config: Config
    store: Store
    clock: Clock
    ids: Ids
    data_dir: Path
    actors: Mapping[str, Actor] = field(default_factory=dict)
    actor_settings: Mapping[str, object] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)
    config_path: Path | None = None  # where `config` came from: the admin UI shows and reloads it
    # capability objects services create and HTTP routers use (e.g. "capture": the capture stations)
    extensions: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pipelines = Pipelines(self.config.channels, self.actors, clock=self.clock, ids=self.ids,
                                   settings=self.actor_settings)
        self.writer = JournalWriter(self.store, self.pipelines.process_batch,
                                    commit_delay=self.config.engine.commit_delay_ms / 1000)
        self.dispatchers: list[DestinationDispatcher] = []
        self.instance = instance_name()  # this process among the engines sharing the database (leases)
        self._servers: list[MllpServer] = []
        self._tasks: list[asyncio.Task] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._stoppers: list[Callable[[], Awaitable[None]]] = []
        # started | paused | stopped per channel name; see start_channel for what each means
        self.channel_state: dict[str, str] = {}
        self._runs: dict[str, _ChannelRun] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.writer.start()
        for channel in self.config.channels:
            if channel.enabled:
                await self.start_channel(channel.name)
            else:
                self.channel_state[channel.name] = "stopped"
        if self.store.is_sqlite:
            self._tasks.append(asyncio.create_task(self._checkpoints(), name="sqlite-checkpoint"))
        for service in self.services:
            self._stoppers.append(await service(self))

    async def stop(self) -> None:
        for server in self._servers:
            await server.close()
        for stopper in reversed(self._stoppers):
            await stopper()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.writer.stop)

    async def _checkpoints(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.writer.checkpoint)
            except Exception:  # a busy database: the next round catches up
                log.warning("sqlite checkpoint failed", exc_info=True)

    # --- channel control (admin UI) ------------------------------------------------------------
    # As in Mirth Connect: paused closes the source only (an MLLP listener stops accepting, so senders queue on
    # their side; FHIR answers 503) while the destinations drain their queues; stopped also ends the
    # dispatchers, so deliveries stay queued in the journal until the channel starts again. Nothing is lost
    # either way. A channel's state is not persisted: `serve` starts every enabled channel.

    async def start_channel(self, name: str) -> None:
        channel = self.config.channel(name)
        run = self._runs.setdefault(name, _ChannelRun())
        if not run.dispatchers:
            for destination in channel.destinations:
                # SQLite has one engine process by construction; a server database may have several
                lease = None if self.store.is_sqlite else Lease(
                    self.store, channel.name, destination.name, self.instance, self.config.engine.lease_seconds)
                dispatcher = DestinationDispatcher(self.store, self.writer, self.clock, channel.name, destination,
                                                   batch=self.config.engine.dispatch_batch,
                                                   sender=sender_for(destination,
                                                                     calling_ae_title=self.config.dicom.ae_title),
                                                   lease=lease)
                task = asyncio.create_task(dispatcher.run(), name=f"dispatch:{channel.name}:{destination.name}")
                run.dispatchers.append(dispatcher)
                run.tasks.append(task)
                self.dispatchers.append(dispatcher)
                self._tasks.append(task)
        if run.server is None and isinstance(channel.source, MllpSource):
            source = channel.source
            server = MllpServer(source.host, source.port, partial(self.on_frame, channel),
                                max_bytes=source.max_message_bytes,
                                idle_timeout=source.idle_timeout_seconds,
                                max_connections=source.max_connections, name=channel.name,
                                ssl_context=server_context(source.tls) if source.tls else None,
                                handshake_timeout=source.tls.handshake_timeout_seconds if source.tls else 10.0,
                                allowed=AddressList(source.allowed_ips))
            await server.start()
            run.server = server
            self._servers.append(server)
        self.channel_state[name] = "started"

    async def pause_channel(self, name: str) -> None:
        self.config.channel(name)  # KeyError for an unknown name
        run = self._runs.setdefault(name, _ChannelRun())
        await self._close_source(run)
        if self.channel_state.get(name) != "stopped":
            self.channel_state[name] = "paused"

    async def stop_channel(self, name: str) -> None:
        self.config.channel(name)
        run = self._runs.setdefault(name, _ChannelRun())
        await self._close_source(run)
        for dispatcher in run.dispatchers:
            self.dispatchers.remove(dispatcher)
        for task in run.tasks:
            task.cancel()
        await asyncio.gather(*run.tasks, return_exceptions=True)
        self._tasks = [task for task in self._tasks if task not in run.tasks]
        run.dispatchers, run.tasks = [], []
        self.channel_state[name] = "stopped"

    async def _close_source(self, run: "_ChannelRun") -> None:
        if run.server is not None:
            self._servers.remove(run.server)
            await run.server.close()
            run.server = None

    def accepting(self, name: str) -> bool:
        """Whether a channel's source takes messages now (edges without a listener of their own ask this)."""
        return self.channel_state.get(name, "started") == "started"

    async def apply_config(self, new: Config) -> "ReloadReport":
        """Apply a validated config without a restart where that is safe; the report says what waits for one."""
        from engine.channels.reload import plan_reload

        plan = plan_reload(self.config, new)
        for name in plan.stop:
            if name in self._runs or name in self.channel_state:
                await self.stop_channel(name)
            self._runs.pop(name, None)
            self.channel_state.pop(name, None)
        self.config = plan.applied
        self.pipelines.channels = {c.name: c for c in plan.applied.channels}
        for name in plan.start:
            channel = plan.applied.channel(name)
            if channel.enabled:
                await self.start_channel(name)
            else:
                self.channel_state[name] = "stopped"
        return plan.report

    def wake_dispatchers(self, *channels: str, requeued: bool = False) -> None:
        """Deliveries were queued on these channels (none named: on any): their dispatchers look now.

        Naming them matters under load: each dispatcher woken asks the journal for its queue, and an image
        series woke every destination of every channel once per image. requeued: some were put back at the
        head of their queue, which also ends a dispatcher's wait for its failing head's next retry.
        """
        for dispatcher in self.dispatchers:
            if not channels or dispatcher.channel in channels:
                dispatcher.wake(requeued=requeued)

    def wake_dispatchers_threadsafe(self, *channels: str) -> None:
        """From a thread outside the event loop (pynetdicom's handlers), after a commit that queued deliveries."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.wake_dispatchers, *channels)

    # --- MLLP source ----------------------------------------------------------------------------

    async def on_frame(self, channel: Channel, block: Frame, peer: str) -> bytes | None:
        """Journal one block, then answer: the ACK leaves only after the commit."""
        source = channel.source
        assert isinstance(source, MllpSource)
        received_at = self.clock.utcnow()
        decoded: DecodedMessage | None = None
        error: EngineError | None = None
        if block.oversized:
            error = Malformed(f"message larger than {source.max_message_bytes} bytes")
            return self._answer(channel, None, "AR", error)
        try:
            decoded = sniff_header(block.payload, fallback_codec=source.fallback_charset, force_codec=source.charset)
        except EngineError as exc:
            error = exc
        if block.truncated and error is None:
            error = Malformed("block cut short: a new start block (VT) came before the end block (FS)")
            decoded_for_journal = None
        else:
            decoded_for_journal = decoded if error is None else None
        inbound = Inbound(channel.name, block.payload, peer, received_at, decoded_for_journal, error)
        try:
            outcome: Outcome = await self.writer.submit_item(self.pipelines.plan(inbound))
        except EngineError as exc:
            return self._answer(channel, decoded, exc.ack, exc)
        except Exception:
            # Whatever broke between the block and the commit (a full disk, a lost database), the message is
            # not known to be stored: the sender must keep it and send it again, so never AA.
            log.exception("message not journaled", extra={"channel": channel.name, "peer": peer})
            return self._answer(channel, decoded, "AR", Unavailable("the message could not be stored; retry later"))
        if outcome.queued_on:
            self.wake_dispatchers(*outcome.queued_on)
        log.debug("message %s", outcome.status, extra={
            "channel": channel.name, "message_id": outcome.message_id, "ack": outcome.ack_code,
            "control_id": decoded.header.control_id if decoded else "", "peer": peer,
        })
        return self._answer(channel, decoded, outcome.ack_code, outcome.error)

    def _answer(self, channel: Channel, decoded: DecodedMessage | None, code: str,
                error: EngineError | None) -> bytes | None:
        source = channel.source
        assert isinstance(source, MllpSource)
        header = decoded.header if decoded else FALLBACK_HEADER
        decision = decide(header, code, enhanced_mode=source.ack_mode == "enhanced")
        if not decision.send:
            return None
        text = build_ack(header, decision.code, now=self.clock.now(), control_id=self.ids.control_id(), error=error)
        return text.encode(header.codec, errors="replace")
