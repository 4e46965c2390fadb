"""The request: content parts, tools, tool results and typed parameters, checked before any
database work. Each refusal has its own code and a message that says the fix."""

from __future__ import annotations

import base64
import re
import uuid
from pathlib import Path

import orjson
import pytest

from chatproxy.exceptions import RequestError
from chatproxy.payload import check_tool_results, pending_tool_calls, validate_request

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 30).decode()
PNG_URL = f"data:image/png;base64,{PNG}"
TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
HI = {"role": "user", "content": "Hi"}
CALLED = {"role": "assistant", "content": None, "tool_calls": [CALL]}


def image(url, **more):
    return {"type": "image_url", "image_url": {"url": url, **more}}


def user(content):
    return {"messages": [{"role": "user", "content": content}]}


def refusal(body, **kwargs):
    with pytest.raises(RequestError) as caught:
        validate_request(body, **kwargs)
    return caught.value.code, caught.value.message


def test_content_parts_go_upstream_as_sent():
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://img.example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
    ]

    assert validate_request(user(parts)).messages == [{"role": "user", "content": parts}]


@pytest.mark.parametrize(
    ("part", "code"),
    [
        ({"type": "text"}, "invalid_content_part"),
        ({"text": "no type"}, "invalid_content_part"),
        ({"type": "image_url", "image_url": "https://a.example/x.png"}, "invalid_content_part"),
        (image("x", detail="max"), "invalid_content_part"),
        (image("http://a.example/x.png"), "invalid_image"),
        (image("https://u:p@a.example/x"), "invalid_image"),
        (image("javascript:alert(1)"), "invalid_image"),
        (image("data:image/svg+xml;base64,PHN2Zz4="), "invalid_image"),
        (image("data:image/png;base64,%%%"), "invalid_image"),
        ({"type": "input_audio", "input_audio": {}}, "part_type_not_allowed"),
    ],
)
def test_malformed_parts_are_refused_with_their_own_code(part, code):
    assert refusal(user([{"type": "text", "text": "Hi"}, part]))[0] == code


def test_a_data_url_must_hold_the_type_it_names():
    jpeg_named_png = "data:image/png;base64," + base64.b64encode(b"\xff\xd8\xff" * 10).decode()

    assert refusal(user([{"type": "image_url", "image_url": {"url": jpeg_named_png}}])) == (
        "invalid_image",
        "messages[0].content[0] says image/png, but its bytes are not a png image.",
    )


def test_an_allowed_extra_part_type_passes_through(settings):
    settings.CHATPROXY_EXTRA_PART_TYPES = ["input_audio"]
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}

    assert validate_request(user([audio])).messages[0]["content"] == [audio]


def test_an_image_host_outside_the_allowlist_is_refused(settings):
    settings.CHATPROXY_IMAGE_HOSTS = ["img.example.com"]
    part = {"type": "image_url", "image_url": {"url": "https://evil.example/x.png"}}

    assert refusal(user([part])) == (
        "image_host_not_allowed",
        "messages[0].content[0] links an image on evil.example, which is not an allowed host; "
        "link one on img.example.com, or send it as a data URL.",
    )


def test_images_count_toward_their_own_limits(settings):
    settings.CHATPROXY_MAX_IMAGES = 1
    image = {"type": "image_url", "image_url": {"url": PNG_URL}}

    assert refusal(user([image, image]))[0] == "too_many_images"
    settings.CHATPROXY_MAX_IMAGES, settings.CHATPROXY_MAX_IMAGE_BYTES = 4, 60
    assert refusal(user([image, image])) == (
        "image_too_large",
        "The images sent as data URLs take 76 bytes; send at most 60: make them smaller, "
        "or link them by https URL.",
    )


def test_text_parts_count_toward_the_character_limit(settings):
    settings.CHATPROXY_MAX_CHARS = 5

    assert refusal(user([{"type": "text", "text": "abc"}, {"type": "text", "text": "def"}]))[0] == (
        "too_many_characters"
    )


def test_images_are_refused_in_a_system_message(settings):
    settings.CHATPROXY_ALLOW_SYSTEM_MESSAGES = True
    image = {"type": "image_url", "image_url": {"url": PNG_URL}}
    body = {"messages": [{"role": "system", "content": [image]}, {"role": "user", "content": "Hi"}]}

    assert refusal(body)[0] == "part_type_not_allowed"


def test_tools_and_their_choice_go_upstream_as_sent():
    body = {
        **user("What time is it?"),
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "parallel_tool_calls": False,
    }

    assert validate_request(body).params == {
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "parallel_tool_calls": False,
    }


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"tools": []}, "invalid_tools"),
        ({"tools": [{"type": "function", "function": {"name": "get time"}}]}, "invalid_tools"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "invalid_tools"),
        ({"tools": [{"type": "retrieval"}]}, "invalid_tools"),
        ({"tools": [{"type": "function", "function": {"parameters": []}}]}, "invalid_tools"),
        ({"tools": [TOOL, TOOL]}, "invalid_tools"),
        ({"tools": [TOOL], "tool_choice": "always"}, "invalid_tool_choice"),
        ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "invalid_parameter"),
        ({"response_format": {"type": "xml"}}, "invalid_response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "invalid_response_format",
        ),
        ({"stop": ""}, "invalid_stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_stop"),
        ({"reasoning_effort": "max"}, "invalid_parameter"),
        ({"max_completion_tokens": 1.5}, "invalid_parameter"),
    ],
)
def test_bad_parameters_are_refused_with_their_own_code(fields, code):
    assert refusal({**user("Hi"), **fields})[0] == code


