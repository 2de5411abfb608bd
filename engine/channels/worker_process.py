"""A destination's sending in a process of its own: started, and ended or replaced, the same way for every kind.

The engine's process runs the listeners and the journal writer on one GIL. Sending (building PDUs for an image,
a connection and its ACKs for an HL7 receiver) is work the journal does not need to share it with: the
dispatcher stays in the engine, and a worker process only sends and answers with the outcomes.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

STOP_SECONDS = 10.0


def spawn_worker(target: Callable[..., None], name: str, *args: Any) -> tuple[BaseProcess, Connection]:
    """Start `target(pipe, *args, log_level)` in a new process; the engine's end of the pipe is returned.

    Spawn, not fork: the engine has threads, and a lock one of them held at the fork would never be released.
    """
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_named, name=name, daemon=True,
                              args=(name, target, theirs, *args, logging.getLogger().getEffectiveLevel()))
    process.start()
    theirs.close()
    return process, ours


def _named(name: str, target: Callable[..., None], *args: Any) -> None:
    """Run `target` in a process `ps`, `top` and the tests tell apart by its name (Linux: 15 bytes of comm);
    its command line is multiprocessing's, the same for every worker."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass
    target(*args)


def end_worker(process: BaseProcess | None, pipe: Connection | None, *, kill: bool) -> None:
    """Close our end and wait for the process to end (asked to before, or `kill`); blocks up to 20 s."""
    if pipe is not None:
        pipe.close()
    if process is None:
        return
    if kill:
        process.kill()
    process.join(STOP_SECONDS)
    if process.is_alive():
        process.kill()
        process.join(STOP_SECONDS)


def pipe_messages(pipe: Connection, ended: Any) -> asyncio.Queue:
    """What arrives on `pipe`, in a queue of the running event loop, read as the pipe becomes readable (no thread
    waits on it); `ended` once the other side has closed it or gone."""
    loop = asyncio.get_running_loop()
    messages: asyncio.Queue = asyncio.Queue()

    def readable() -> None:
        try:
            messages.put_nowait(pipe.recv())
        except (EOFError, OSError):
            loop.remove_reader(pipe.fileno())
            messages.put_nowait(ended)

    loop.add_reader(pipe.fileno(), readable)
    return messages
