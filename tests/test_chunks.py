"""chunks.py: SSE framing by the WHATWG rules and the chunks of every server, without a network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatproxy.chunks import (
    Chunk,
    SSEDecoder,
    SSEEvent,
    ToolCallDelta,
    parse_chunk,
    parse_completion,
)
from chatproxy.exceptions import UpstreamError
from tests.conftest import fixture

STREAM = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\r\n\r\n'
    b'event: message\ndata: {"id":"c1","choices":[{"index":0,"delta":{"content":"lo"},'
    b'"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,'
    b'"total_tokens":3}}\n\n'
    b"data: [DONE]\n\n"
)


def decode_all(pieces: list[bytes]) -> list[bytes | SSEEvent]:
    decoder = SSEDecoder()
    return [event for piece in pieces for event in decoder.feed(piece)] + decoder.close()


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_sse_payloads_are_the_same_however_the_bytes_are_split(cuts):
    bounds = [0, *sorted(cuts), len(STREAM)]

    payloads = decode_all([STREAM[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])

    assert payloads == decode_all([STREAM])
    assert len(payloads) == 5 and payloads[-1] == b"[DONE]"


def test_multi_line_data_is_joined_with_newlines():
    assert decode_all([b"data: {\n", b"data: }\n\n"]) == [b"{\n}"]


def test_chunks_carry_text_finish_reason_and_usage():
    chunks = [parse_chunk(p) for p in decode_all([STREAM])[:-1]]

    assert chunks == [
        Chunk(response_id="c1"),
        Chunk("Hel", response_id="c1"),
        Chunk("lo", finish_reason="stop", response_id="c1"),
        Chunk(
            usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, response_id="c1"
        ),
    ]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b'{"error": {"message": "boom"}}', "upstream_error"),
        (b"{not json", "upstream_bad_response"),
        (b"\xff\xfe", "upstream_bad_response"),
        (b"[1, 2]", "upstream_bad_response"),
        (b'{"choices": [{"delta": "text"}]}', "upstream_bad_response"),
        (b'{"choices": [], "usage": {"prompt_tokens": 1}}', "upstream_bad_response"),
    ],
)
def test_errors_and_garbage_raise_upstream_errors(payload, code):
    with pytest.raises(UpstreamError) as raised:
        parse_chunk(payload)

    assert raised.value.code == code
    assert "boom" not in raised.value.message


def test_every_line_ending_gives_the_same_events():
    lf = b"event: message\ndata: a\ndata: b\n\n: note\ndata: c\n\n"

    for ending in (b"\r\n", b"\r"):
        assert decode_all([lf.replace(b"\n", ending)]) == decode_all([lf]) == [b"a\nb", b"c"]


def test_a_cr_and_its_lf_split_across_two_reads_end_one_line():
    assert decode_all([b"data: a\r", b"\ndata: b\r\n\r", b"\n"]) == [b"a\nb"]


def test_a_leading_bom_is_dropped_even_split_across_reads():
    assert decode_all([b"\xef", b"\xbb", b"\xbfdata: x\n\n"]) == [b"x"]
    assert decode_all([b"\xef\xbb\xbfdata: \xef\xbb\xbf\n\n"]) == [
        b"\xef\xbb\xbf"
    ]  # only the first


def test_fields_with_and_without_the_space_and_comments():
    assert decode_all([b"data:a\ndata:  b\n:comment\ndata\n\n"]) == [b"a\n b\n"]


def test_id_and_retry_are_kept_and_other_fields_ignored():
    decoder = SSEDecoder()

    events = decoder.feed(b"id: 7\nretry: 1500\nretry: soon\nfoo: bar\ndata: x\n\n")

    assert events == [b"x"]
    assert (decoder.last_event_id, decoder.retry) == (b"7", 1500)


def test_a_typed_event_is_not_a_data_event():
    assert decode_all([b"event: ping\ndata: {}\n\ndata: y\n\n"]) == [SSEEvent("ping", b"{}"), b"y"]


def test_an_event_without_data_is_not_dispatched():
    assert decode_all([b"event: x\n\nid: 3\n\ndata: z\n\n"]) == [b"z"]


def test_a_last_event_without_its_blank_line_is_dispatched_at_the_end():
    decoder = SSEDecoder()

    assert decoder.feed(b"data: a\n\ndata: b") == [b"a"]
    assert decoder.close() == [b"b"]


def test_llama_cpp_error_field_is_an_error_event():
    assert decode_all([fixture("llamacpp-error.sse")])[:1] == [
        SSEEvent(
            "error",
            b'{"code":400,"message":"the request exceeds the available context size, '
            b'try increasing it","type":"exceed_context_size_error"}',
        )
    ]


def chunks_of(name: str) -> list[Chunk]:
    return [parse_chunk(p) for p in decode_all([fixture(name)]) if p != b"[DONE]"]


def test_azure_content_filter_chunks_and_usage_details():
    chunks = chunks_of("azure-content-filter.sse")

    assert "".join(c.content for c in chunks) == "Capital of Denmark."
    assert chunks[0] == Chunk()  # the content-filter results alone
    assert chunks[-2].finish_reason == "stop"
    assert chunks[-1].usage == {
        "prompt_tokens": 15,
        "completion_tokens": 78,
        "total_tokens": 93,
        "cached_tokens": 0,
        "reasoning_tokens": 64,
    }


def test_groq_reasoning_and_usage_in_x_groq_or_beside_choices():
    chunks = chunks_of("groq-reasoning.sse")

    assert "".join(c.reasoning for c in chunks) == "Okay, let me try to figure out"
    assert "".join(c.content for c in chunks) == " Answer**: $\\boxed{3}$"
    assert chunks[-1].usage == {
        "prompt_tokens": 17,
        "completion_tokens": 1107,
        "total_tokens": 1124,
        "reasoning_tokens": 963,
    }


def test_tool_call_pieces_of_groq_mistral_and_gemini():
    groq, mistral, gemini = (
        [c for c in chunks_of(name) if c.tool_calls]
        for name in ("groq-tool-call.sse", "mistral-tool-call.sse", "gemini-tool-call.sse")
    )

    assert groq[0].tool_calls == (ToolCallDelta(0, "tk85n1k4m", "weather", "{}"),)
    assert mistral[0].tool_calls == (
        ToolCallDelta(0, "gSIMJiOkT", "weather", '{"location": "San Francisco"}'),
    )
    assert mistral[0].usage == {"prompt_tokens": 124, "completion_tokens": 22, "total_tokens": 146}
    (call,) = gemini[0].tool_calls
    assert (call.index, call.id, call.name) == (0, "", "set_in_user_memory")
    assert gemini[0].finish_reason == "stop"


def test_llama_cpp_reasoning_content():
    chunks = chunks_of("llamacpp-reasoning.sse")

    assert "".join(c.reasoning for c in chunks) == " it handles a"
    assert "".join(c.content for c in chunks) == "Yes."


def test_openrouter_reasoning_details_count_once_beside_reasoning():
    both = (
        b'{"choices":[{"index":0,"delta":{"reasoning":"ab",'
        b'"reasoning_details":[{"type":"reasoning.text","text":"ab"}]}}]}'
    )
    details = (
        b'{"choices":[{"index":0,"delta":{"reasoning_details":['
        b'{"type":"reasoning.summary","summary":"s"},{"type":"reasoning.encrypted","data":"x"}]}}]}'
    )

    assert parse_chunk(both).reasoning == "ab"
    assert parse_chunk(details).reasoning == "s"


def test_only_choice_zero_is_the_answer():
    other = b'{"choices":[{"index":1,"delta":{"content":"B"}}]}'
    both = b'{"choices":[{"index":1,"delta":{"content":"B"}},{"index":0,"delta":{"content":"A"}}]}'

    assert parse_chunk(other).content == ""
    assert parse_chunk(both).content == "A"


def test_usage_that_arrives_with_the_last_content_chunk_is_kept():
    chunk = parse_chunk(
        b'{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"length"}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
    )

    assert chunk == Chunk(
        "x",
        finish_reason="length",
        usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    )


@pytest.mark.parametrize(
    "payload",
    [
        fixture("openai-inband-error.sse").split(b"data: ")[-1].strip(),
        fixture("openrouter-inband-error.sse").split(b"data: ")[-1].strip(),
        b'{"object":"error","message":"boom","type":"BadRequestError","code":400}',  # vLLM, Mistral
        b'[{"error":{"code":500,"message":"boom","status":"INTERNAL"}}]',  # Gemini
        b'{"choices":[{"index":0,"delta":{},"finish_reason":"error"}]}',
    ],
)
def test_in_band_errors_of_every_server_raise_upstream_error(payload):
    with pytest.raises(UpstreamError) as raised:
        parse_chunk(payload)

    assert raised.value.code == "upstream_error"
    assert raised.value.message == "The model's server failed while answering. Try again."


def test_a_whole_completion_is_read_as_one_chunk():
    body = (
        b'{"id":"c9","object":"chat.completion","choices":[{"index":0,"finish_reason":"tool_calls",'
        b'"message":{"role":"assistant","content":"Hm.","reasoning_content":"think",'
        b'"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]}}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
    )

    assert parse_completion(body) == Chunk(
        "Hm.",
        "think",
        (ToolCallDelta(0, "call_1", "f", "{}"),),
        "tool_calls",
        {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        "c9",
    )


def test_a_whole_error_body_raises_upstream_error():
    with pytest.raises(UpstreamError) as raised:
        parse_completion(b'{"error":{"message":"boom"}}')

    assert raised.value.code == "upstream_error"


MIXED = (
    b"\xef\xbb\xbf: a comment\r"
    b"data: one\r\ndata:two\n\r\n"
    b"event: note\rdata: three\r\r"
    b"id: 9\ndata: four\r\n\r\n"
    b"data: five"  # the last event, without its blank line
)


@given(st.lists(st.integers(min_value=0, max_value=len(MIXED)), max_size=30))
def test_mixed_line_endings_and_a_bom_give_the_same_events_however_split(cuts):
    bounds = [0, *sorted(cuts), len(MIXED)]

    events = decode_all([MIXED[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])

    assert events == [b"one\ntwo", SSEEvent("note", b"three"), b"four", b"five"]
