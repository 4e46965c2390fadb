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
        ("CHATPROXY_TRUSTED_PROXIES", "10.0.0.1", "chatproxy.E013"),
        ("CHATPROXY_TRUSTED_PROXIES", ["10.0.0.0/8", "proxy.internal"], "chatproxy.E013"),
        ("CHATPROXY_MAX_ANONYMOUS_STREAMS", 0, "chatproxy.E014"),
        ("CHATPROXY_MAX_FOLLOWERS", "many", "chatproxy.E014"),
        ("CHATPROXY_MAX_FOLLOWERS_PER_USER", 0, "chatproxy.E014"),
        ("CHATPROXY_MAX_HISTORY_CHARS", 0, "chatproxy.E004"),
        ("CHATPROXY_MAX_HISTORY_CHARS", 39_999, "chatproxy.E015"),
        ("CHATPROXY_PARAMETERS", {"tools": "toolz"}, "chatproxy.E003"),
        ("CHATPROXY_PARAMETERS", {"reasoning_effort": []}, "chatproxy.E003"),
        ("CHATPROXY_MAX_TOOLS", 0, "chatproxy.E004"),
        ("CHATPROXY_MAX_SCHEMA_BYTES", "big", "chatproxy.E004"),
        ("CHATPROXY_MAX_IMAGES", -1, "chatproxy.E016"),
        ("CHATPROXY_IMAGE_HOSTS", "images.example.com", "chatproxy.E017"),
        ("CHATPROXY_EXTRA_PART_TYPES", ["image_url"], "chatproxy.E018"),
        ("CHATPROXY_REASONING_FIELD", "reasoning content", "chatproxy.E019"),
        ("CHATPROXY_REVIEW_FLAGS", ["needs review"], "chatproxy.E030"),
        ("CHATPROXY_REVIEW_FLAGS", {"needs review": "Needs review"}, "chatproxy.E030"),
        ("CHATPROXY_DELETE", "archive", "chatproxy.E040"),
        ("CHATPROXY_BUDGETS", [{"period": "day", "tokens": 5}], "chatproxy.E070"),
        ("CHATPROXY_BUDGETS", {"user": [{"period": "year", "tokens": 5}]}, "chatproxy.E070"),
        ("CHATPROXY_BUDGETS", {"site": [{"period": "rolling", "tokens": 5}]}, "chatproxy.E070"),
        ("CHATPROXY_BUDGETS", {"groups": {"staff": [{"period": "day"}]}}, "chatproxy.E070"),
        ("CHATPROXY_BUDGETS", {"user": [{"period": "day", "cost": "lots"}]}, "chatproxy.E070"),
        ("CHATPROXY_BUDGET_MAX_TOKENS", 0, "chatproxy.E071"),
    ],
)
def test_bad_setting_is_an_error(settings, name, value, expected):
    setattr(settings, name, value)

    assert ids() == [expected]


def test_budgets_in_every_form_pass(settings):
    settings.CHATPROXY_BUDGETS = {
        "user": [{"period": "day", "tokens": 1000}, {"period": "month", "cost": "5.00"}],
        "groups": {"staff": [{"period": "week", "tokens": 10, "cost": 1.5}]},
        "anonymous": [{"period": "rolling", "window": 3600, "tokens": 100}],
        "site": [],
    }

    assert ids() == []


def test_typed_parameters_in_every_form_pass(settings):
    settings.CHATPROXY_PARAMETERS = {
        "temperature": [0, 1],
        "reasoning_effort": ["low", "high"],
        "tools": "tools",
        "parallel_tool_calls": "boolean",
    }

    assert ids() == []


def test_images_that_cannot_fit_in_the_body_warn(settings):
    settings.CHATPROXY_MAX_IMAGE_BYTES = 1_000_000

    assert ids() == ["chatproxy.W007"]


def test_wsgi_setup_warns(settings):
    del settings.ASGI_APPLICATION

    assert ids() == ["chatproxy.W001"]


def test_missing_key_warns_that_the_demo_model_answers(settings):
    settings.CHATPROXY_API_KEY = ""
    settings.CHATPROXY_MODELS = ["chatproxy-demo"]
    settings.CHATPROXY_DEFAULT_MODEL = "chatproxy-demo"

    assert ids() == ["chatproxy.W002"]
    # The hint names the setting to set and the variable the demo project reads it from.
    (warning,) = check_settings()
    assert 'CHATPROXY_API_KEY = os.environ.get("OPENAI_API_KEY"' in warning.hint


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


@pytest.mark.django_db  # Django 6 runs the model checks' database queries too
def test_manage_py_check_fails_on_a_bad_setting(settings):
    settings.CHATPROXY_MAX_CHARS = -5

    with pytest.raises(SystemCheckError, match="chatproxy.E004"):
        call_command("check")
