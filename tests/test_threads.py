"""Django's thread per request, reused (chatproxy.threads), and detached turns beside it."""

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.core.asgi import get_asgi_application
from django.core.signals import request_started
from django.db import connections

from chatproxy.signals import turn_finished
from chatproxy.threads import THREAD_PREFIX, ReusedThreads
from tests.conftest import asgi_application, http_scope, session_cookie
from tests.fake_upstream import Reply

db = pytest.mark.django_db(transaction=True)


@pytest.fixture
def request_threads() -> Iterator[list[threading.Thread]]:
    """The thread each request's ``request_started`` receivers ran on, in order."""
    threads: list[threading.Thread] = []

    def receiver(**kwargs: Any) -> None:
        threads.append(threading.current_thread())

    request_started.connect(receiver)
    yield threads
    request_started.disconnect(receiver)


async def get(app: Any, path: str = "/health") -> int:
    communicator = ApplicationCommunicator(app, http_scope(path, method="GET"))
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(5)
    while (await communicator.receive_output(5)).get("more_body"):
        pass
    await communicator.wait(5)
    return start["status"]


@db
async def test_requests_one_after_another_reuse_one_thread(request_threads):
    app = ReusedThreads(get_asgi_application())

    statuses = [await get(app) for _ in range(3)]

    assert statuses == [200, 200, 200]
    assert len(request_threads) == 3
    assert len(set(request_threads)) == 1
    assert request_threads[0].name.startswith(THREAD_PREFIX)
    assert request_threads[0] is not threading.current_thread()


@db
async def test_without_it_django_starts_a_thread_per_request(request_threads):
    app = get_asgi_application()

    for _ in range(3):
        await get(app)

    assert len(set(request_threads)) == 3


@db
async def test_two_requests_at_once_never_share_a_thread(request_threads):
    both_in = threading.Barrier(2, timeout=10)  # breaks, and fails the test, if one waits alone

    def meet(**kwargs: Any) -> None:
        both_in.wait()

    request_started.connect(meet)
    try:
        app = ReusedThreads(get_asgi_application())
        statuses = await asyncio.gather(get(app), get(app))
    finally:
        request_started.disconnect(meet)

    assert statuses == [200, 200]
    assert len(set(request_threads)) == 2
    assert not both_in.broken


async def test_a_thread_still_working_when_its_request_ends_is_not_handed_out():
    started, release = threading.Event(), threading.Event()
    ran_on: list[threading.Thread] = []

    def work(wait: bool) -> None:
        ran_on.append(threading.current_thread())
        if wait:
            started.set()
            release.wait(10)

    async def leaves_work_running(scope: Any, receive: Any, send: Any) -> None:
        call = asyncio.ensure_future(sync_to_async(work)(scope["path"] == "/slow"))
        if scope["path"] == "/slow":  # the request ends while its call still runs
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            call.cancel()
        else:
            await call

    app = ReusedThreads(leaves_work_running)
    try:
        await app({"type": "http", "path": "/slow"}, _never, _ignore)
        await app({"type": "http", "path": "/next"}, _never, _ignore)
        await app({"type": "http", "path": "/after"}, _never, _ignore)
    finally:
        release.set()

    slow, following, after = ran_on
    assert following is not slow
    assert after is following  # a thread that finished its work is reused
    assert app.idle and all(not thread.pending for thread in app.idle)


async def test_other_connections_pass_through_untouched():
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    wrapped = ReusedThreads(app)
    await wrapped({"type": "websocket"}, _never, _ignore)
    await wrapped({"type": "lifespan"}, _never, _ignore)

    assert seen == ["websocket", "lifespan"]
    assert wrapped.idle == []


async def test_idle_threads_kept_are_bounded():
    all_in, gate = asyncio.Event(), asyncio.Event()
    entered: list[None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await sync_to_async(entered.append)(None)  # each on a thread of its own
        if len(entered) == 5:
            all_in.set()
        await gate.wait()

    wrapped = ReusedThreads(app, keep=2)
    requests = [asyncio.ensure_future(wrapped({"type": "http"}, _never, _ignore)) for _ in range(5)]
    await all_in.wait()
    gate.set()
    await asyncio.gather(*requests)

    assert len(wrapped.idle) == 2


@db
async def test_a_detached_turn_runs_sync_receivers_after_its_request_ended(
    user, upstream, saved_answers
):
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(30)], delay=0.01))
    app = ApplicationCommunicator(
        asgi_application(), http_scope("/completions", cookies=await session_cookie(user))
    )
    await app.send_input(
        {
            "type": "http.request",
            "body": b'{"messages":[{"role":"user","content":"Hi"}],"detach":true}',
        }
    )
    assert (await app.receive_output(5))["status"] == 200
    analyzing = orjson.loads((await app.receive_output(5))["body"].splitlines()[0])
    await app.send_input({"type": "http.disconnect"})  # the client left; its request ends
    await app.wait(5)

    # saved_answers is a sync receiver of turn_finished: thread-sensitive work, after the end.
    saved = await asyncio.wait_for(saved_answers.get(), 10)

    assert str(saved.pk) == analyzing["message_id"]
    assert (saved.status, saved.content) == ("completed", "".join(f"w{i} " for i in range(30)))


@db
async def test_a_detached_turn_closes_the_connection_its_thread_opened(
    user, upstream, saved_answers
):
    seen: list[tuple[threading.Thread, Any, bool]] = []

    def receiver(sender: Any, message: Any, **kwargs: Any) -> None:
        wrapper = connections["default"]  # this thread's: the turn read its answer on it
        seen.append((threading.current_thread(), wrapper, wrapper.connection is not None))

    turn_finished.connect(receiver)
    try:
        upstream.enqueue(Reply(tokens=["a ", "b "]))
        app = ApplicationCommunicator(
            asgi_application(), http_scope("/completions", cookies=await session_cookie(user))
        )
        await app.send_input(
            {"type": "http.request", "body": b'{"messages":[{"role":"user","content":"Hi"}],'
             b'"detach":true}'}
        )  # fmt: skip
        assert (await app.receive_output(5))["status"] == 200
        await app.send_input({"type": "http.disconnect"})
        await app.wait(5)
        await asyncio.wait_for(saved_answers.get(), 10)
    finally:
        turn_finished.disconnect(receiver)

    [(thread, wrapper, was_open)] = seen
    # The thread ends once the turn has, after closing what it opened.
    await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
    assert thread.name.startswith("chatproxy-detached")
    assert was_open and not thread.is_alive()
    assert wrapper.connection is None


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


async def _ignore(message: Any) -> None:
    return None
