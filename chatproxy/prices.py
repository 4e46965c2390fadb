"""Pricing a usage: CHATPROXY_PRICES (or a ``Cost`` interceptor's own ``prices``) maps a model
to ``{"prompt": ..., "completion": ...}`` in currency units per million tokens, and optionally
``"cached_prompt"``, the price of the prompt tokens the upstream served from its cache."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

MILLION = Decimal(1_000_000)


def price(rates: Mapping[str, Any], usage: Mapping[str, Any]) -> Decimal:
    """The cost of ``usage`` (``prompt_tokens``, ``completion_tokens``, ``cached_tokens``) at
    ``rates``, rounded as the ``cost`` columns store it, so every database keeps one value."""
    prompt = Decimal(usage["prompt_tokens"])
    cost: Decimal = Decimal(str(rates["prompt"])) * prompt
    if (cached_price := rates.get("cached_prompt")) is not None:
        cached = Decimal(min(usage.get("cached_tokens", 0), usage["prompt_tokens"]))
        cost += (Decimal(str(cached_price)) - Decimal(str(rates["prompt"]))) * cached
    cost = (cost + Decimal(str(rates["completion"])) * usage["completion_tokens"]) / MILLION
    return cost.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
