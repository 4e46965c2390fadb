"""Server tools the tests offer the model (see test_tools.py)."""

from __future__ import annotations

import asyncio
import enum
import threading
from typing import Annotated, Literal

from chatproxy.models import Conversation
from chatproxy.tools import tool

# Set by slow() once it runs, and once it is cancelled: a test that cancels mid-run waits on them.
slow_started = threading.Event()
slow_cancelled = threading.Event()


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


@tool
def weather(city: Annotated[str, "The city's name"], unit: Unit = Unit.CELSIUS) -> dict:
    """Tell the weather in a city.

    The rest of the docstring is not sent."""
    return {"city": city, "degrees": 21 if unit is Unit.CELSIUS else 70, "unit": unit.value}


@tool
async def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def conversations(turn) -> int:  # noqa: ANN001
    """Count the asking user's conversations."""
    return Conversation.objects.filter(owner=turn.user).count()


@tool
def broken() -> str:
    """Always fail."""
    raise RuntimeError("secret database password in traceback")


@tool(timeout=0.2)
async def hang() -> str:
    """Never finish."""
    await asyncio.Event().wait()
    return ""


@tool
async def slow() -> str:
    """Run until cancelled."""
    slow_started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        slow_cancelled.set()
        raise
    return ""


@tool(permission=lambda turn: turn.user.is_staff)
def staff_only() -> str:
    """Only for staff."""
    return "secret"


@tool(name="pick", description="Pick one.")
def choose(
    color: Literal["red", "green"], sizes: list[int] | None = None, ratio: float = 1.0
) -> str:
    return color


def plain() -> str:
    return ""


@tool
def unsupported(when: set[str]) -> str:
    """A hint chatproxy cannot describe."""
    return ""


refunds: list[int] = []


@tool(requires_approval=True)
def refund(amount: int) -> str:
    """Refund an amount to the user."""
    refunds.append(amount)
    return f"Refunded {amount}."
