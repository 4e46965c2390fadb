"""Benchmark chatproxy's HTTP stream against the fake upstream it relays, read directly.

    python -m bench.run [--scenarios latency,throughput,hold] [--json bench/results/latest.json]
                        [--coalesce] [--limits] [--turns N] [--formats]

``--coalesce`` sets CHATPROXY_COALESCE_DELTAS. One user drives all the load, so the per-user
CHATPROXY_RATE_LIMIT and CHATPROXY_MAX_STREAMS are off unless ``--limits`` keeps their defaults;
every other setting keeps the demo project's value, except those ``bench.settings`` names.
``--turns N`` runs every scenario with N turns instead of its own number (and at most N at
once): a quick check that everything runs, whose figures are not the scenarios'. ``--formats``
also runs the throughput scenario's turns over each wire format, alternated (``bench.formats``).

Per scenario, on a fresh copy of a migrated SQLite database (IMMEDIATE/WAL, as the demo project):

1. the fake upstream (``tests.fake_upstream``) starts with the scenario's token count and delay;
2. the demo project starts under uvicorn (one worker, asyncio's loop, httptools, ``--backlog 2048``,
   no access log) with ``bench.settings``, pinned to core 0; this process (the load client) and
   the upstream are pinned to core 1;
3. preflight: no session gets 401, a session without the CSRF header gets 403, then 3 warm-up
   turns (logged in for real: a user and an auth session in the database, the ``sessionid`` and
   ``csrftoken`` cookies and the matching ``X-CSRFToken`` header on every request);
4. the floor: the same load against the upstream directly (``POST /v1/chat/completions``);
5. the measured run through chatproxy (``POST /completions``), then the saved answers are checked.

Scenarios:

- ``latency``: 1 connection, 30 turns of 50 tokens 20 ms apart.
- ``throughput``: 50 connections, 500 turns of 200 tokens, no delay.
- ``hold``: 1,000 connections, one turn each of 100 tokens 50 ms apart (about 5 s per turn).
- ``tools``: 50 connections, 500 turns, each 100 reasoning tokens, then 200 answer tokens, then
  two tool calls (their arguments in pieces of 8 characters), no delay: the throughput load with
  the rest of the protocol. Its CPU is per 1,000 answer tokens, like the others', and per
  1,000 deltas of any kind (reasoning, answer, tool-call pieces: 310 a turn), which compares
  it with a text-only turn.

Figures (times in ms, from writing the request; percentiles over the turns that succeeded):

- first line: time to the first body line (chatproxy's ``analyzing``, sent before the upstream is
  called; upstream: its first SSE event, the role chunk);
- first token: time to the first content (chatproxy's first ``answering`` line; upstream: the
  first delta with content), shown for chatproxy and, as "direct", for the upstream alone;
- total: time to the end of the body; ``+first line`` (the added time to first byte),
  ``+first token`` and ``+total``: chatproxy's percentile minus the direct one at the same
  percentile (what the relay adds);
- turns/s, tokens/s: successful turns and their upstream tokens over the measured wall time
  (direct in parentheses);
- server CPU ms/1k tok: the uvicorn process's utime+stime (``/proc/<pid>/stat``, all threads)
  over the measured run, per 1,000 relayed tokens; server core %: that CPU over the wall time
  (100 = the server's core is saturated). The JSON splits it between the event-loop thread and
  the others, and those between the threads alive for the whole run (chatproxy's database
  thread) and the rest (the thread Django starts for each request's synchronous middleware);
- peak RSS: the server's ``VmHWM`` (its high-water mark since start, warm-up included);
  peak threads: the most threads the server had during the run (sampled every 0.25 s);
- ok: turns whose client-assembled text equals the upstream's text byte for byte and that ended
  with ``completed``; bad text: turns that completed with another text; errors: every other
  turn, by cause (the error event's code, the 4xx body's code, or a client-side failure);
- DB ok/started: answers saved with exactly the upstream's text and status ``completed``, over the
  turns (warm-up included) whose ``analyzing`` event gave the client an answer id; "rows" is
  shown when the table holds another number of assistant rows.

The throughput scenario then measures the Django floors at the same load (``bench/urls.py``):
``POST /bench/floor``, an async view behind the same middleware that loads the session's user
and streams one line, and ``POST /bench/floor/bare``, which only streams the line, in four
slices alternated with as many more chatproxy turns (their saved answers are checked too, so "DB
ok/started" counts them). The floor's server CPU per request is Django's share of a turn, before
chatproxy does anything; the turn's minus the floor's is chatproxy's own, measured side by side
so the machine's drift hits both alike. The latency and hold scenarios run both floors once at
their own load after the measured run, for how soon Django alone gets a first line out: a bound
on any view's time to first byte, chatproxy's included. All are printed under the table.

With ``BENCH_PROFILE=<dir>`` (and ``pip install py-spy``), py-spy samples the server during
each measured run into ``<dir>/<scenario>.txt``; such runs are for explaining, not publishing.

A Markdown table goes to stdout; all figures (per-turn times included), the server's warnings
and errors and machine information go to the JSON file (``bench/results/`` is git-ignored).
Everything has a timeout and every child process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from bench import formats
from bench.client import Mode, TurnResult, http_request, run_load
from tests.fake_upstream import bench_reply

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, CLIENT_CORE = 0, 1
WARMUP_TURNS = 3
SCENARIO_TIMEOUT = 300.0  # seconds for one scenario, start to finish (--formats included)
TURN_TIMEOUT = 60.0
START_TIMEOUT = 30.0
PROMPT = b'{"messages":[{"role":"user","content":"Tell me something."}]}'
# What chatproxy sends upstream (the model is the settings' default; usage is asked for).
DIRECT_BODY = (
    b'{"model":"bench-model","messages":[{"role":"user","content":"Tell me something."}],'
    b'"stream":true,"stream_options":{"include_usage":true}}'
)
ERROR_MARKERS = re.compile(r"Traceback|ERROR|CRITICAL|WARNING|locked|Exception", re.IGNORECASE)


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    turns: int
    tokens: int
    delay: float  # seconds between upstream tokens
    # Also measure the Django floors (bench/urls.py) at the same load: "alternated" slice by
    # slice with chatproxy turns, for CPU per request; "after", once each after the measured
    # run, for the time to the first line.
    floor: Literal["", "alternated", "after"] = ""
    reasoning: int = 0  # reasoning tokens before the answer
    tool_calls: int = 0  # tool calls after it

    @property
    def deltas(self) -> int:
        """The upstream chunks carrying a delta per turn: reasoning, tokens, tool-call pieces."""
        return bench_reply(self.tokens, self.delay, None, self.reasoning, self.tool_calls).deltas()


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("latency", concurrency=1, turns=30, tokens=50, delay=0.02, floor="after"),
        Scenario(
            "throughput", concurrency=50, turns=500, tokens=200, delay=0.0, floor="alternated"
        ),
        Scenario("hold", concurrency=1000, turns=1000, tokens=100, delay=0.05, floor="after"),
        Scenario(
            "tools", concurrency=50, turns=500, tokens=200, delay=0.0, reasoning=100, tool_calls=2
        ),
    )
}


def expected_text(tokens: int) -> str:
    """The fake upstream's answer: token i is ``f"t{i} "`` (its default token text)."""
    return "".join(f"t{i} " for i in range(tokens))


