"""Parts of a turn, measured in-process, optionally alternated with another commit: figures for
one change at a time, with less noise than the whole-server scenarios of ``bench.run``.

    python -m bench.parts [--parts db,read,asgi] [--rounds 7] [--against REV] [--at REV]
                          [--json PATH]

Each round of each part runs in a fresh child process pinned to core 0 (the fake upstream,
when one is needed, to core 1). With ``--against REV`` every round also runs at REV (checked
out in a temporary git worktree), the two sides alternated so the machine's drift hits both
alike; ``--at REV`` measures REV instead of this working tree (so ``--at C --against C~1`` is
what commit C changed). Figures are the child's CPU time (``time.process_time()``: every
thread of it) over the measured part of the round; the table shows the median and the lowest
of the rounds.

- ``db``: the database work of a turn, as the HTTP view has it done: ``opening.open_turn``
  with ``auth.identify`` on a request that went through Django's session and auth middleware
  (a real session and the CSRF header: the session's and the user's ``SELECT``, the CSRF check,
  the limits, the first rows), then ``records.save`` of a completed answer. ms per turn.
- ``read``: ``upstream.AnswerStream`` reading answers of 100 tokens from the fake upstream, one
  token every 5 ms, 10 answers at a time, so that nearly every read brings one token (as every
  read does in the hold scenario). µs per token, the request included.
- ``asgi``: the demo project's ASGI application called directly (no server, no sockets to the
  client), alternating a turn of 200 tokens (``POST /completions``) with the Django floor
  (``POST /bench/floor``, see ``bench/urls.py``): chatproxy's own ms per turn, the floor's too.

``--against REV`` runs this file's parts on REV's code, so REV needs what they call:
``opening.open_turn``, ``records.save``, ``upstream.AnswerStream``, ``bench/urls.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.run import CLIENT_CORE, SERVER_CORE, base_env, copy_database, free_port

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"db": "ms per turn", "read": "µs per token", "asgi": "chatproxy's own ms per turn"}
BODY = b'{"messages":[{"role":"user","content":"Tell me something."}]}'
CSRF = "c" * 32


# --- the parts, in the child ---------------------------------------------------------------


def start_upstream(tokens: int, delay: float) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    args = [sys.executable, "-m", "tests.fake_upstream", "--port", str(port)]
    args += ["--tokens", str(tokens), "--delay", str(delay)]
    proc = subprocess.Popen(
        ["taskset", "-c", str(CLIENT_CORE), *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and "listening on" in proc.stdout.readline()
    return proc, f"http://127.0.0.1:{port}/v1"


async def part_db(sessionid: str) -> dict[str, float]:
    from django.contrib.auth.middleware import AuthenticationMiddleware
    from django.contrib.sessions.middleware import SessionMiddleware
    from django.http import HttpResponse
    from django.test import RequestFactory

    from chatproxy import auth, records
    from chatproxy.models import Status
    from chatproxy.payload import validate_request
    from chatproxy.upstream import Chunk

    try:
        from chatproxy.opening import open_turn
    except ImportError:  # a commit from before opening.py
        from chatproxy.pipeline import prepare_turn as open_turn

    factory = RequestFactory()
    factory.cookies["sessionid"], factory.cookies["csrftoken"] = sessionid, CSRF
    chat = validate_request(json.loads(BODY))
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}

    async def turn() -> None:
        request = factory.post(
            "/completions", BODY, content_type="application/json", headers={"X-CSRFToken": CSRF}
        )
        SessionMiddleware(lambda r: HttpResponse()).process_request(request)
        AuthenticationMiddleware(lambda r: HttpResponse()).process_request(request)
        started = await open_turn(functools.partial(auth.identify, request), chat)
        # Keywords: the same call on the commit before chunks.py, whose Chunk had 4 fields.
        chunk = Chunk(content="Something.", finish_reason="stop", usage=usage, response_id="c1")
        started.state.feed(chunk)
        started.state.end(Status.COMPLETED)
        assert await records.save(started)

    for _ in range(30):
        await turn()
    begin, n = time.process_time(), 300
    for _ in range(n):
        await turn()
    return {"value": (time.process_time() - begin) / n * 1000}


async def part_read(_: str) -> dict[str, float]:
    from chatproxy.upstream import AnswerStream, close_clients

    messages = [{"role": "user", "content": "Tell me something."}]
    counts = {"tokens": 0, "reads": 0}

    async def answer(i: int) -> None:
        stream = AnswerStream("bench-model", messages, {}, f"bench-{i}")
        try:
            while (batch := await stream.next_batch(15.0)) is not None:
                counts["reads"] += 1
                counts["tokens"] += sum(1 for chunk in batch if chunk.content)
        finally:
            await stream.aclose()

    await asyncio.gather(*(answer(i) for i in range(10)))  # warm-up
    counts.update(tokens=0, reads=0)
    begin = time.process_time()
    for wave in range(3):
        await asyncio.gather(*(answer(wave * 10 + i) for i in range(10)))
    spent = time.process_time() - begin
    await close_clients()
    assert counts["tokens"] == 3000, counts
    return {"value": spent / counts["tokens"] * 1e6, "reads_per_token": counts["reads"] / 3000}


async def part_asgi(sessionid: str) -> dict[str, float]:
    from project.asgi import application

    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
        (b"cookie", f"sessionid={sessionid}; csrftoken={CSRF}".encode()),
        (b"x-csrftoken", CSRF.encode()),
    ]

    async def post(path: str) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        body: list[bytes] = []
        finished = asyncio.Event()
        messages = iter([{"type": "http.request", "body": BODY, "more_body": False}])

        async def receive() -> dict[str, Any]:
            with contextlib.suppress(StopIteration):
                return next(messages)
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                assert message["status"] == 200, message
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if not message.get("more_body"):
                    finished.set()

        await application(scope, receive, send)
        last = b"".join(body).splitlines()[-1]
        assert b'"completed"' in last, last

    spent = {"/bench/floor": 0.0, "/completions": 0.0}
    for path in spent:
        for _ in range(30):
            await post(path)
    for _ in range(5):  # alternated slices
        for path in spent:
            begin = time.process_time()
            for _ in range(40):
                await post(path)
            spent[path] += time.process_time() - begin
    floor, turn = (spent[path] / 200 * 1000 for path in spent)
    return {"value": turn - floor, "floor_ms": floor, "turn_ms": turn}


def child(part: str, database: str, sessionid: str) -> None:
    """One round of one part (``--child``): print its figures as JSON."""
    upstream = None
    if part in ("read", "asgi"):
        tokens, delay = (100, 0.005) if part == "read" else (200, 0.0)
        upstream, os.environ["BENCH_UPSTREAM_URL"] = start_upstream(tokens, delay)
    os.environ["BENCH_DB"] = database
    try:
        import django
        import uvloop

        django.setup()
        run = {"db": part_db, "read": part_read, "asgi": part_asgi}[part]
        print(json.dumps(uvloop.run(run(sessionid))))
    finally:
        if upstream is not None:
            upstream.terminate()


# --- the parent --------------------------------------------------------------------------


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="chatproxy-parts-") as tmp:
        path = Path(tmp) / "tree"
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", "-q", str(path), rev], check=True)
        try:
            yield path
        finally:
            subprocess.run([*git, "remove", "--force", str(path)], check=False)


def one_round(tree: Path, part: str, template: Path, sessionid: str, tmp: Path) -> dict[str, Any]:
    database = tmp / f"{part}.sqlite3"
    database.unlink(missing_ok=True)
    copy_database(template, database)
    # This file, on the tree's code: at REV, chatproxy, the project and bench.run are REV's.
    args = ["taskset", "-c", str(SERVER_CORE), sys.executable, str(Path(__file__).resolve())]
    args += ["--child", part, "--database", str(database), "--session", sessionid]
    done = subprocess.run(
        args, cwd=tree, env=base_env() | {"PYTHONPATH": str(tree)},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{part} at {tree} failed:\n{done.stdout}\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def summary(rounds: list[dict[str, Any]]) -> dict[str, float]:
    values = [r["value"] for r in rounds]
    return {"median": statistics.median(values), "lowest": min(values)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="db,read,asgi")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--against", metavar="REV")
    parser.add_argument("--at", metavar="REV", help="measure REV instead of this tree")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--session", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.database, args.session)
    # Here, not at the top: a child runs this file on REV's bench.run, which may predate it.
    from bench.run import prepare_template

    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chatproxy-parts-")))
        sides = {"this tree": ROOT}
        if args.at:
            sides = {args.at: stack.enter_context(worktree(args.at))}
        if args.against:
            sides[args.against] = stack.enter_context(worktree(args.against))
        templates = {}
        for name, tree in sides.items():
            template = tmp / f"template-{len(templates)}.sqlite3"
            templates[name] = (template, prepare_template(template, tree)[0])
        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            n: {p: [] for p in parts} for n in sides
        }
        for i in range(args.rounds):
            for part in parts:
                for name, tree in sides.items():
                    figures = one_round(tree, part, *templates[name], tmp)
                    results[name][part].append(figures)
                    print(f"round {i + 1} {part} {name}: {figures}", file=sys.stderr)
    print("| part | unit | " + " | ".join(f"{n}: median (lowest)" for n in sides) + " |")
    print("|---|---|" + "---|" * len(sides))
    for part in parts:
        cells = [summary(results[n][part]) for n in sides]
        shown = " | ".join(f"{c['median']:.3f} ({c['lowest']:.3f})" for c in cells)
        print(f"| {part} | {PARTS[part]} | {shown} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rounds": args.rounds, "results": results}, indent=1))
    return None


if __name__ == "__main__":
    main()
