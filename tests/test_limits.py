"""The limits on their own: the sliding-window rate limit, driven by passing ``now``."""

from __future__ import annotations

import uuid

import pytest

from chatproxy.exceptions import RequestError
from chatproxy.limits import check_rate
from chatproxy.owners import Owner

PERIOD = 60


def fresh_owner() -> Owner:
    # A key of its own: the cache (Redis on CI) outlives a test.
    return Owner(session_key=uuid.uuid4().hex)


def passes(owner: Owner, at: float) -> bool:
    try:
        check_rate(owner, now=at)
    except RequestError:
        return False
    return True


def most_in_any_window(times: list[float], period: float) -> int:
    """The most of ``times`` that fall in any window of ``period`` seconds."""
    return max(sum(1 for t in times if end - period < t <= end) for end in times)


@pytest.fixture
def limit(settings):
    settings.CHATPROXY_RATE_LIMIT = (30, PERIOD)


def test_a_burst_across_a_window_boundary_passes_no_more_than_the_limit(limit):
    owner = fresh_owner()
    boundary = 1_000_000 * PERIOD  # a fixed window's edge
    # 60 turns in 4.7 s around the edge, then one a second for two periods.
    burst = [boundary - 2.35 + i * 4.7 / 60 for i in range(60)]
    steady = [boundary + 3 + i for i in range(2 * PERIOD)]

    passed = [t for t in burst + steady if passes(owner, t)]

    assert most_in_any_window(passed, PERIOD) <= 30
    assert len([t for t in burst if t in passed]) == 30
    assert len(passed) > 30  # the limit lets traffic through again as the burst ages out


def test_retry_after_names_the_first_second_a_request_passes_again(limit):
    owner = fresh_owner()
    start = 2_000_000 * PERIOD + 17.3
    for i in range(30):
        assert passes(owner, start + i * 0.1)
    refused_at = start + 5

    with pytest.raises(RequestError) as refused:
        check_rate(owner, now=refused_at)

    retry = refused.value.retry_after
    assert refused.value.code == "rate_limited" and refused.value.status == 429
    assert retry is not None and 1 <= retry <= PERIOD + PERIOD // 10
    assert refused.value.message == (
        f"Too many chat requests: at most 30 every 60 seconds. Try again in {retry} seconds."
    )
    assert not passes(owner, refused_at + retry - 1)
    assert passes(owner, refused_at + retry)


def test_refused_requests_do_not_count(limit):
    owner = fresh_owner()
    start = 3_000_000 * PERIOD
    for i in range(30):
        assert passes(owner, start + i)
    for i in range(100):  # a client that keeps hammering while refused
        assert not passes(owner, start + 30 + i * 0.01)

    # Once the first 30 have aged out, the hammering has not pushed the window further.
    assert passes(owner, start + PERIOD + PERIOD / 10 + 30)


def said(role: str, text: str) -> dict[str, str]:
    return {"role": role, "content": text}


def test_the_history_bound_drops_the_oldest_exchanges_whole_and_keeps_system_messages(settings):
    from chatproxy.limits import bound_history

    settings.CHATPROXY_MAX_CHARS = 100
    settings.CHATPROXY_MAX_HISTORY_CHARS = 350
    history = [
        said("system", "s" * 10),
        said("user", "a" * 100),
        said("assistant", "b" * 100),
        said("user", "c" * 100),  # its answer was interrupted before any text
        said("user", "d" * 100),
        said("assistant", "e" * 100),
    ]

    kept, dropped = bound_history(history, [said("user", "f" * 100)])

    assert kept == [history[0], history[4], history[5]]
    assert dropped == 3


def test_a_history_within_the_bound_is_sent_whole(settings):
    from chatproxy.limits import bound_history

    settings.CHATPROXY_MAX_HISTORY_CHARS = 301
    history = [said("user", "a" * 100), said("assistant", "b" * 100)]

    assert bound_history(history, [said("user", "c" * 100)]) == (history, 0)


def test_the_bound_counts_parts_and_tool_calls_and_drops_an_exchange_with_its_results(settings):
    from chatproxy.limits import bound_history

    settings.CHATPROXY_MAX_CHARS = 100
    settings.CHATPROXY_MAX_HISTORY_CHARS = 300
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 78}}
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "x" * 94}}
    history = [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "r" * 100},
        said("user", "d" * 50),
        said("assistant", "e" * 50),
    ]

    kept, dropped = bound_history(history, [said("user", "f" * 100)])

    # 113 + 100 + 100 in the first exchange, 200 after it: it goes whole, call and result too.
    assert (kept, dropped) == (history[3:], 3)