# --- child processes -------------------------------------------------------------------------


class Child:
    """A child process pinned to one core, its output (stdout and stderr) kept line by line."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, ready: str) -> None:
        self.name, self.proc, self.output = name, proc, list[str]()
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._marker = ready
        self._reader = asyncio.create_task(self._read())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(
        cls, name: str, args: list[str], *, core: int | None, ready: str, env: dict[str, str]
    ) -> Child:
        """Start ``args`` and return once a line containing ``ready`` was printed."""
        prefix = (
            ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []
        )
        proc = await asyncio.create_subprocess_exec(
            *prefix, *args, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        if core is not None and not prefix:
            os.sched_setaffinity(proc.pid, {core})
        child = cls(name, proc, ready)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await child._ready
        except BaseException:
            await child.stop()
            raise
        return child

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self.output.append(text)
            if not self._ready.done() and self._marker in text:
                self._ready.set_result(None)
        if not self._ready.done():
            tail = "\n".join(self.output[-30:])
            self._ready.set_exception(RuntimeError(f"{self.name} exited before ready:\n{tail}"))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        await asyncio.wait({self._reader}, timeout=5)  # the output, up to EOF
        self._reader.cancel()
        if not self._ready.done():
            self._ready.cancel()

    def problems(self) -> list[str]:
        """Output lines that look like warnings or errors."""
        return [line for line in self.output if ERROR_MARKERS.search(line)]


def summarize_problems(lines: list[str]) -> dict[str, int]:
    """Count the distinct warning/error lines of a child's output."""
    return dict(Counter(line.strip()[:200] for line in lines).most_common(20))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from ``/proc/<pid>/stat``."""
    return cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU of the main thread (the event loop). The rest of the process's CPU is its other
    threads', e.g. the sync_to_async threads running database work, which may have ended."""
    return cpu_seconds_of(Path(f"/proc/{pid}/task/{pid}/stat"))


