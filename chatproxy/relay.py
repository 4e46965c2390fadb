"""Read an async iterator in a task of its own, so its reader can wait with a timeout.

Waiting on an async generator directly with a timeout would cancel the pending read, and a
generator a cancellation went through is finished. Here the read is never cancelled by a
timeout: the producer task keeps reading and the consumer only waits for it to say something.
The consumer also gets every item that piled up since its last look in one batch. It costs a
task wake-up per item, so ``upstream.AnswerStream`` only uses it for a body that aiohttp's
reader (which can be cancelled safely) does not carry, e.g. the offline demo's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Relay(Generic[T]):
    __slots__ = ("_items", "_done", "_error", "_wakeup", "_task")

    def __init__(self, source: AsyncIterator[T]) -> None:
        self._items: list[T] = []
        self._done = False
        self._error: Exception | None = None
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._pump(source))

    async def _pump(self, source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                self._items.append(item)
                self._wakeup.set()
        except Exception as exc:  # handed to the consumer, which decides what it means
            self._error = exc
        finally:
            self._done = True
            self._wakeup.set()

    async def next_batch(self, timeout: float | None = None) -> list[T] | None:
        """Return what arrived since the last call; ``[]`` after ``timeout`` s of silence;
        ``None`` at the end. Raise the source's exception once its items are delivered."""
        if not self._items and not self._done:
            if timeout:
                try:
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
                except TimeoutError:
                    return []
            else:
                await self._wakeup.wait()
        self._wakeup.clear()
        if self._items:
            items, self._items = self._items, []
            return items
        if self._error is not None:
            raise self._error
        return None

    def fail(self, exc: Exception) -> None:
        """End the stream early with ``exc``: the consumer gets what arrived, then the error."""
        self._error = exc
        self._done = True
        self._task.cancel()
        self._wakeup.set()

    async def aclose(self) -> None:
        """Stop reading: cancel the producer, which closes the source, and wait for it."""
        task = self._task
        if not task.done():
            task.cancel()
            # asyncio.wait, not `await task`: the task's CancelledError must not be mistaken
            # for a cancellation of the caller, and the caller's own must still propagate.
            await asyncio.wait({task})
