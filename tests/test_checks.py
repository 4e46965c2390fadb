"""System checks: exact ids for bad settings and setups that break streaming."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from chatproxy.checks import check_settings


def ids(**kwargs):
    return [m.id for m in check_settings()]


def test_test_settings_pass_cleanly():
    assert ids() == []


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CHATPROXY_MODELS", [], "chatproxy.E001"),
        ("CHATPROXY_MODELS", "gpt-test", "chatproxy.E001"),
        ("CHATPROXY_DEFAULT_MODEL", "gpt-9", "chatproxy.E002"),
        ("CHATPROXY_PARAMETERS", {"temperature": (2, 1)}, "chatproxy.E003"),
        ("CHATPROXY_PARAMETERS", ["temperature"], "chatproxy.E003"),
        ("CHATPROXY_MAX_MESSAGES", 0, "chatproxy.E004"),
        ("CHATPROXY_MAX_BODY_BYTES", "big", "chatproxy.E004"),
        ("CHATPROXY_TIMEOUT", -1, "chatproxy.E005"),
        ("CHATPROXY_HEARTBEAT", "often", "chatproxy.E005"),
        ("CHATPROXY_SEND_TIMEOUT", -1, "chatproxy.E005"),
        ("CHATPROXY_MAX_RETRIES", -1, "chatproxy.E006"),
        ("CHATPROXY_INTERCEPTORS", ["chatproxy.nowhere.Nothing"], "chatproxy.E007"),
        ("CHATPROXY_INTERCEPTORS", ["chatproxy.models.Message"], "chatproxy.E007"),
        ("CHATPROXY_INTERCEPTORS", "chatproxy.interceptors.Redact", "chatproxy.E007"),
        ("CHATPROXY_PRICES", {"gpt-test": {"prompt": 1}}, "chatproxy.E008"),
        ("CHATPROXY_RATE_LIMIT", (0, 60), "chatproxy.E009"),
        ("CHATPROXY_RATE_LIMIT", "30/m", "chatproxy.E009"),
        ("CHATPROXY_MAX_STREAMS", 0, "chatproxy.E010"),
        ("CHATPROXY_GROUP_MODELS", {"pro": "gpt-pro"}, "chatproxy.E011"),
        ("CHATPROXY_CACHE", "nowhere", "chatproxy.E012"),
    ],
)
def test_bad_setting_is_an_error(settings, name, value, expected):
    setattr(settings, name, value)

    assert ids() == [expected]


def test_wsgi_setup_warns(settings):
    del settings.ASGI_APPLICATION

    assert ids() == ["chatproxy.W001"]


def test_missing_key_warns_that_the_demo_model_answers(settings):
    settings.CHATPROXY_API_KEY = ""
    settings.CHATPROXY_MODELS = ["chatproxy-demo"]
    settings.CHATPROXY_DEFAULT_MODEL = "chatproxy-demo"

    assert ids() == ["chatproxy.W002"]


def test_gzip_middleware_warns(settings):
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "django.middleware.gzip.GZipMiddleware"]

    assert ids() == ["chatproxy.W003"]


OVERRIDING_DATABASES = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


@OVERRIDING_DATABASES
def test_persistent_connections_warn(settings):
    settings.DATABASES = {"default": {**settings.DATABASES["default"], "CONN_MAX_AGE": 60}}

    assert "chatproxy.W004" in ids()


@OVERRIDING_DATABASES
def test_sqlite_without_immediate_transactions_warns(settings):
    settings.DATABASES = {
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "x.sqlite3", "OPTIONS": {}}
    }

    assert ids() == ["chatproxy.W005"]


def test_anonymous_chat_with_a_real_key_warns(settings):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True

    assert ids() == ["chatproxy.W006"]


def test_manage_py_check_fails_on_a_bad_setting(settings):
    settings.CHATPROXY_MAX_CHARS = -5

    with pytest.raises(SystemCheckError, match="chatproxy.E004"):
        call_command("check")
