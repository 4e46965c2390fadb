"""The test suite on each supported Django, each on the Python it is tested with.

    nox -s "tests(django-6.1)"                   the newest Django
    nox -s tests -- tests/test_views.py -x        every version, some tests

``.ci/run`` runs the newest on SQLite and on PostgreSQL + Redis, and the others on SQLite.
Arguments after ``--`` go to pytest; ``DATABASE_URL`` and ``REDIS_URL`` pass through.
"""

from __future__ import annotations

import re
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

# Each supported Django release and the Python it is tested on; the newest is last.
DJANGO = [("3.11", "5.2"), ("3.12", "6.0"), ("3.13", "6.1")]


@nox.session
@nox.parametrize(("python", "django"), DJANGO, ids=[f"django-{d}" for _, d in DJANGO])
def tests(session: nox.Session, django: str) -> None:
    # requirements.txt pins the demo's Django; every other pin is shared by all sessions.
    lines = Path("requirements.txt").read_text().splitlines()
    others = [pin for pin in lines if pin[:1].isalnum() and not re.match(r"(?i)django==", pin)]
    session.install("-q", "--disable-pip-version-check", f"Django=={django}.*", *others)
    session.run("python", "-m", "django", "--version")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *session.posargs)
