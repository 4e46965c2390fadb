"""TurnState, the pure accumulator: reasoning and tool calls beside the text; the replay of a
saved answer's."""

from __future__ import annotations

import uuid

import orjson

from chatproxy.chunks import Chunk, ToolCallDelta
from chatproxy.models import Message, Status
from chatproxy.resume import replay
from chatproxy.turns import Pieces, TurnState


def calls(*pieces: tuple[int, str, str, str]) -> Chunk:
    return Chunk(tool_calls=tuple(ToolCallDelta(*piece) for piece in pieces))


def test_text_only_chunks_give_back_plain_text():
    state = TurnState()

    assert [state.feed(Chunk("a")), state.feed(Chunk("b", finish_reason="length"))] == ["a", "b"]
    assert not state.mixed and state.finish_reason == "length"


def test_a_call_completes_when_the_next_index_starts_and_the_last_at_the_finish():
    state = TurnState()

    fed = [
        state.feed(calls((0, "call_a", "alpha", ""))),
        state.feed(calls((0, "", "", '{"x":'))),
        state.feed(calls((0, "", "", "1}"))),
        state.feed(calls((1, "call_b", "beta", '{"y":2}'))),
        state.feed(Chunk(finish_reason="tool_calls")),
    ]

    alpha = {"id": "call_a", "name": "alpha", "arguments": '{"x":1}'}
    beta = {"id": "call_b", "name": "beta", "arguments": '{"y":2}'}
    assert [piece.calls for piece in fed if isinstance(piece, Pieces)] == [
        [], [], [], [alpha], [beta]
    ]  # fmt: skip
    assert state.tool_calls == [alpha, beta]
    assert state.finish_reason == "tool_calls"


def test_interleaved_pieces_of_parallel_calls_are_not_cut_short():
    state = TurnState()

    for piece in [
        (0, "call_a", "write_a", '{"a":'),
        (1, "call_b", "write_b", '{"b":'),
        (0, "", "", "1}"),
        (1, "", "", "2}"),
    ]:
        state.feed(calls(piece))
    state.feed(Chunk(finish_reason="tool_calls"))

    assert state.tool_calls == [
        {"id": "call_a", "name": "write_a", "arguments": '{"a":1}'},
        {"id": "call_b", "name": "write_b", "arguments": '{"b":2}'},
    ]


def test_two_calls_without_index_are_told_apart_by_their_ids():
    state = TurnState()

    state.feed(calls((0, "call_1", "f", "{}"), (0, "call_2", "g", "{}")))
    state.feed(Chunk(finish_reason="tool_calls"))

    assert [call["id"] for call in state.tool_calls] == ["call_1", "call_2"]


def test_calls_still_open_when_the_body_ends_are_completed_by_close():
    state = TurnState()
    state.feed(calls((0, "", "f", '{"q":1}')))

    assert state.close() == [{"id": "call_0", "name": "f", "arguments": '{"q":1}'}]


def test_outcome_carries_reasoning_calls_and_usage_details():
    state = TurnState()
    usage = {
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "total_tokens": 12,
        "cached_tokens": 3,
        "reasoning_tokens": 4,
    }
    state.feed(Chunk(reasoning="Let me "))
    state.feed(Chunk(reasoning="see."))
    state.feed(Chunk("Done."))
    state.feed(Chunk(finish_reason="content_filter", usage=usage))  # type: ignore[arg-type]
    state.end(Status.COMPLETED)

    outcome = state.outcome()

    assert (outcome.content, outcome.reasoning) == ("Done.", "Let me see.")
    assert (outcome.cached_tokens, outcome.reasoning_tokens) == (3, 4)
    assert outcome.finish_reason == "content_filter"
    assert outcome.tool_calls == []


def test_delivered_reasoning_is_what_is_saved_while_interceptors_change_it():
    state = TurnState(transforming_reasoning=True)
    state.feed(Chunk(reasoning="secret"))
    state.deliver_reasoning("[redacted]")

    assert state.reasoning == "[redacted]"


async def test_replay_of_a_saved_answer_sends_its_reasoning_and_tool_calls():
    answer = Message(
        id=uuid.uuid4(),
        conversation_id=uuid.uuid4(),
        model="m",
        status=Status.COMPLETED,
        finish_reason="tool_calls",
        prompt_tokens=1,
        completion_tokens=2,
        total_tokens=3,
    )
    call = {"id": "call_1", "name": "now", "arguments": "{}"}
    # Set as attributes: the fields come with the request side's migration.
    answer.reasoning, answer.tool_calls, answer.reasoning_tokens = "Why?", [call], 2

    events = [orjson.loads(line) async for line in replay(answer)]

    assert [e["event"] for e in events] == ["analyzing", "reasoning", "tool_call", "completed"]
    assert events[1]["content"] == "Why?"
    assert events[2] == {"event": "tool_call", **call}
    assert events[-1]["tool_calls"] == [call]
    assert events[-1]["usage"]["reasoning_tokens"] == 2
