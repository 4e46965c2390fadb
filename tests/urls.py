import mimetypes
from pathlib import Path

import django.contrib.admin
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import include, path

import chatproxy
from chatproxy.views import CompletionsView

# The app's own files, and the admin's (its pages are screenshot in the browser tests).
STATIC_ROOTS = [
    Path(package.__file__).resolve().parent / "static"
    for package in (chatproxy, django.contrib.admin)
]


async def static(request: HttpRequest, name: str) -> HttpResponse:
    """Serve the app's static files to the browser tests' server process, which runs with DEBUG
    off and no static files server. Whole, not as django.views.static.serve's FileResponse,
    whose synchronous iterator makes Django warn under ASGI."""
    for root in STATIC_ROOTS:
        file = (root / name).resolve()
        if file.is_relative_to(root) and file.is_file():
            break
    else:
        raise Http404(name)
    content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return HttpResponse(file.read_bytes(), content_type=content_type)


urlpatterns = [
    path(
        "shouting/completions",
        CompletionsView.as_view(interceptors=["tests.test_interception.Shout"]),
    ),
    path("static/<path:name>", static),
    path("", include("project.urls")),
]
