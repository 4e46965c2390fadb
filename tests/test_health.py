"""The health and readiness endpoints: what a load balancer sees, and that it sees nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import orjson
import pytest
from django.test import AsyncClient

from tests.server import ROOT, free_port

db = pytest.mark.django_db(transaction=True)

NOWHERE = f"redis://127.0.0.1:{free_port()}/0"  # a port nobody listens on


@db
@pytest.mark.parametrize("path", ["/health", "/health/ready"])
async def test_a_healthy_server_answers_ok_to_anyone(path):
    response = await AsyncClient().get(path)

    assert response.status_code == 200
    assert orjson.loads(response.content) == {"status": "ok"}
    assert response["Cache-Control"] == "no-store"
    assert not response.cookies


@db
async def test_an_unreachable_cache_is_unavailable_and_says_nothing_more(settings, caplog):
    settings.CACHES = {
        **settings.CACHES,
        "broken": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": NOWHERE},
    }
    settings.CHATPROXY_CACHE = "broken"

    response = await AsyncClient().get("/health")

    assert response.status_code == 503
    assert response.content == b'{"status": "unavailable"}'
    assert "Health check: the cache is unreachable" in caplog.messages


@db
async def test_an_unreachable_channel_layer_is_unavailable(settings, caplog):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [NOWHERE]},
        }
    }

    response = await AsyncClient().get("/health/ready")

    assert response.status_code == 503
    assert orjson.loads(response.content) == {"status": "unavailable"}
    assert "Health check: the channel layer is unreachable" in caplog.messages


@db
@pytest.mark.parametrize("path", ["/health", "/health/ready"])
async def test_health_takes_only_get_and_head(path):
    client = AsyncClient()

    assert (await client.head(path)).status_code == 200
    assert (await client.post(path)).status_code == 405


# Run in a process of its own: SIGTERM would end the test run, and draining lasts for good.
READINESS = textwrap.dedent(
    """
    import asyncio, os, signal
    import django

    django.setup()
    from django.test import AsyncClient
    from chatproxy import shutdown

    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the server's own handler

    async def main():
        client = AsyncClient()
        before = (await client.get("/health/ready")).status_code
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the hook hands the signal to the loop: a few iterations
            if shutdown.draining():
                break
            await asyncio.sleep(0)
        during = await client.get("/health/ready")
        alive = (await client.get("/health")).status_code
        print(before, during.status_code, during.content.decode(), alive)

    asyncio.run(main())
    """
)


def test_readiness_goes_false_during_the_shutdown_grace(tmp_path):
    # On SQLite and in-memory layers of its own, whatever the suite runs on.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "CHATPROXY_TEST_DATABASE_NAME": str(tmp_path / "db.sqlite3"),
    }

    done = subprocess.run(
        [sys.executable, "-c", READINESS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "503", '{"status":', '"draining"}', "200"]
