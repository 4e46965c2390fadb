"""Where a turn's database writes run: a small pool of threads of chatproxy's own.

Django runs each ASGI request's synchronous work on a new thread, with a connection of its own.
Under load that is hundreds of threads; on SQLite they race for the single write lock and the
unlucky ones time out with "database is locked", since SQLite's busy wait is not a queue. The
turn's writes (start, checkpoints, final save) go through this pool instead: one thread for
SQLite, which allows one writer at a time anyway, so writes queue in order on one reused
connection; a few threads for other databases, which give their connection back after each write.
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


async def write(func: Callable[..., T], *args: Any) -> T:
    """Run ``func(*args)``, a synchronous database write, on the writer pool."""
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
