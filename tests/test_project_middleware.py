"""The demo project's middleware: seven of Django's, with their hooks run on the event loop
(the session's and the messages' hop when they may reach the database), and seen as Django's
own by Django's deploy checks."""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from pathlib import Path
from typing import Any

import pytest
from django.contrib import messages
from django.contrib.sessions.models import Session
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, RequestFactory
from django.utils.deprecation import MiddlewareMixin

from project import settings as project_settings
from project.middleware import CsrfViewMiddleware, MessageMiddleware, OnTheLoop, SessionMiddleware
from tests.conftest import run_demo_project

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def demo_stack(settings: Any) -> None:
    settings.MIDDLEWARE = project_settings.MIDDLEWARE
    settings.ROOT_URLCONF = "project.urls"


@pytest.fixture
def staff(user: Any) -> Any:
    user.is_staff = True
    user.save()
    return user


class ThreadsSeen:
    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)
        self.threads: list[int] = []

    def process_request(self, request: HttpRequest) -> None:
        self.threads.append(threading.get_ident())

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        self.threads.append(threading.get_ident())
        return response


class Inline(ThreadsSeen, OnTheLoop):
    pass


class Djangos(ThreadsSeen, MiddlewareMixin):
    pass


async def test_hooks_run_on_the_event_loops_thread_where_django_hops_to_another():
    async def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok")

    inline, djangos = Inline(view), Djangos(view)
    for middleware in (inline, djangos):
        response = await middleware(RequestFactory().get("/"))
        assert response.content == b"ok"

    here = threading.get_ident()
    assert inline.threads == [here, here]
    assert len(djangos.threads) == 2 and here not in djangos.threads


class ResponseThreads:
    """Notes the thread each ``process_response`` runs on."""

    threads: list[int]

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        self.threads.append(threading.get_ident())
        return super().process_response(request, response)  # type: ignore[misc]


class SeenSession(ResponseThreads, SessionMiddleware):
    threads: list[int] = []


class SeenMessages(ResponseThreads, MessageMiddleware):
    threads: list[int] = []


async def test_session_hops_to_be_saved_only_when_it_changed():
    async def view(request: HttpRequest) -> HttpResponse:
        if "write" in request.GET:
            await request.session.aset("seen", True)
        return HttpResponse("ok")

    middleware, here = SeenSession(view), threading.get_ident()
    middleware.threads = []
    await middleware(RequestFactory().get("/"))
    saved = await middleware(RequestFactory().get("/?write"))

    assert middleware.threads[0] == here
    assert middleware.threads[1] != here
    key = saved.cookies["sessionid"].value
    assert (await Session.objects.aget(pk=key)).get_decoded() == {"seen": True}


async def test_messages_hop_to_be_stored_only_when_added_or_read():
    async def view(request: HttpRequest) -> HttpResponse:
        if "add" in request.GET:
            messages.info(request, "Saved.")
        if "read" in request.GET:
            return HttpResponse(" ".join(str(m) for m in messages.get_messages(request)))
        return HttpResponse("ok")

    async def request(path: str, cookies: Any = None) -> HttpResponse:
        made = RequestFactory().get(path)
        made.COOKIES = {name: morsel.value for name, morsel in (cookies or {}).items()}
        made.session = SessionMiddleware(view).SessionStore()
        return await middleware(made)

    middleware, here = SeenMessages(view), threading.get_ident()
    middleware.threads = []
    await request("/")
    stored = await request("/?add")
    read = await request("/?read", stored.cookies)

    assert middleware.threads[0] == here
    assert here not in middleware.threads[1:]
    assert read.content == b"Saved."


async def test_csrf_view_hook_is_a_coroutine_under_asgi_and_refuses_without_a_token():
    async def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok")

    middleware = CsrfViewMiddleware(view)
    assert asyncio.iscoroutinefunction(middleware.process_view)

    refused = await middleware.process_view(RequestFactory().post("/"), view, (), {})
    assert refused is not None and refused.status_code == 403


