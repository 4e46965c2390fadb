"""Settings for the benchmark: the demo project against the fake upstream, on a fresh SQLite file.

``bench.run`` sets the environment: ``BENCH_DB`` (the SQLite file, in a temp dir),
``BENCH_UPSTREAM_URL`` (the fake upstream's base URL, with ``/v1``), ``BENCH_COALESCE`` and
``BENCH_LIMITS``; ``BENCH_METRICS=1`` turns CHATPROXY_METRICS on (to measure what it costs).
"""

import os
from typing import Any, cast

from project.settings import *  # noqa: F403
from project.settings import SQLITE

DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "bench.urls"  # the demo project's, plus the Django floor

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("BENCH_DB", "/tmp/chatproxy-bench.sqlite3"),
        # The demo project's IMMEDIATE/WAL options, as they are.
        "OPTIONS": dict(cast("dict[str, Any]", SQLITE["OPTIONS"])),
    }
}

CHATPROXY_API_KEY = "sk-bench"
CHATPROXY_BASE_URL = os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:9100/v1")
CHATPROXY_MODELS = ["bench-model"]
CHATPROXY_DEFAULT_MODEL = "bench-model"
CHATPROXY_MAX_RETRIES = 0
CHATPROXY_ALLOW_ANONYMOUS = False
CHATPROXY_COALESCE_DELTAS = os.environ.get("BENCH_COALESCE", "0") == "1"
CHATPROXY_METRICS = os.environ.get("BENCH_METRICS", "0") == "1"
CHATPROXY_METRICS_TOKEN = "bench-metrics"
if os.environ.get("BENCH_LIMITS", "0") != "1":
    # One user drives all the load, so the per-user policy limits are off (``--limits`` keeps
    # their defaults). Everything else (interceptors, checkpoints, ...) keeps its default.
    CHATPROXY_RATE_LIMIT = None
    CHATPROXY_MAX_STREAMS = None

# Quiet: only warnings and errors, which the benchmark counts in the server's output.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