def kept_threads_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU of each thread but the main one, by thread id (those alive now)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name != str(pid):
            with contextlib.suppress(OSError):  # it ended meanwhile
                out[int(task.name)] = cpu_seconds_of(task / "stat")
    return out


def cpu_seconds_of(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all processes used, all cores together, from the first line of ``/proc/stat``."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def listen_drops() -> dict[str, int]:
    """The kernel's counters of connections dropped at a full listen backlog (all sockets)."""
    with contextlib.suppress(OSError):
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names[0] == "TcpExt:":
                table = dict(zip(names[1:], map(int, values[1:]), strict=False))
                return {k: table.get(k, 0) for k in ("ListenOverflows", "ListenDrops")}
    return {}


def proc_status(pid: int, key: str) -> int:
    """A number from ``/proc/<pid>/status``: kB for ``VmRSS``/``VmHWM``, a count for ``Threads``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class PeakSampler:
    """Samples a ``/proc/<pid>/status`` figure (e.g. ``Threads``) every 0.25 s, keeping its peak."""

    def __init__(self, pid: int, key: str) -> None:
        self.peak = 0
        self._task = asyncio.create_task(self._run(pid, key))

    async def _run(self, pid: int, key: str) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, proc_status(pid, key))
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.wait({self._task})


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    return {**env, "DJANGO_SETTINGS_MODULE": "bench.settings", "PYTHONUNBUFFERED": "1"}


# --- the database ----------------------------------------------------------------------------


def prepare_database() -> None:
    """Run in a subprocess (``--prepare``): migrate BENCH_DB, create a user and log it in.

    The session holds what ``django.contrib.auth.login`` stores; prints its key as JSON.
    """
    import django

    django.setup()
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore
    from django.core.management import call_command

    from chatproxy.models import ApiKey

    call_command("migrate", verbosity=0, interactive=False)
    user = User.objects.create_user("bench", password=secrets.token_urlsafe(16))
    _, api_key = ApiKey.objects.issue(user, "bench")
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    print(json.dumps({"sessionid": session.session_key, "api_key": api_key}))


def prepare_template(database: Path, tree: Path = ROOT) -> tuple[str, str]:
    """Run ``prepare_database`` in a subprocess, with ``tree``'s code and migrations, into
    ``database``; return the logged-in session's key and the user's API key."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--prepare"],
        cwd=tree, env=base_env() | {"BENCH_DB": str(database)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"preparing the database failed:\n{done.stdout}\n{done.stderr}")
    prepared = json.loads(done.stdout.strip().splitlines()[-1])
    return str(prepared["sessionid"]), str(prepared.get("api_key", ""))


def copy_database(source: Path, target: Path) -> None:
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def check_database(path: Path, text: str, message_ids: list[str]) -> dict[str, Any]:
    """Compare the saved answer of every turn the client saw start (its ``analyzing`` event's
    ``message_id``) with the upstream's text; also count every assistant row by status."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT id, content, status, error_code FROM chatproxy_message WHERE role = 'assistant'"
        ).fetchall()
    by_id = {uuid.UUID(row[0]).hex: row[1:] for row in rows}
    wanted = [uuid.UUID(mid).hex for mid in message_ids]
    found = [by_id[mid] for mid in wanted if mid in by_id]
    return {
        "expected": len(wanted),
        "missing": len(wanted) - len(found),
        "ok": sum(1 for content, status, _ in found if content == text and status == "completed"),
        "completed_bad_text": sum(
            1 for c, status, _ in found if status == "completed" and c != text
        ),
        "rows": len(rows),
        "statuses": dict(Counter(f"{st}/{code}" if code else st for _, _, st, code in rows)),
    }


# --- figures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def stats(values_s: Sequence[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values_s]
    out: dict[str, float | None] = {f"p{p}": percentile(ms, p) for p in (50, 90, 99)}
    out |= {"min": min(ms, default=None), "max": max(ms, default=None)}
    out["mean"] = sum(ms) / len(ms) if ms else None
    return out


def max_open_streams(results: list[TurnResult]) -> int:
    """The most streams open at once, as the client saw them: from a 200 response's first line
    to its end."""
    edges = [
        edge
        for r in results
        if r.status == 200 and r.ttfb is not None and r.total is not None
        for edge in ((r.started + r.ttfb, 1), (r.started + r.total, -1))
    ]
    most = now = 0
    for _, step in sorted(edges):
        now += step
        most = max(most, now)
    return most


def summarize(results: list[TurnResult], text: str, wall: float, tokens: int) -> dict[str, Any]:
    t0 = min((r.started for r in results if r.started), default=0.0)
    good_end = ("completed", "done")
    ok = [r for r in results if r.terminal in good_end and not r.error and r.text == text]
    bad_text = [r for r in results if r.terminal in good_end and not r.error and r.text != text]
    counted = {id(r) for r in (*ok, *bad_text)}
    errors = Counter(
        r.error or f"ended with {r.terminal or 'nothing'}" for r in results if id(r) not in counted
    )
    example = None
    if bad_text:
        got = bad_text[0].text
        at = next((i for i, (a, b) in enumerate(zip(got, text, strict=False)) if a != b), None)
        example = {"got_chars": len(got), "want_chars": len(text), "first_diff_at": at}
    return {
        "turns": len(results),
        "ok": len(ok),
        "bad_text": len(bad_text),
        "bad_text_example": example,
        "errors": dict(errors),
        "http_statuses": dict(Counter(r.status for r in results)),
        "wall_s": wall,
        "turns_per_s": len(ok) / wall if wall else None,
        "tokens_per_s": len(ok) * tokens / wall if wall else None,
        "content_lines_per_turn": (sum(r.lines for r in ok) / len(ok)) if ok else None,
        "first_line_ms": stats([r.ttfb for r in ok if r.ttfb is not None]),
        "first_token_ms": stats([r.ttft for r in ok if r.ttft is not None]),
        "total_ms": stats([r.total for r in ok if r.total is not None]),
        "max_open_streams": max_open_streams(results),
        # Per turn: [start (from the run's first request), first line, first token, total].
        "raw_ms": [
            [_ms(r.started - t0 if r.started else None), _ms(r.ttfb), _ms(r.ttft), _ms(r.total)]
            for r in sorted(results, key=lambda r: r.index)
        ],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def added(proxy: dict[str, Any], direct: dict[str, Any], key: str) -> dict[str, float | None]:
    """chatproxy's percentile minus the direct one, per percentile."""
    out: dict[str, float | None] = {}
    for p in ("p50", "p90", "p99"):
        a, b = proxy[key][p], direct[key][p]
        out[p] = None if a is None or b is None else a - b
    return out


