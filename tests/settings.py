"""Settings for the test suite: SQLite by default, PostgreSQL when DATABASE_URL is set."""

import json
import os
import tempfile
from pathlib import Path

import dj_database_url

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
USE_TZ = True
ROOT_URLCONF = "tests.urls"
ASGI_APPLICATION = "project.asgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chatproxy",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "static/"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=0)}
else:
    # A file, not :memory:: the shared-cache in-memory database locks whole tables under
    # concurrent turns, which a real deployment never sees.
    _db = Path(tempfile.gettempdir()) / f"chatproxy-test-{os.getpid()}.sqlite3"
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(_db),
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            "TEST": {"NAME": str(_db)},
        }
    }

if os.environ.get("REDIS_URL"):
    # The rate limit's cache, shared with the server processes the tests start, as in production.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["REDIS_URL"],
            "KEY_PREFIX": os.environ.setdefault("CHATPROXY_TEST_CACHE", f"cpt-{os.getpid()}"),
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [os.environ["REDIS_URL"]],
                # Server processes the tests start inherit this, so they share the layer.
                "prefix": os.environ.setdefault("CHATPROXY_TEST_LAYER", f"cpt-{os.getpid()}"),
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# The upstream is the fake server started by tests/conftest.py; these are its test values.
CHATPROXY_API_KEY = "sk-test-NEVER-LEAK-0123456789abcdef"
CHATPROXY_BASE_URL = "http://127.0.0.1:9/v1"  # replaced per test session by conftest
CHATPROXY_MODELS = ["gpt-test", "gpt-other"]
CHATPROXY_DEFAULT_MODEL = "gpt-test"
CHATPROXY_MAX_RETRIES = 0
CHATPROXY_TIMEOUT = 5.0
CHATPROXY_DEMO_DELAY = 0.0

# A server process started by the tests (tests/server.py) shares the test database and the
# fake upstream of the process that started it.
if os.environ.get("CHATPROXY_TEST_DATABASE_NAME"):
    DATABASES["default"]["NAME"] = os.environ["CHATPROXY_TEST_DATABASE_NAME"]
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # A server under load needs a pool, as in production: one connection per request
        # thread would exhaust PostgreSQL's max_connections.
        DATABASES["default"]["OPTIONS"] = {"pool": {"min_size": 1, "max_size": 20, "timeout": 30}}
if os.environ.get("CHATPROXY_TEST_UPSTREAM"):
    CHATPROXY_BASE_URL = os.environ["CHATPROXY_TEST_UPSTREAM"]
# Limits are tested on their own; the rest of the suite runs many turns as one user.
CHATPROXY_RATE_LIMIT = None
CHATPROXY_MAX_STREAMS = None

# Per-process overrides for a server a test starts, as JSON: {"CHATPROXY_SHUTDOWN_GRACE": 0.5}.
# Last, so they can turn the limits back on.
globals().update(json.loads(os.environ.get("CHATPROXY_TEST_SETTINGS", "{}")))

# Server processes print errors, so a failing test can show them.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
}
