"""OpenTelemetry spans, with the ``otel`` extra and CHATPROXY_TRACES on.

A turn is one span (``chat {model}``), with a child per upstream call (one per step of a tool
loop; a failover is an event on it) and per server tool run (``execute_tool {name}``), named
and attributed as the GenAI semantic conventions say. Spans go to the tracer provider the
site configures (its exporter, its sampler); message text only with CHATPROXY_TRACE_CONTENT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson

from .conf import conf

try:
    from opentelemetry import trace
except ImportError:  # the extra is not installed: chatproxy.E065 refuses CHATPROXY_TRACES
    trace = None  # type: ignore[assignment]


def installed() -> bool:
    """Whether the ``otel`` extra (opentelemetry-api) is installed."""
    return trace is not None


def _tracer() -> Any:
    if not conf.CHATPROXY_TRACES or trace is None:
        return None
    return trace.get_tracer("chatproxy")


def _content(value: Any) -> str:
    return orjson.dumps(value).decode()


def turn_started(turn: Any) -> None:
    """Open the turn's span (a ``turns.Turn``)."""
    if (tracer := _tracer()) is None:
        return
    span = tracer.start_span(f"chat {turn.model}", kind=trace.SpanKind.INTERNAL)
    span.set_attributes(
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": turn.model,
            "gen_ai.conversation.id": str(turn.conversation_id or ""),
            "chatproxy.message_id": str(turn.answer_id or ""),
        }
    )
    if conf.CHATPROXY_TRACE_CONTENT:
        span.set_attribute("gen_ai.input.messages", _content(turn.messages))
    turn.span = span


def turn_ended(turn: Any) -> None:
    """Close the turn's span with its outcome: usage, finish reason, the upstream, the error."""
    span, turn.span = turn.span, None
    if span is None:
        return
    state, usage = turn.state, turn.usage()
    route = turn.stream.route if turn.stream is not None else None
    span.set_attribute("chatproxy.status", str(state.status))
    if route is not None:
        span.set_attribute("gen_ai.response.model", route.model)
        span.set_attribute("chatproxy.upstream", route.upstream.name)
    if state.finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [state.finish_reason])
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.get("prompt_tokens") or 0)
        span.set_attribute("gen_ai.usage.output_tokens", usage.get("completion_tokens") or 0)
    if conf.CHATPROXY_TRACE_CONTENT:
        output = [{"role": "assistant", "content": state.text}]
        span.set_attribute("gen_ai.output.messages", _content(output))
    if state.error_code:
        span.set_attribute("error.type", state.error_code)
        span.set_status(trace.Status(trace.StatusCode.ERROR, state.error_code))
    span.end()


@contextlib.contextmanager
def upstream_call(turn: Any) -> Iterator[Any]:
    """Open the span of one upstream call and make it current while the call is made (the
    task that sends it inherits it); yield it for ``upstream_call_ended``, None when off."""
    parent = turn.span
    if parent is None:
        yield None
        return
    tracer = _tracer()
    context = trace.set_span_in_context(parent)
    span = tracer.start_span(f"chat {turn.model}", context=context, kind=trace.SpanKind.CLIENT)
    span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": turn.model})
    with trace.use_span(span, end_on_exit=False):
        yield span


def upstream_call_ended(span: Any, turn: Any, error: str) -> None:
    """Close an upstream call's span with what the upstream that answered said, and the
    error code that ended the call, if one did."""
    if span is None:
        return
    route = turn.stream.route if turn.stream is not None else None
    if route is not None:
        span.set_attributes(
            {
                "chatproxy.upstream": route.upstream.name,
                "gen_ai.response.model": route.model,
                "server.address": urlsplit(route.upstream.base_url).hostname or "",
            }
        )
    state = turn.state
    if state.response_id:
        span.set_attribute("gen_ai.response.id", state.response_id)
    if state.finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [state.finish_reason])
    if (usage := state.usage) is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.get("prompt_tokens") or 0)
        span.set_attribute("gen_ai.usage.output_tokens", usage.get("completion_tokens") or 0)
    if error:
        span.set_attribute("error.type", error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    span.end()


def failed_over(upstream: str, code: str, to: str) -> None:
    """Note a failover on the current upstream call's span."""
    if trace is not None and conf.CHATPROXY_TRACES:
        attributes = {"chatproxy.upstream": upstream, "error.type": code, "chatproxy.next": to}
        trace.get_current_span().add_event("chatproxy.failover", attributes)


@contextlib.contextmanager
def tool_run(turn: Any, call: Any) -> Iterator[Any]:
    """A span around one server tool's run, child of the turn's; yields it (None when off)
    for ``tool_ended``."""
    parent = turn.span
    if parent is None:
        yield None
        return
    context = trace.set_span_in_context(parent)
    name = call["name"]
    with _tracer().start_as_current_span(
        f"execute_tool {name}", context=context, kind=trace.SpanKind.INTERNAL
    ) as span:
        span.set_attributes(
            {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "gen_ai.tool.call.id": call["id"],
            }
        )
        if conf.CHATPROXY_TRACE_CONTENT:
            span.set_attribute("gen_ai.tool.call.arguments", call["arguments"])
        yield span


def tool_ended(span: Any, result: Any) -> None:
    """Record a tool's outcome (a ``tools.ToolResult``) on its span."""
    if span is None:
        return
    if result.error:
        span.set_attribute("error.type", "tool_error")
        span.set_status(trace.Status(trace.StatusCode.ERROR, "tool_error"))
    if conf.CHATPROXY_TRACE_CONTENT:
        span.set_attribute("gen_ai.tool.call.result", result.content())