# --- one scenario ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    tmp: Path
    template_db: Path
    sessionid: str
    csrftoken: str
    coalesce: bool
    limits: bool
    uvicorn_args: tuple[str, ...]
    api_key: str = ""
    formats: bool = False


async def preflight(port: int, ctx: Context, text: str) -> dict[str, Any]:
    """Check that auth is really enforced, then warm up with a few real turns."""

    async def one(headers: dict[str, str]) -> TurnResult:
        request = http_request(port, "/completions", PROMPT, headers)
        results, _ = await run_load(port, request, "ndjson", concurrency=1, turns=1)
        return results[0]

    cookie = f"sessionid={ctx.sessionid}; csrftoken={ctx.csrftoken}"
    anonymous = await one({})
    no_csrf = await one({"Cookie": cookie})
    warm = [await one(auth_headers(ctx)) for _ in range(WARMUP_TURNS)]
    return {
        "anonymous": f"{anonymous.status} {anonymous.error}",
        "no_csrf_header": f"{no_csrf.status} {no_csrf.error}",
        "auth_enforced": anonymous.status == 401 and no_csrf.status == 403,
        "warmup_ok": sum(1 for r in warm if r.terminal == "completed" and r.text == text),
        "warmup_ids": [r.message_id for r in warm if r.message_id],
        "warmup_errors": [r.error for r in warm if r.error],
    }


def auth_headers(ctx: Context) -> dict[str, str]:
    return {
        "Cookie": f"sessionid={ctx.sessionid}; csrftoken={ctx.csrftoken}",
        "X-CSRFToken": ctx.csrftoken,
    }