def test_tools_are_capped_in_count_and_size(settings):
    settings.CHATPROXY_MAX_TOOLS = 1
    second = {"type": "function", "function": {"name": "other"}}

    assert refusal({**user("Hi"), "tools": [TOOL, second]}) == (
        "too_many_tools",
        "Send at most 1 tools; this request has 2.",
    )
    settings.CHATPROXY_MAX_TOOLS_BYTES = 50
    assert refusal({**user("Hi"), "tools": [TOOL]})[0] == "tools_too_large"


def test_a_json_schema_is_capped_in_size(settings):
    settings.CHATPROXY_MAX_SCHEMA_BYTES = 30
    schema = {"name": "answer", "schema": {"type": "object", "properties": {"a": {}}}}

    assert (
        refusal({**user("Hi"), "response_format": {"type": "json_schema", "json_schema": schema}})[
            0
        ]
        == "schema_too_large"
    )


def test_structured_output_stop_and_effort_pass_their_checks():
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": True}}
    body = {**user("Hi"), "response_format": fmt, "stop": ["\n\n"], "reasoning_effort": "low"}

    assert validate_request(body).params == {
        "response_format": fmt,
        "stop": ["\n\n"],
        "reasoning_effort": "low",
    }


def test_the_client_cannot_set_the_upstream_user():
    assert refusal({**user("Hi"), "user": "someone-else"}) == (
        "unknown_field",
        "Leave out the field 'user': the server sets it from who is asking.",
    )


def test_the_old_numbers_only_parameter_setting_keeps_working(settings):
    settings.CHATPROXY_PARAMETERS = {"temperature": (0.0, 1.0), "max_tokens": (1, 100)}

    assert validate_request({**user("Hi"), "temperature": 1.7, "max_tokens": 500}).params == {
        "temperature": 1.0,
        "max_tokens": 100,
    }
    assert refusal({**user("Hi"), "tools": [TOOL]})[0] == "unknown_field"


def test_a_client_held_history_carries_tool_calls_and_their_results():
    messages = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]

    assert validate_request({"messages": messages}).messages == messages


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ([{"role": "tool", "tool_call_id": "call_1", "content": "12:00"}], "tool_results_mismatch"),
        ([HI, CALLED], "invalid_messages"),
        ([HI, CALLED, HI], "tool_results_mismatch"),
        ([HI, CALLED, {"role": "assistant", "content": "Done"}, HI], "tool_results_mismatch"),
        ([{"role": ["user"], "content": "Hi"}], "role_not_allowed"),
        ([{"role": {"user": 1}, "content": "Hi"}], "role_not_allowed"),
        ([HI, {**CALLED, "tool_calls": [{**CALL, "id": ""}]}], "invalid_tool_calls"),
        ([HI, {"role": "assistant", "content": None}], "invalid_messages"),
        ([HI, CALLED, {"role": "tool", "tool_call_id": "call_1"}], "invalid_messages"),
    ],
)
def test_a_history_with_tool_calls_must_be_well_formed(messages, code):
    assert refusal({"messages": messages})[0] == code


def test_a_continuation_may_be_just_the_tool_results():
    body = {
        "conversation_id": str(uuid.uuid4()),
        "messages": [{"role": "tool", "tool_call_id": "call_1", "content": "12:00"}],
    }

    assert validate_request(body).tool_results == ["call_1"]


def test_a_continuation_puts_the_tool_results_first():
    body = {
        "conversation_id": str(uuid.uuid4()),
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        ],
    }

    assert refusal(body) == (
        "invalid_messages",
        "messages[1] is a tool message after a user message: put the tool results first.",
    )


def test_pending_tool_calls_are_those_of_the_last_answer_not_yet_answered():
    history = [
        {"role": "user", "content": "Time in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]

    assert pending_tool_calls(history) == ["call_2"]
    assert pending_tool_calls([*history, {"role": "user", "content": "Never mind"}]) == []


def test_tool_results_must_answer_exactly_the_pending_calls():
    check_tool_results(["call_2", "call_1"], ["call_1", "call_2"])
    with pytest.raises(RequestError) as caught:
        check_tool_results(["call_1"], ["call_1", "call_2"])

    assert caught.value.message == (
        "The last answer called the tools call_1, call_2: start the new messages with exactly "
        "one tool message for each (tool_call_id); this request answers call_1."
    )


def test_the_example_requests_in_the_protocol_page_are_valid():
    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = text.split("\n## Request\n", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"```json\n(.*?)```", section, flags=re.DOTALL)

    assert [validate_request(orjson.loads(e)).messages[0]["role"] for e in examples] == [
        "user",
        "tool",
    ]
