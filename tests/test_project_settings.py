"""The demo project's settings: Daphne, and the Twisted it loads, only for runserver."""

from __future__ import annotations

from tests.conftest import run_demo_project


def run_python(*args: str) -> str:
    done = run_demo_project(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_asgi_server_loading_the_demo_loads_neither_daphne_nor_twisted():
    loaded = run_python(
        "-c",
        "import sys; import project.asgi; from django.conf import settings; "
        "print('daphne' in settings.INSTALLED_APPS, 'twisted' in sys.modules)",
    )
    assert loaded.split() == ["False", "False"]


def test_runserver_is_daphnes_asgi_one():
    help_text = run_python("manage.py", "runserver", "--help")
    assert "--noasgi" in help_text  # only Daphne's runserver has it; Django's serves WSGI
