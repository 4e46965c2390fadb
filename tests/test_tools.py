"""Server tools: the schema derived from type hints, the checks, the arguments' validation."""

from __future__ import annotations

import pytest

from chatproxy.checks import check_settings
from tests import sample_tools


def test_a_tools_schema_comes_from_its_hints_and_docstring():
    assert sample_tools.weather.schema() == {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Tell the weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city's name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }


def test_options_name_the_tool_and_literals_lists_and_optionals_are_described():
    schema = sample_tools.choose.schema()["function"]
    assert schema["name"] == "pick"
    assert schema["description"] == "Pick one."
    assert schema["parameters"]["properties"] == {
        "color": {"enum": ["red", "green"], "type": "string"},
        "sizes": {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]},
        "ratio": {"type": "number"},
    }
    assert schema["parameters"]["required"] == ["color"]


def test_the_turn_parameter_is_not_offered_to_the_model():
    assert sample_tools.conversations.parameters["properties"] == {}
    assert sample_tools.conversations.wants_turn


def test_arguments_are_checked_against_the_schema_and_enums_converted():
    assert sample_tools.weather.arguments('{"city": "Oslo", "unit": "fahrenheit"}') == {
        "city": "Oslo",
        "unit": sample_tools.Unit.FAHRENHEIT,
    }
    for text, message in [
        ("{", "The arguments are not valid JSON."),
        ("[]", "The arguments must be a JSON object."),
        ("{}", "arguments lack the required city."),
        ('{"city": 3}', "city must be of type string."),
        ('{"city": "Oslo", "when": 1}', "arguments have the unknown when."),
        ('{"city": "Oslo", "unit": "kelvin"}', "unit must be one of 'celsius', 'fahrenheit'."),
    ]:
        with pytest.raises(ValueError) as caught:
            sample_tools.weather.arguments(text)
        assert str(caught.value) == message


def test_a_registered_tool_passes_the_checks(settings):
    settings.CHATPROXY_TOOLS = ["tests.sample_tools.weather", "tests.sample_tools.add"]
    assert [m.id for m in check_settings()] == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tests.sample_tools.weather", "chatproxy.E020"),
        (["tests.sample_tools.nowhere"], "chatproxy.E020"),
        (["tests.sample_tools.plain"], "chatproxy.E020"),
        (["tests.sample_tools.weather", "tests.sample_tools.weather"], "chatproxy.E020"),
        (["tests.sample_tools.unsupported"], "chatproxy.E021"),
    ],
)
def test_bad_tools_are_refused_at_start_up(settings, value, expected):
    settings.CHATPROXY_TOOLS = value
    assert [m.id for m in check_settings()] == [expected]


def test_an_unsupported_hint_says_which_types_work(settings):
    settings.CHATPROXY_TOOLS = ["tests.sample_tools.unsupported"]
    assert check_settings()[0].msg == (
        "unsupported(when) has the type set[str], which chatproxy cannot describe to the "
        "model: use str, int, float, bool, X | None, list[X], Literal[...] or a str Enum."
    )
