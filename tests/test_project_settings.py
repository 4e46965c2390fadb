"""The demo project's settings: Daphne, and the Twisted it loads, only for runserver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(*args: str) -> str:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
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
