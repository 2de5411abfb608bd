"""The journal pruner inside `serve`: a pass every engine.prune_interval_minutes (engine.store.pruner).

The pass runs in a thread; its deletes go through the journal writer (`run_blocking`), one batch per job, so
ACKs waiting on the writer wait at most one small batch longer. At shutdown the pass stops between batches
before the writer does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Awaitable, Callable

from engine.store.pruner import Pruner

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

log = logging.getLogger(__name__)

FIRST_PASS_SECONDS = 60.0  # after start: let the listeners and dispatchers settle first


async def start_pruner(engine: "Engine") -> Callable[[], Awaitable[None]]:
    stopping = threading.Event()
    pruner = Pruner(engine.store, engine.data_dir, lambda: engine.config, engine.writer.run_blocking,
                    clock=engine.clock, stopping=stopping)
    engine.extensions["pruner"] = pruner
    running: list[asyncio.Future] = []

    async def passes() -> None:
        delay = min(FIRST_PASS_SECONDS, engine.config.engine.prune_interval_minutes * 60)
        while True:
            await asyncio.sleep(delay)
            delay = engine.config.engine.prune_interval_minutes * 60
            current = asyncio.ensure_future(asyncio.to_thread(pruner.run))
            running[:] = [current]
            try:
                await asyncio.shield(current)
            except asyncio.CancelledError:
                raise
            except Exception:  # a busy or unreachable database: the next pass catches up
                log.exception("journal prune failed")

    task = asyncio.create_task(passes(), name="journal-pruner")

    async def stop() -> None:
        stopping.set()
        task.cancel()
        await asyncio.gather(task, *running, return_exceptions=True)

    return stop