async def test_demo_stack_keeps_djangos_headers_redirects_csrf_and_login(demo_stack, staff):
    client = AsyncClient(enforce_csrf_checks=True)

    page = await client.get("/admin/login/")
    assert page.status_code == 200
    assert page["X-Frame-Options"] == "DENY"
    assert page["X-Content-Type-Options"] == "nosniff"
    assert page["Referrer-Policy"] == "same-origin"
    token = page.cookies["csrftoken"].value
    assert (await client.get("/admin")).status_code == 301  # APPEND_SLASH
    credentials = {"username": "alice", "password": "pw"}
    assert (await client.post("/admin/login/", credentials)).status_code == 403

    logged_in = await client.post(
        "/admin/login/?next=/admin/", {**credentials, "csrfmiddlewaretoken": token}
    )
    assert logged_in.status_code == 302 and logged_in["Location"] == "/admin/"
    assert (await client.get("/admin/")).status_code == 200


async def test_csrf_kept_in_the_session_keeps_djangos_thread_hops(demo_stack, staff, settings):
    # Then the CSRF hooks load and save the session: database work, not for the event loop.
    settings.CSRF_USE_SESSIONS = True
    client = AsyncClient(enforce_csrf_checks=True)

    page = await client.get("/admin/login/")
    assert page.status_code == 200 and "csrftoken" not in page.cookies
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())
    assert token is not None
    logged_in = await client.post(
        "/admin/login/?next=/admin/",
        {"username": "alice", "password": "pw", "csrfmiddlewaretoken": token.group(1)},
    )
    assert logged_in.status_code == 302


def test_demo_takes_its_seven_middleware_from_project_middleware_as_the_docs_say():
    from django.utils.module_loading import import_string

    ours = [path for path in project_settings.MIDDLEWARE if path.startswith("project.")]
    djangos = {
        "SecurityMiddleware": "django.middleware.security",
        "SessionMiddleware": "django.contrib.sessions.middleware",
        "CommonMiddleware": "django.middleware.common",
        "CsrfViewMiddleware": "django.middleware.csrf",
        "AuthenticationMiddleware": "django.contrib.auth.middleware",
        "MessageMiddleware": "django.contrib.messages.middleware",
        "XFrameOptionsMiddleware": "django.middleware.clickjacking",
    }
    assert [path.rsplit(".", 1)[1] for path in ours] == list(djangos)
    for path in ours:
        name = path.rsplit(".", 1)[1]
        assert issubclass(import_string(path), import_string(f"{djangos[name]}.{name}"))
    deployment = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
    assert "`project/middleware.py`" in deployment.read_text()


def deploy_check(**environ: str) -> str:
    """Run ``manage.py check --deploy`` on the demo project, as on a server: DEBUG off and a
    real secret key."""
    environ = {"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": secrets.token_urlsafe(50), **environ}
    done = run_demo_project("manage.py", "check", "--deploy", **environ)
    return done.stdout + done.stderr


def test_deploy_checks_see_the_demos_middleware_and_warn_about_https():
    found = set(re.findall(r"\((security\.[EW]\d{3})\)", deploy_check()))

    # Not "middleware missing": the security, X-Frame-Options and CSRF middleware are found.
    assert not found & {"security.W001", "security.W002", "security.W003"}
    # So the checks that need them run: no HSTS, no SSL redirect, cookies sent over HTTP.
    assert found >= {"security.W004", "security.W008", "security.W012", "security.W016"}


def test_deploy_checks_pass_the_demo_behind_https():
    found = set(re.findall(r"\((security\.[EW]\d{3})\)", deploy_check(DJANGO_HTTPS="1")))

    # HSTS for subdomains and preloading are each site's own decision, which the checks ask for.
    assert found <= {"security.W005", "security.W021"}
