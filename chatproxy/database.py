"""Where chatproxy's database work runs: a small pool of threads of its own.

Django runs each ASGI request's synchronous work on a new thread, with a connection of its own.
Under load that is hundreds of threads; on SQLite each opens a connection (about 0.7 ms of CPU
with the WAL pragmas) and they race for the single write lock, the unlucky ones timing out with
"database is locked", since SQLite's busy wait is not a queue. Every thread hop also costs CPU.
So a turn's database work goes through this pool in as few trips as possible (one to start it,
one to finish it): one thread for SQLite, which allows one writer at a time anyway, so work
queues in order on one reused connection; a few threads for other databases, which give their
connection back after each trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.db import close_old_connections, connection

T = TypeVar("T")
THREAD_PREFIX = "chatproxy-db"

_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        workers = 1 if connection.vendor == "sqlite" else 4
        _executor = ThreadPoolExecutor(workers, thread_name_prefix=THREAD_PREFIX)
    return _executor


async def run(func: Callable[..., T], *args: Any) -> T:
    """Run ``func(*args)``, synchronous database work, on chatproxy's database thread(s)."""
    return await asyncio.get_running_loop().run_in_executor(_pool(), _call, func, args)


def _call(func: Callable[..., T], args: tuple[Any, ...]) -> T:
    try:
        return func(*args)
    except Exception:
        connection.close()  # a connection that failed is not worth keeping
        raise
    finally:
        if connection.vendor != "sqlite":
            close_old_connections()  # back to the pool (or closed, without one)
