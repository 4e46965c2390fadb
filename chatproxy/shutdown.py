"""End in-flight turns cleanly when the server shuts down.

On SIGTERM, uvicorn (and daphne) stop accepting connections and wait for open responses, up to
uvicorn's ``--timeout-graceful-shutdown``, before cancelling them. A turn still streaming
CHATPROXY_SHUTDOWN_GRACE seconds after the signal is ended here instead, while the client is
still listening: it gets an ``error`` event with code ``server_shutdown`` and the answer is
saved ``interrupted``. Set the grace below the server's own timeout.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from types import FrameType
from typing import Protocol

from .conf import conf
from .exceptions import ServerShutdownError


class Stream(Protocol):
    def fail(self, exc: Exception) -> None: ...


_streams: set[Stream] = set()
_loop: asyncio.AbstractEventLoop | None = None
_installed = False
_draining = False


def track(stream: Stream) -> None:
    """Remember a running turn's upstream stream; install the SIGTERM hook on first use."""
    global _loop
    _loop = asyncio.get_running_loop()
    _streams.add(stream)
    if not _installed:
        _install()


def forget(stream: Stream) -> None:
    _streams.discard(stream)


def draining() -> bool:
    """Whether a SIGTERM has started the shutdown grace: the readiness signal. Installs the
    SIGTERM hook on first use, so a server that has run no turn yet notices it too."""
    global _loop
    if not _installed:
        _loop = asyncio.get_running_loop()
        _install()
    return _draining


def _install() -> None:
    # The server installs its own handler before the first request arrives; chain to it so
    # its graceful shutdown still starts. Signals can only be handled in the main thread.
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    _installed = True
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        loop = _loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_drain)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def _drain() -> None:
    global _draining
    if not _draining and _loop is not None:
        _draining = True
        _loop.call_later(conf.CHATPROXY_SHUTDOWN_GRACE, _end_all)


def _end_all() -> None:
    for stream in list(_streams):
        stream.fail(
            ServerShutdownError(
                "The server is restarting and stopped this answer. Send your message again."
            )
        )