async def run_scenario(sc: Scenario, ctx: Context) -> dict[str, Any]:
    text = expected_text(sc.tokens)
    db = ctx.tmp / f"{sc.name}.sqlite3"
    copy_database(ctx.template_db, db)
    up_port, srv_port = free_port(), free_port()
    env = base_env() | {
        "BENCH_DB": str(db),
        "BENCH_UPSTREAM_URL": f"http://127.0.0.1:{up_port}/v1",
        "BENCH_COALESCE": "1" if ctx.coalesce else "0",
        "BENCH_LIMITS": "1" if ctx.limits else "0",
    }
    py = sys.executable
    upstream_args = [py, "-m", "tests.fake_upstream", "--port", str(up_port)]
    upstream_args += ["--tokens", str(sc.tokens), "--delay", str(sc.delay)]
    if sc.reasoning or sc.tool_calls:
        upstream_args += ["--reasoning", str(sc.reasoning), "--tool-calls", str(sc.tool_calls)]
    server_args = [py, "-m", "uvicorn", "project.asgi:application", "--host", "127.0.0.1"]
    server_args += ["--port", str(srv_port), *ctx.uvicorn_args]
    upstream = server = None
    out: dict[str, Any] = {"scenario": asdict(sc), "loadavg_before": os.getloadavg()}
    proxy_ids: list[str] = []
    try:
        upstream = await Child.start(
            "upstream", upstream_args, core=CLIENT_CORE, ready="listening on", env=env
        )
        server = await Child.start(
            "server", server_args, core=SERVER_CORE, ready="Uvicorn running on", env=env
        )
        out["preflight"] = await preflight(srv_port, ctx, text)

        direct_request = http_request(
            up_port, "/v1/chat/completions", DIRECT_BODY, {"Authorization": "Bearer sk-bench"}
        )
        results, wall = await load(up_port, direct_request, "sse", sc)
        out["direct"] = summarize(results, text, wall, sc.tokens)

        proxy_request = http_request(srv_port, "/completions", PROMPT, auth_headers(ctx))
        pids = {"server": server.pid, "upstream": upstream.pid}
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        own0, rss0 = sum(os.times()[:2]), proc_status(server.pid, "VmRSS")
        main0, drops0 = main_thread_cpu_seconds(server.pid), listen_drops()
        kept0 = kept_threads_cpu_seconds(server.pid)
        busy0 = machine_busy_seconds()
        peak_threads = PeakSampler(server.pid, "Threads")
        profiler = await start_profiler(server.pid, sc.name)
        try:
            results, wall = await load(srv_port, proxy_request, "ndjson", sc)
        finally:
            await peak_threads.stop()
            await stop_profiler(profiler)
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        main = main_thread_cpu_seconds(server.pid) - main0
        kept1 = kept_threads_cpu_seconds(server.pid)
        kept = sum(kept1[tid] - kept0[tid] for tid in kept0.keys() & kept1.keys())
        threads = {
            "event_loop_thread": main,
            "other_threads": cpu["server"] - main,
            # of which: threads alive for the whole run (chatproxy's database thread), and
            # the rest (Django's per-request threads, which ended, and any started meanwhile)
            "kept_threads": kept,
            "other_threads_not_kept": cpu["server"] - main - kept,
        }
        drops = {k: v - drops0.get(k, 0) for k, v in listen_drops().items()}
        cpu["client"] = sum(os.times()[:2]) - own0
        # What everything else on the machine used meanwhile: other load skews the figures.
        cpu["others"] = max(0.0, machine_busy_seconds() - busy0 - sum(cpu.values()))
        proxy = summarize(results, text, wall, sc.tokens)
        proxy_ids = [r.message_id for r in results if r.message_id]
        relayed = proxy["ok"] * sc.tokens
        proxy |= {
            "relayed_tokens": relayed,
            "cpu_s": cpu,
            "server_thread_cpu_s": threads,
            "listen_backlog_drops": drops,
            "server_cpu_ms_per_1k_tokens": cpu["server"] * 1e6 / relayed if relayed else None,
            # Per upstream delta of any kind: what compares a turn with reasoning and tool
            # calls with a text-only one (the same as per token for text).
            "deltas_per_turn": sc.deltas,
            "server_cpu_ms_per_1k_deltas": (
                cpu["server"] * 1e6 / (proxy["ok"] * sc.deltas) if relayed else None
            ),
            "server_core_pct": 100 * cpu["server"] / wall,
            "client_core_pct": 100 * (cpu["client"] + cpu["upstream"]) / wall,
            "others_core_pct": 100 * cpu["others"] / wall,
            "server_rss_before_kb": rss0,
            "server_rss_after_kb": proc_status(server.pid, "VmRSS"),
            "server_peak_rss_kb": proc_status(server.pid, "VmHWM"),
            "server_peak_threads": peak_threads.peak,
        }
        proxy["server_cpu_ms_per_turn"] = cpu["server"] * 1e3 / proxy["ok"] if proxy["ok"] else None
        if sc.floor == "alternated":
            out["django_floor"], extra_ids = await measure_floor(
                srv_port, server.pid, ctx, sc, proxy_request, text
            )
            proxy_ids += extra_ids
        elif sc.floor == "after":
            out["django_floor_times"] = await measure_floor_times(srv_port, server.pid, ctx, sc)
        if ctx.formats and sc.name == "throughput":
            out["formats"], extra_ids = await formats.measure(
                srv_port, lambda: cpu_seconds(server.pid), ctx.api_key, sc.concurrency,
                sc.turns * formats.TURNS_FACTOR, sc.tokens, text, TURN_TIMEOUT,
            )  # fmt: skip
            proxy_ids += extra_ids
        proxy["added_first_line_ms"] = added(proxy, out["direct"], "first_line_ms")
        proxy["added_first_token_ms"] = added(proxy, out["direct"], "first_token_ms")
        proxy["added_total_ms"] = added(proxy, out["direct"], "total_ms")
        out["proxy"] = proxy
    finally:
        for child in (server, upstream):
            if child is not None:
                await child.stop()
                out[f"{child.name}_problems"] = summarize_problems(child.problems())
                out[f"{child.name}_output_tail"] = child.output[-300:]
                out[f"{child.name}_exit_code"] = child.proc.returncode
    ids = out.get("preflight", {}).get("warmup_ids", []) + proxy_ids
    out["database"] = check_database(db, text, ids)
    return out


