"""The install guide, followed as written: docs/install.md's steps, in a fresh project.

The test builds the wheel, makes a new venv and ``django-admin startproject mysite``, then runs
the guide's code blocks in order, each as its ``<!-- step: … -->`` marker says: ``shell``
blocks in bash (what they export carries over to the next, as in one terminal), ``append`` and
``write`` blocks into the named file, each ``serve`` block as a server in the background, and
every ``try`` block against each server in turn. Only two things are swapped in: the built
wheel for the package name, and a free port for 8000. Docs and reality cannot drift apart.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import django
import httpx2
import orjson
import pytest

from chatproxy.demo import demo_reply
from tests.fake_upstream import Reply
from tests.server import free_port

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "install.md"
STEP = re.compile(r"<!-- step: (\w+)(?: (\S+))? -->\n```\w*\n(.*?)\n```", re.DOTALL)
HELLO = [{"role": "user", "content": "Hello"}]

pytestmark = pytest.mark.install


def steps() -> list[tuple[str, str, str]]:
    return [(kind, target or "", body) for kind, target, body in STEP.findall(GUIDE.read_text())]


def test_the_guide_has_each_kind_of_step():
    kinds = [kind for kind, _, _ in steps()]
    assert kinds.count("serve") == 2 and kinds.count("try") == 2
    assert {"shell", "append", "write"} <= set(kinds)


class Project:
    """A fresh venv and ``startproject mysite``, and the environment the guide's shell has."""

    def __init__(self, where: Path, wheel: Path) -> None:
        self.dir, self.wheel = where / "site", wheel
        venv = where / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CHATPROXY_"))},
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "VIRTUAL_ENV": str(venv),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("OPENAI_API_KEY", None)
        self.env.pop("OPENAI_BASE_URL", None)
        self.dir.mkdir()
        # The project's existing Django: the one this suite runs on.
        self.shell(f"pip install -q --disable-pip-version-check Django=={django.get_version()}")
        self.shell("django-admin startproject mysite .")

    def shell(self, script: str, **extra: str) -> str:
        """Run ``script`` in bash in the project; keep what it exports for the next one."""
        script = script.replace('"django-chatproxy[', f'"{self.wheel}[')
        done = subprocess.run(
            ["bash", "-c", f"set -euo pipefail\n{script}\nenv -0"],
            cwd=self.dir, env={**self.env, **extra}, capture_output=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        out, environment = _split(done.stdout.decode())
        self.env = dict(item.split("=", 1) for item in environment.split("\0") if "=" in item)
        return out

    @contextmanager
    def serve(self, command: str, port: int, **extra: str) -> Iterator[None]:
        log = self.dir.parent / f"server-{port}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.dir, env={**self.env, **extra}, start_new_session=True,
                stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            _wait_for_port(port, process, log)
            yield
        except BaseException:
            print(f"{command}:\n{log.read_text()[-5000:]}")
            raise
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=30)


def _split(stdout: str) -> tuple[str, str]:
    """The script's own output, and then `env -0`'s, which starts after the last newline
    before its first NUL."""
    cut = stdout[: stdout.find("\0")].rfind("\n") + 1
    return stdout[:cut], stdout[cut:]


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    # A bounded poll: a server says it listens in its own words, and each says it differently.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited:\n{log.read_text()[-5000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listened on {port} within 60 s:\n{log.read_text()[-5000:]}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), "."],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("*.whl")
    return built


def events_of(output: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_install_guide_streams_over_http_and_websocket_under_both_servers(
    tmp_path: Path, wheel: Path, upstream: Any
) -> None:
    project = Project(tmp_path, wheel)
    port = free_port()  # the guide's 8000, in every step: both servers take it in turn
    servers, tries = [], []
    for kind, target, written in steps():
        body = re.sub(r"\b8000\b", str(port), written)
        if kind == "shell":
            project.shell(body)
        elif kind == "append":
            with (project.dir / target).open("a") as file:
                file.write("\n" + body + "\n")
        elif kind == "write":
            (project.dir / target).write_text(body + "\n")
        elif kind == "serve":
            servers.append(body)
        elif kind == "try":
            tries.append(body)
    assert project.env["CHATPROXY_KEY"].startswith("cpx_")

    runserver, uvicorn = servers
    # runserver with a key, answered by the fake upstream; uvicorn without, by the demo model.
    variants = [
        (runserver, {"OPENAI_API_KEY": "sk-install", "OPENAI_BASE_URL": upstream.base_url}),
        (uvicorn, {}),
    ]
    for command, key in variants:
        with project.serve(command, port, **key):
            for body in tries:
                if key:
                    upstream.enqueue(Reply(tokens=["Hi ", "from ", "upstream."]))
                events = events_of(project.shell(body))
                assert [events[0]["event"], events[-1]["event"]] == ["analyzing", "completed"]
                text = "".join(e["content"] for e in events if e["event"] == "answering")
                if key:
                    assert events[0]["model"] == "gpt-4o-mini"
                    assert text == "Hi from upstream."
                    assert upstream.requests[-1].headers["authorization"] == "Bearer sk-install"
                else:
                    assert events[0]["model"] == "chatproxy-demo"
                    assert text == demo_reply(HELLO)
            assert_a_person_gets_in(f"http://127.0.0.1:{port}")


def assert_a_person_gets_in(base: str) -> None:
    with httpx2.Client(base_url=base, timeout=10) as browser:
        page = browser.get("/chat/")
        assert page.status_code == 302 and page.headers["location"].startswith("/admin/login/")
        browser.get("/admin/login/")
        login = browser.post(
            "/admin/login/?next=/chat/",
            data={
                "username": "admin",
                "password": "change-me",
                "csrfmiddlewaretoken": browser.cookies["csrftoken"],
                "next": "/chat/",
            },
        )
        assert login.status_code == 302 and login.headers["location"] == "/chat/"
        page = browser.get("/chat/")
        assert page.status_code == 200
        assert 'data-websocket-path="/ws/chat/"' in page.text  # the WebSocket switch is offered
        css = re.search(r'href="([^"]+chat\.css)"', page.text)
        assert css is not None
        style = browser.get(css.group(1))
        assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
