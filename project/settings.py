"""The demo project: chatproxy behind Django's admin and auth, configured from the environment.

With no OPENAI_API_KEY the offline demo model answers and anonymous chat is allowed; with a key,
chat needs a logged-in user unless CHATPROXY_ALLOW_ANONYMOUS=1 says otherwise.

The defaults are for a laptop, and the insecure ones are marked INSECURE below. On a server, go
through the production checklist (docs/deployment.md) and run ``manage.py check --deploy``.
"""

import os
import sys
from pathlib import Path

import dj_database_url
from django.apps import apps
from django.utils.module_loading import import_string

BASE_DIR = Path(__file__).resolve().parent.parent

# INSECURE default: a secret key everyone can read here. Set DJANGO_SECRET_KEY on a server.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-insecure-secret-key-change-me")
# INSECURE default: DEBUG on shows tracebacks and settings to anyone. DJANGO_DEBUG=0 on a server.
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")
CSRF_TRUSTED_ORIGINS = [
    o for o in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o
]

# INSECURE default: plain HTTP, for http://127.0.0.1. Behind a proxy that ends TLS and sets
# X-Forwarded-Proto (docs/deployment.md), DJANGO_HTTPS=1 redirects to HTTPS, sends HSTS for
# DJANGO_HSTS_SECONDS (an hour to begin with; raise it once HTTPS works everywhere) and sends
# the session and CSRF cookies over HTTPS only.
if os.environ.get("DJANGO_HTTPS") == "1":
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_HSTS_SECONDS", "3600"))
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

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
# Daphne only for its runserver, which serves HTTP and the WebSocket in development (it must
# come first to replace Django's). Importing it loads Twisted: about 25 MB in every process,
# for nothing under uvicorn (docs/deployment.md).
if sys.argv[1:2] == ["runserver"]:
    INSTALLED_APPS.insert(0, "daphne")


class Middleware(list[str]):
    """A MIDDLEWARE list in which ``in`` also finds one of Django's middleware by a subclass
    that stands in for it. Django's deploy checks look for the exact dotted path
    (``"django.middleware.security.SecurityMiddleware" in settings.MIDDLEWARE``): without this
    they report the security, CSRF and X-Frame-Options middleware missing, and skip the HSTS,
    SSL-redirect and secure-cookie checks that need them. (The admin's checks already accept
    subclasses.)"""

    def __contains__(self, path: object) -> bool:
        if super().__contains__(path):
            return True
        if not isinstance(path, str) or not apps.ready:  # importing middleware needs the apps
            return False
        try:
            wanted = import_string(path)
            return any(issubclass(import_string(entry), wanted) for entry in self)
        except ImportError:
            return False


# Django's usual seven, from project/middleware.py, which subclasses Django's own and runs
# their hooks on the event loop instead of a thread hop each (docs/deployment.md).
MIDDLEWARE = Middleware([
    "project.middleware.SecurityMiddleware",
    "project.middleware.SessionMiddleware",
    "project.middleware.CommonMiddleware",
    "project.middleware.CsrfViewMiddleware",
    "project.middleware.AuthenticationMiddleware",
    "project.middleware.MessageMiddleware",
    "project.middleware.XFrameOptionsMiddleware",
])  # fmt: skip

ROOT_URLCONF = "project.urls"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

SQLITE = {
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": BASE_DIR / "db.sqlite3",
    "OPTIONS": {
        # IMMEDIATE takes the write lock at BEGIN, so concurrent turns queue instead of
        # failing with "database is locked"; WAL lets readers run beside the writer.
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    },
}
if os.environ.get("DATABASE_URL"):
    default = dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=0)
    if default["ENGINE"] == "django.db.backends.postgresql":
        default.setdefault("OPTIONS", {})["pool"] = {"min_size": 2, "max_size": 20, "timeout": 10}
    DATABASES = {"default": default}
else:
    DATABASES = {"default": SQLITE}

if os.environ.get("REDIS_URL"):
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["REDIS_URL"],
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [os.environ["REDIS_URL"]]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
LOGIN_URL = "admin:login"

# chatproxy, from the environment
CHATPROXY_API_KEY = os.environ.get("OPENAI_API_KEY", "")
CHATPROXY_BASE_URL = os.environ.get("OPENAI_BASE_URL", "")
if os.environ.get("CHATPROXY_MODELS"):
    CHATPROXY_MODELS = os.environ["CHATPROXY_MODELS"].split(",")
if os.environ.get("CHATPROXY_DEFAULT_MODEL"):
    CHATPROXY_DEFAULT_MODEL = os.environ["CHATPROXY_DEFAULT_MODEL"]
# Anonymous chat only while the offline demo model answers, unless said explicitly.
# Tools the model may call, which the server runs as the asking user (docs/tools.md).
CHATPROXY_TOOLS = ["project.tools.current_time", "project.tools.count_my_conversations"]
CHATPROXY_ALLOW_ANONYMOUS = (
    os.environ.get("CHATPROXY_ALLOW_ANONYMOUS", "0" if CHATPROXY_API_KEY else "1") == "1"
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"chatproxy": {"handlers": ["console"], "level": "INFO"}},
}
