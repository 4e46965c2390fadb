import mimetypes
from pathlib import Path

from django.http import Http404, HttpRequest, HttpResponse
from django.urls import include, path

import chatproxy
from chatproxy.views import CompletionsView

STATIC_ROOT = Path(chatproxy.__file__).resolve().parent / "static"


async def static(request: HttpRequest, name: str) -> HttpResponse:
    """Serve the app's static files to the browser tests' server process, which runs with DEBUG
    off and no static files server. Whole, not as django.views.static.serve's FileResponse,
    whose synchronous iterator makes Django warn under ASGI."""
    file = (STATIC_ROOT / name).resolve()
    if not file.is_relative_to(STATIC_ROOT) or not file.is_file():
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
