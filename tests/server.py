"""Run the project under a real uvicorn process, sharing the test database and fake upstream."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``uvicorn project.asgi:application`` on a free loopback port, in its own process."""

    def __init__(
        self, database_name: str, upstream_url: str, settings: dict[str, Any] | None = None
    ) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "CHATPROXY_TEST_DATABASE_NAME": database_name,
            "CHATPROXY_TEST_UPSTREAM": upstream_url,
            "CHATPROXY_TEST_SETTINGS": json.dumps(settings or {}),
            "PYTHONUNBUFFERED": "1",
        }
        self.output: list[str] = []
        self.ready = threading.Event()
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "project.asgi:application",
             "--host", "127.0.0.1", "--port", str(self.port), "--timeout-graceful-shutdown", "5",
             "--loop", "asyncio"],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read_output, daemon=True)
        self.reader.start()
        if not self.ready.wait(timeout):
            self.stop()
            raise RuntimeError("uvicorn did not start:\n" + "".join(self.output))

    def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if "Application startup complete" in line or "Uvicorn running on" in line:
                self.ready.set()

    def terminate(self) -> None:
        """SIGTERM: the server's graceful shutdown."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        self._reap()
        return code

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up, like a worker that dies."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self._reap()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.process is None:
            return
        self.process.wait(10)
        self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
