"""The one boundary between the engine's callers and its model thread.

In: every operation (a generation, a classification, an adapter load or
unload, a cancel) is a command posted to the engine's `Inbox`. The model
thread runs the commands between steps, so the engine's state (the queues,
the batch, the adapters' slots and holds) changes on that thread alone.

Out: everything a caller gets back (text deltas, then a result or an error)
goes through the `Reply` it posted with. `LoopReply` hands each item to the
caller's asyncio event loop (`call_soon_threadsafe`, nothing else);
`WaitingReply` to a plain thread that blocks on it (tools and tests).

Reads of the adapter registry (which adapters are served, to whom) take the
registry's lock and change nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from tunewire.services.common.errors import Unavailable

log = logging.getLogger(__name__)


def shutting_down() -> Unavailable:
    # UNAVAILABLE (HTTP 503): the request was not run, and a retry policy moves on to another replica.
    return Unavailable("the inference service is shutting down: retry on another replica")


class Reply:
    """Where the model thread sends what a caller gets back: any number of
    items (`send`), then one outcome, a result or an exception (`finish`)."""

    def send(self, item: Any) -> None:
        raise NotImplementedError

    def finish(self, outcome: Any) -> None:
        raise NotImplementedError


class LoopReply(Reply):
    """A reply awaited on the asyncio event loop that made it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def send(self, item: Any) -> None:
        self._post(False, item)

    def finish(self, outcome: Any) -> None:
        self._post(True, outcome)

    def _post(self, last: bool, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (last, item))
        except RuntimeError:  # the loop has closed: nobody is listening
            pass

    async def items(self) -> AsyncIterator[Any]:
        """The items as they come, then the result (an error is raised)."""
        while True:
            last, item = await self._queue.get()
            if last and isinstance(item, BaseException):
                raise item
            yield item
            if last:
                return

    async def result(self) -> Any:
        """The outcome, once it comes (sent items are passed over)."""
        outcome = None
        async for outcome in self.items():  # noqa: B007 (the last one is the outcome)
            pass
        return outcome


class WaitingReply(Reply):
    """A reply a plain thread blocks on; `on_item` sees each item as it is sent."""

    def __init__(self, on_item: Callable[[Any], None] | None = None) -> None:
        self.items: list = []
        self.outcome: Any = None
        self._on_item = on_item
        self._done = threading.Event()

    def send(self, item: Any) -> None:
        self.items.append(item)
        if self._on_item is not None:
            self._on_item(item)

    def finish(self, outcome: Any) -> None:
        self.outcome = outcome
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = 60) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError(f"no reply within {timeout}s")
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


# A command runs on the model thread with the reply it was posted with. It
# finishes the reply itself or hands it on (a request keeps its reply until
# it ends); an exception it raises finishes the reply.
Command = Callable[[Reply | None], None]


class Inbox:
    """The commands posted to the model thread, in order."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._commands: list[tuple[Command, Reply | None]] = []
        self._closed = False

    def post(self, command: Command, reply: Reply | None) -> None:
        with self._lock:
            if not self._closed:
                self._commands.append((command, reply))
                self._lock.notify_all()
                return
        if reply is not None:
            reply.finish(shutting_down())

    def take(self, busy: Callable[[], bool]) -> list[tuple[Command, Reply | None]] | None:
        """The commands posted since the last call; waits for one while not
        `busy`. None once closed."""
        with self._lock:
            while not (self._closed or self._commands or busy()):
                self._lock.wait()
            if self._closed:
                return None
            commands, self._commands = self._commands, []
            return commands

    def close(self) -> list[tuple[Command, Reply | None]]:
        """Refuses further commands; returns those never run."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            commands, self._commands = self._commands, []
            return commands


def run_command(command: Command, reply: Reply | None) -> None:
    try:
        command(reply)
    except BaseException as exc:  # handed to the caller
        if reply is not None:
            reply.finish(exc)
        else:
            log.exception("engine command failed")