FLOOR_NAMES = {"floor": "floor (session user, one line)", "bare": "bare floor (one line)"}
FLOOR_ROUNDS = 4  # alternated slices of the floor and of chatproxy, so drift hits both alike


async def measure_floor(
    port: int, pid: int, ctx: Context, sc: Scenario, proxy_request: bytes, text: str
) -> tuple[dict[str, Any], list[str]]:
    """The same load against the Django floor (``bench/urls.py``), alternated slice by slice
    with as many chatproxy turns: what Django's share of a turn costs (the same session
    authentication and middleware, before chatproxy does anything), and what chatproxy adds
    on top of it, measured side by side so the machine's drift affects both alike. Returns the
    figures and the answer ids of the extra turns (their saved answers are checked too)."""
    requests = floor_requests(port, ctx) | {"turn": proxy_request}
    part = Scenario(sc.name, sc.concurrency, sc.turns // FLOOR_ROUNDS, sc.tokens, sc.delay)
    cpu = dict.fromkeys(requests, 0.0)
    ok = dict.fromkeys(requests, 0)
    ids: list[str] = []
    for _ in range(FLOOR_ROUNDS):
        for name, request in requests.items():
            cpu0 = cpu_seconds(pid)
            results, wall = await load(port, request, "ndjson", part)
            cpu[name] += cpu_seconds(pid) - cpu0
            ok[name] += summarize(results, text if name == "turn" else "", wall, 0)["ok"]
            ids += [r.message_id for r in results if r.message_id]
    per = {k: cpu[k] * 1e3 / ok[k] if ok[k] else None for k in cpu}
    own = per["turn"] - per["floor"] if per["turn"] and per["floor"] else None
    figures = {
        "requests_each": part.turns * FLOOR_ROUNDS,
        "ok": ok,
        "server_cpu_ms_per_request": per,
        # Django's share per 1,000 tokens, as if each floor request had relayed the scenario's
        # tokens, and chatproxy's own: the turn minus the floor.
        "floor_ms_per_1k_tokens": per["floor"] * 1e3 / sc.tokens if per["floor"] else None,
        "chatproxy_own_ms_per_turn": own,
        "chatproxy_own_ms_per_1k_tokens": own * 1e3 / sc.tokens if own else None,
    }
    return figures, ids


def floor_requests(port: int, ctx: Context) -> dict[str, bytes]:
    """The floor (session user, one line) and the bare floor (one line), logged in alike."""
    return {
        name: http_request(port, path, PROMPT, auth_headers(ctx))
        for name, path in (("floor", "/bench/floor"), ("bare", "/bench/floor/bare"))
    }


async def measure_floor_times(port: int, pid: int, ctx: Context, sc: Scenario) -> dict[str, Any]:
    """The scenario's load (its concurrency and number of requests) against each Django floor,
    once, after the measured run: how soon Django alone, behind the same middleware, gets a
    first line out, which bounds how soon any view's first byte can, chatproxy's included."""
    figures: dict[str, Any] = {}
    for name, request in floor_requests(port, ctx).items():
        cpu0 = cpu_seconds(pid)
        results, wall = await load(port, request, "ndjson", sc)
        cpu = cpu_seconds(pid) - cpu0
        done = summarize(results, "", wall, 0)
        figures[name] = {
            "ok": done["ok"],
            "turns": done["turns"],
            "errors": done["errors"],
            "first_line_ms": done["first_line_ms"],
            "total_ms": done["total_ms"],
            "server_cpu_ms_per_request": cpu * 1e3 / done["ok"] if done["ok"] else None,
        }
    return figures


async def start_profiler(pid: int, name: str) -> asyncio.subprocess.Process | None:
    """With BENCH_PROFILE=<dir>, sample the server with py-spy during the measured run
    (collapsed stacks of the threads running on a CPU, in ``<dir>/<scenario>.txt``; set
    BENCH_PROFILE_GIL=1 for the thread holding the GIL instead). The samples cost the server
    little, but py-spy takes CPU on the machine: profile, don't publish figures."""
    folder = os.environ.get("BENCH_PROFILE")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    args = ["py-spy", "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
    args += ["--threads", "--nonblocking", "-o", str(Path(folder) / f"{name}.txt")]
    if os.environ.get("BENCH_PROFILE_GIL") == "1":
        args.append("--gil")
    program = shutil.which(args[0]) or str(Path(sys.executable).parent / args[0])
    if not Path(program).exists():
        raise SystemExit("BENCH_PROFILE needs py-spy: pip install py-spy")
    proc = await asyncio.create_subprocess_exec(
        program,
        *args[1:],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return proc


async def stop_profiler(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), 60)


async def load(
    port: int, request: bytes, mode: Mode, sc: Scenario
) -> tuple[list[TurnResult], float]:
    return await run_load(
        port, request, mode, concurrency=sc.concurrency, turns=sc.turns, turn_timeout=TURN_TIMEOUT
    )


# --- report ----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    head = [
        "scenario", "ok/turns", "bad text", "errors", "DB ok/started",
        "first line p50/p99", "+first line p50/p90", "first token p50/p90 (direct)",
        "+first token p50/p90",
        "total p50/p90 (direct)", "+total p50/p90", "turns/s", "tokens/s",
        "server CPU ms/1k tok", "server core %", "peak RSS MB", "peak threads",
    ]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        name = r["scenario"]["name"]
        if "proxy" not in r:
            failure = r.get("failure", "?").strip().splitlines()[-1][:200]
            rows.append(f"| {name} | failed: {failure} |" + " |" * (len(head) - 2))
            continue
        p, d, db = r["proxy"], r["direct"], r["database"]
        errors = sum(p["errors"].values())
        extra_rows = db["rows"] != db["expected"]
        by_code = ", ".join(f"{code}: {n}" for code, n in p["errors"].items())

        def two(stat: dict[str, Any], lo: str, hi: str, digits: int = 1) -> str:
            return f"{_f(stat[lo], digits)} / {_f(stat[hi], digits)}"

        cells = [
            name,
            f"{p['ok']}/{p['turns']}",
            str(p["bad_text"]),
            str(errors) + (f" ({by_code})" if errors else ""),
            f"{db['ok']}/{db['expected']}" + (f" ({db['rows']} rows)" if extra_rows else ""),
            two(p["first_line_ms"], "p50", "p99"),
            two(p["added_first_line_ms"], "p50", "p90"),
            f"{two(p['first_token_ms'], 'p50', 'p90')} ({two(d['first_token_ms'], 'p50', 'p90')})",
            two(p["added_first_token_ms"], "p50", "p90"),
            f"{two(p['total_ms'], 'p50', 'p90', 0)} ({two(d['total_ms'], 'p50', 'p90', 0)})",
            two(p["added_total_ms"], "p50", "p90"),
            f"{_f(p['turns_per_s'], 1)} ({_f(d['turns_per_s'], 1)})",
            f"{_f(p['tokens_per_s'])} ({_f(d['tokens_per_s'])})",
            _f(p["server_cpu_ms_per_1k_tokens"], 1)
            + (
                f" ({_f(p['server_cpu_ms_per_1k_deltas'], 1)} per 1k deltas)"
                if p["deltas_per_turn"] != r["scenario"]["tokens"]
                else ""
            ),
            _f(p["server_core_pct"]),
            _f(p["server_peak_rss_kb"] / 1024, 1),
            str(p["server_peak_threads"]),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    def read(path: str) -> str:
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip()
        return ""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    versions = {}
    for dist in ("django", "uvicorn", "uvloop", "httptools", "openai", "httpx2", "orjson"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "somaxconn": read("/proc/sys/net/core/somaxconn"),
        "tcp_max_syn_backlog": read("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty_files": git("status", "--porcelain").splitlines(),
        "versions": versions,
    }


# --- main ------------------------------------------------------------------------------------


def uvicorn_args() -> tuple[str, ...]:
    args = ["--no-access-log", "--backlog", "2048", "--lifespan", "off"]
    args += ["--timeout-graceful-shutdown", "5"]
    args += ["--loop", "asyncio"]  # as docs/deployment.md runs it: uvloop measured slower
    if importlib.util.find_spec("httptools"):
        args += ["--http", "httptools"]
    return tuple(args)


async def main_async(
    names: list[str],
    coalesce: bool,
    limits: bool,
    tmp: Path,
    turns: int | None = None,
    wire_formats: bool = False,
) -> list[dict[str, Any]]:
    template = tmp / "template.sqlite3"
    sessionid, api_key = prepare_template(template)
    csrftoken = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    ctx = Context(
        tmp, template, sessionid, csrftoken, coalesce, limits, uvicorn_args(), api_key,
        wire_formats,
    )  # fmt: skip
    results = []
    for name in names:
        sc = SCENARIOS[name]
        if turns:
            sc = replace(sc, turns=turns, concurrency=min(sc.concurrency, turns))
        print(f"… {name}: {sc.concurrency} concurrent, {sc.turns} turns", file=sys.stderr)
        started = time.monotonic()
        try:
            async with asyncio.timeout(SCENARIO_TIMEOUT):
                result = await run_scenario(sc, ctx)
        except Exception as exc:  # report it and go on with the next scenario
            leaves = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
            result = {
                "scenario": asdict(sc),
                "failure": "; ".join(f"{type(e).__name__}: {e}" for e in leaves),
                "traceback": traceback.format_exception(exc),
            }
        result["elapsed_s"] = time.monotonic() - started
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--coalesce", action="store_true", help="CHATPROXY_COALESCE_DELTAS=True")
    parser.add_argument(
        "--limits",
        action="store_true",
        help="keep CHATPROXY_RATE_LIMIT and CHATPROXY_MAX_STREAMS at their defaults (off: one "
        "user drives all the load)",
    )
    parser.add_argument(
        "--turns", type=int, metavar="N", help="N turns per scenario: a quick check, not figures"
    )
    parser.add_argument(
        "--formats",
        action="store_true",
        help="also run the throughput turns over each wire format (NDJSON, SSE, OpenAI, UI)",
    )
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare_database()
        return
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    if unknown := [n for n in names if n not in SCENARIOS]:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    if args.turns is not None and args.turns < FLOOR_ROUNDS:
        parser.error(f"--turns must be at least {FLOOR_ROUNDS}, one per floor slice")

    info = machine_info()
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {CLIENT_CORE})
    else:
        print("warning: fewer than 2 cores, nothing is pinned", file=sys.stderr)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with tempfile.TemporaryDirectory(prefix="chatproxy-bench-") as tmp, runner:
        results = runner.run(
            main_async(names, args.coalesce, args.limits, Path(tmp), args.turns, args.formats)
        )

    print(table(results))
    for r in results:
        for key in ("server_problems", "upstream_problems"):
            if r.get(key):
                lines = [f"{n} × {line}" for line, n in r[key].items()]
                print(f"\n{r['scenario']['name']} {key}:", *lines[:10], sep="\n  ")
        if (others := r.get("proxy", {}).get("others_core_pct", 0)) > 10:
            print(
                f"\nwarning: other processes used {others:.0f}% of a core during the measured "
                f"{r['scenario']['name']} run: its times and rates are noisy"
            )
        if (fl := r.get("django_floor")) and fl["chatproxy_own_ms_per_turn"] is not None:
            per = fl["server_cpu_ms_per_request"]
            print(
                f"\n{r['scenario']['name']}, alternated with the Django floor (bench/urls.py: "
                f"session user, one line; {fl['requests_each']} requests each, ok {fl['ok']}): "
                f"floor {_f(per['floor'], 2)} ms of server CPU per request, chatproxy turn "
                f"{_f(per['turn'], 2)} ms; chatproxy's own {_f(fl['chatproxy_own_ms_per_turn'], 2)}"
                f" ms per turn = {_f(fl['chatproxy_own_ms_per_1k_tokens'], 1)} ms per 1k tokens, "
                f"Django's {_f(fl['floor_ms_per_1k_tokens'], 1)}; the bare floor (one line) "
                f"{_f(per.get('bare'), 2)} ms per request"
            )
        for name, fl in r.get("django_floor_times", {}).items():
            first = fl["first_line_ms"]
            print(
                f"\n{r['scenario']['name']}, the Django {FLOOR_NAMES[name]} at the same load "
                f"after it (ok {fl['ok']}/{fl['turns']}): first line p50 {_f(first['p50'], 1)} / "
                f"p99 {_f(first['p99'], 1)} ms, "
                f"{_f(fl['server_cpu_ms_per_request'], 2)} ms of server CPU per request"
            )
        if fmt := r.get("formats"):
            print(f"\n{r['scenario']['name']}, {formats.summary(fmt)}")
        if (pre := r.get("preflight")) and not pre["auth_enforced"]:
            print(f"\n{r['scenario']['name']}: auth NOT enforced as expected: {pre}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": info, "coalesce": args.coalesce, "limits": args.limits}
    report["uvicorn"] = list(uvicorn_args())
    args.json.write_text(json.dumps(report | {"scenarios": results}, indent=1) + "\n")
    print(f"\nJSON: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
