"""Record shapes → PreferencePair (data/formats.py): each shape, shape detection, registry formats,
and every kind of bad record, on records built in the test."""

import json

import pytest

from prefalign.contracts import RecordSource
from prefalign.data.formats import (
    AUTO_TAGS,
    MAX_FIELD_CHARS,
    SHAPES,
    RecordError,
    RecordFormat,
    detect_format,
    format_from_registry,
    to_pair,
)
from prefalign.errors import DataError

SOURCE = RecordSource("prefs.jsonl", 3, 4, "prefs")


def convert(record, shape=None, fmt=None):
    """Convert with the default columns of `shape`, or with the shape detected from the record."""
    if fmt is None:
        fmt = RecordFormat(shape, SHAPES[shape].columns, AUTO_TAGS) if shape else detect_format([record], "x")
    return to_pair(record, fmt, SOURCE)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def bad(record, shape=None, fmt=None) -> RecordError:
    with pytest.raises(RecordError) as caught:
        convert(record, shape, fmt)
    return caught.value


# --- each shape ------------------------------------------------------------------------------


def test_alpaca_joins_instruction_and_input_after_history_and_system():
    pair = convert({"instruction": "Translate.", "input": "Hello", "system": "Be exact.",
                    "history": [["Hi", "Hi!"]], "chosen": "Bonjour", "rejected": "Hola"}, "alpaca")
    assert pair.prompt == [{"role": "system", "content": "Be exact."}, user("Hi"), assistant("Hi!"),
                           user("Translate.\nHello")]
    assert (pair.chosen, pair.rejected, pair.source, pair.tools) == ("Bonjour", "Hola", SOURCE, None)


@pytest.mark.parametrize("instruction, query, expected", [
    ("Do it.", "", "Do it."), ("Do it.", None, "Do it."), ("", "Only input", "Only input"),
])
def test_alpaca_leaves_out_an_empty_instruction_or_input(instruction, query, expected):
    pair = convert({"instruction": instruction, "input": query, "chosen": "a", "rejected": "b"}, "alpaca")
    assert pair.prompt == [user(expected)]


def test_sharegpt_maps_function_call_to_assistant_and_observation_to_tool():
    record = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "weather"}'},
            {"from": "observation", "value": '{"sun": true}'},
        ],
        "chosen": {"from": "gpt", "value": "Sunny."},
        "rejected": {"from": "gpt", "value": "Snow."},
        "tools": [{"name": "weather"}],
    }
    pair = convert(record)
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "tool"]
    assert pair.prompt[1] == {"role": "assistant", "content": "",
                              "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {}}}]}
    assert (pair.chosen, pair.rejected) == ("Sunny.", "Snow.")
    assert json.loads(pair.tools) == [{"name": "weather"}]  # as the record writes it (LF's seed_oss prints it so)


def test_sharegpt_leading_system_turn_wins_over_the_system_column():
    conversation = [{"from": "human", "value": "Q"}]
    record = {"conversations": conversation, "system": "column", "chosen": "a", "rejected": "b"}
    assert convert(record).prompt[0] == {"role": "system", "content": "column"}
    record["conversations"] = [{"from": "system", "value": "turn"}] + conversation
    assert convert(record).prompt[0] == {"role": "system", "content": "turn"}


def test_openai_messages_with_tool_calls_and_text_parts():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Add 2"}, {"type": "text", "text": "and 3"}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "[2, 3]"}}]},
            {"role": "tool", "content": "5"},
        ],
        "chosen": [assistant("It is 5.")],
        "rejected": [assistant("It is 6.")],
    }
    pair = convert(record)
    assert pair.prompt[0] == user("Add 2\nand 3")
    # arguments that are not a JSON object stay the string they are
    assert pair.prompt[1] == {"role": "assistant", "content": "",
                              "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "[2, 3]"}}]}
    assert pair.prompt[2] == {"role": "tool", "content": "5"}
    assert (pair.chosen, pair.rejected) == ("It is 5.", "It is 6.")


def test_trl_standard_prompt_string_is_one_user_message():
    pair = convert({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert pair.prompt == [user("2+2?")] and (pair.chosen, pair.rejected) == ("4", "5")


def test_trl_conversational_prompt_messages_and_assistant_message_lists():
    record = {"prompt": [{"role": "system", "content": "S"}, user("Q")],
              "chosen": [assistant("good")], "rejected": [assistant("bad")]}
    pair = convert(record)
    assert pair.prompt == [{"role": "system", "content": "S"}, user("Q")]
    assert (pair.chosen, pair.rejected) == ("good", "bad")


def test_ultrafeedback_replies_repeat_the_prompt_and_extra_columns_are_ignored():
    record = {"prompt": "Q", "prompt_id": "x1", "score_chosen": 8.0, "score_rejected": 2.0,
              "chosen": [user("Q"), assistant("good")], "rejected": [user("Q"), assistant("bad")],
              "messages": [user("Q"), assistant("good")]}
    pair = convert(record)
    assert pair.prompt == [user("Q")] and (pair.chosen, pair.rejected) == ("good", "bad")


def test_a_reply_list_must_start_with_the_prompt():
    err = bad({"prompt": "Q", "chosen": [user("other"), assistant("good")], "rejected": "bad"})
    assert err.field == "chosen" and "prompt" in err.reason


def test_implicit_prompt_from_conversations_is_everything_but_the_last_message():
    shared = [{"role": "system", "content": "S"}, user("Hi"), assistant("Hello"), user("Q")]
    pair = convert({"chosen": shared + [assistant("good")], "rejected": shared + [assistant("bad")]})
    assert pair.prompt == shared and (pair.chosen, pair.rejected) == ("good", "bad")


@pytest.mark.parametrize("rejected", [
    [user("Q2"), assistant("bad")],                                  # differs in the prompt
    [user("Q"), assistant("good"), user("more"), assistant("bad")],  # longer conversation
])
def test_implicit_conversations_must_differ_only_in_the_last_message(rejected):
    err = bad({"chosen": [user("Q"), assistant("good")], "rejected": rejected})
    assert err.field == "rejected" and "last message" in err.reason


def test_implicit_prompt_from_hh_transcripts_is_parsed_into_turns():
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Best fruit?\n\nAssistant:"
    pair = convert({"chosen": prefix + " An orange.", "rejected": prefix + " A rock."})
    assert pair.prompt == [user("Hi"), assistant("Hello!"), user("Best fruit?")]
    assert (pair.chosen, pair.rejected) == ("An orange.", "A rock.")


def test_hh_transcripts_split_at_the_last_shared_assistant_marker():
    """The replies share their first word; the split is still at the marker, not mid-reply."""
    prefix = "Human: Colour of grass?\n\nAssistant: "
    pair = convert({"chosen": prefix + "It is green.", "rejected": prefix + "It is red."})
    assert pair.prompt == [user("Colour of grass?")]
    assert (pair.chosen, pair.rejected) == ("It is green.", "It is red.")


@pytest.mark.parametrize("chosen, rejected, says", [
    ("The answer is yes", "The answer is no", "Anthropic-HH"),
    ("\n\nHuman: A\n\nAssistant: x\n\nHuman: B\n\nAssistant: y",
     "\n\nHuman: A\n\nAssistant: z\n\nHuman: B\n\nAssistant: y", "before its last Assistant turn"),
])
def test_implicit_strings_that_are_not_matching_transcripts_are_refused(chosen, rejected, says):
    err = bad({"chosen": chosen, "rejected": rejected})
    assert says in err.reason


def test_tools_given_as_a_list_become_a_json_string_of_the_definitions_as_written():
    wrapped = {"type": "function", "function": {"name": "g"}}
    pair = convert({"prompt": "Q", "chosen": "a", "rejected": "b", "tools": [{"name": "f"}, wrapped]})
    assert json.loads(pair.tools) == [{"name": "f"}, wrapped]


# --- shape detection --------------------------------------------------------------------------


@pytest.mark.parametrize("columns, shape", [
    (["instruction", "input", "chosen", "rejected"], "alpaca"),
    (["conversations", "chosen", "rejected"], "sharegpt"),
    (["messages", "chosen", "rejected"], "openai"),
    (["prompt", "chosen", "rejected"], "prompt"),
    (["chosen", "rejected"], "implicit"),
    (["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen"], "prompt"),  # UltraFeedback
])
def test_detect_format_from_columns(columns, shape):
    assert detect_format([dict.fromkeys(columns, "")], "f.json").shape == shape


def test_detect_format_uses_the_columns_of_several_records():
    """A first record that lacks a column is a bad record, not a different shape."""
    records = [{"prompt": "Q", "chosen": "a"}, {"prompt": "Q", "chosen": "a", "rejected": "b"}]
    assert detect_format(records, "f.json").shape == "prompt"


@pytest.mark.parametrize("columns, says", [
    (["instruction", "prompt", "chosen", "rejected"], "fit several shapes (alpaca, prompt)"),
    (["instruction", "output"], "needs 'chosen' and 'rejected'"),
    (["question", "better", "worse"], "fit no preference record shape"),
])
def test_detect_format_refuses_ambiguous_or_unknown_columns(columns, says):
    with pytest.raises(DataError) as caught:
        detect_format([dict.fromkeys(columns, "")], "data/f.json")
    message = str(caught.value)
    assert message.startswith("data/f.json: ") and says in message
    assert all(repr(column) in message for column in columns)  # the columns found
    assert all(name in message for name in SHAPES)                # the shapes considered
    assert "\n" not in message


# --- registry formats -------------------------------------------------------------------------


def test_registry_columns_override_the_defaults_one_by_one():
    fmt = format_from_registry("alpaca", {"chosen": "good", "rejected": "bad", "system": "sys"}, None, "e")
    assert (fmt.columns.prompt, fmt.columns.query) == ("instruction", "input")  # defaults kept
    pair = convert({"instruction": "Q", "sys": "S", "good": "a", "bad": "b"}, fmt=fmt)
    assert pair.prompt == [{"role": "system", "content": "S"}, user("Q")]


def test_registry_alpaca_reads_system_only_when_columns_name_it():
    """As in LLaMA-Factory: an unmapped `system` column is not read."""
    fmt = format_from_registry("alpaca", None, None, "e")
    pair = convert({"instruction": "Q", "system": "S", "chosen": "a", "rejected": "b"}, fmt=fmt)
    assert pair.prompt == [user("Q")]


def test_registry_tags_rename_roles_and_keys():
    fmt = format_from_registry("sharegpt", {"messages": "dialog"},
                               {"role_tag": "who", "content_tag": "says", "user_tag": "me",
                                "assistant_tag": "bot"}, "e")
    record = {"dialog": [{"who": "me", "says": "Q"}], "chosen": {"who": "bot", "says": "a"},
              "rejected": {"who": "bot", "says": "b"}}
    assert convert(record, fmt=fmt).prompt == [user("Q")]
    record["dialog"][0]["who"] = "human"  # the default tag no longer counts
    assert bad(record, fmt=fmt).field == "dialog[0].who"


def test_registry_openai_formatting_reads_messages_with_role_and_content():
    fmt = format_from_registry("openai", None, None, "e")
    pair = convert({"messages": [user("Q")], "chosen": assistant("a"), "rejected": assistant("b")}, fmt=fmt)
    assert pair.prompt == [user("Q")] and pair.chosen == "a"


@pytest.mark.parametrize("formatting, columns, tags, says", [
    ("alpaca", {"choosen": "x"}, None, "unknown key \"columns\".\"choosen\" (did you mean 'chosen'?)"),
    ("sharegpt", None, {"role": "x"}, "unknown key \"tags\".\"role\""),
    ("alpaca", {"audios": "a"}, None, "not audio ones"),
    ("alpaca", {"kto_tag": 3}, None, "\"columns\".\"kto_tag\" is a number (3); expected a name"),
    ("alpaca", {"chosen": 3}, None, "expected a name"),
    ("alpaca", {"chosen": None}, None, "is null"),
    ("alpaca", "chosen", None, "expected an object"),
    ("markdown", None, None, "\"formatting\" is 'markdown'"),
])
def test_registry_format_errors_name_the_entry_and_key(formatting, columns, tags, says):
    with pytest.raises(DataError) as caught:
        format_from_registry(formatting, columns, tags, "dataset 'd' in data/dataset_info.json")
    assert str(caught.value).startswith("dataset 'd' in data/dataset_info.json: ") and says in str(caught.value)


# --- bad records: each names the field and what was expected -----------------------------------

GOOD = {"prompt": "Q", "chosen": "good", "rejected": "bad"}


@pytest.mark.parametrize("change, field, says", [
    ({"rejected": ...}, "rejected", "is missing: the record has fields [prompt, chosen]"),
    ({"chosen": 42}, "chosen", "found a number (42)"),
    ({"prompt": {"text": "Q"}}, "prompt", "expected a string or a list of messages"),
    ({"chosen": None}, "chosen", "is null"),
    ({"prompt": None}, "prompt", "is null"),
    ({"chosen": ""}, "chosen", "empty or whitespace only"),
    ({"rejected": " \n\t"}, "rejected", "empty or whitespace only"),
    ({"rejected": "good"}, "rejected", "identical to 'chosen'"),
    ({"rejected": "good  "}, "rejected", "identical to 'chosen'"),
    ({"prompt": "   "}, "prompt", "last user message is empty"),
    ({"chosen": "x" * (MAX_FIELD_CHARS + 1)}, "chosen", "1,000,001 characters, more than the limit"),
    ({"chosen": [user("Q")]}, "chosen[0]", "expected an assistant message"),
    ({"chosen": []}, "chosen", "empty list"),
    ({"tools": 7}, "tools", "tool definitions"),
    ({"tools": "[{'name': 1}]"}, "tools", "is not JSON"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs", "expected an object of chat-template arguments"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools", "set by prefalign itself"),
])
def test_bad_record_names_the_field(change, field, says):
    record = {**GOOD, **change}
    record = {key: value for key, value in record.items() if value is not ...}
    err = bad(record, "prompt")
    assert err.field == field and says in err.reason


def test_a_field_at_the_length_limit_is_accepted():
    assert len(convert({**GOOD, "chosen": "x" * MAX_FIELD_CHARS}).chosen) == MAX_FIELD_CHARS


@pytest.mark.parametrize("conversation, field, says", [
    ([user("Q"), user("Q again")], "messages[1]", "has role 'user' after a user message"),
    ([assistant("A"), user("Q")], "messages[0]", "has role 'assistant' first"),
    ([user("Q"), {"role": "system", "content": "S"}, user("Q")], "messages[1]", "role 'system'"),
    ([user("Q"), assistant("A")], "messages", "ends with an assistant message"),
    ([], "messages", "the prompt is empty"),
    ([{"role": "robot", "content": "x"}], "messages[0].role", "expected one of the roles"),
    ([{"content": "x"}], "messages[0].role", "is missing"),
    ([{"role": "user", "content": 5}], "messages[0].content", "found a number (5)"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]", "or an image part"),
    (["just a string"], "messages[0]", "expected a message object"),
    ("not a list", "messages", "expected a list of messages"),
])
def test_conversation_with_wrong_role_order_or_length(conversation, field, says):
    err = bad({"messages": conversation, "chosen": assistant("a"), "rejected": assistant("b")}, "openai")
    assert err.field == field and says in err.reason


def test_sharegpt_even_length_conversation_names_its_column():
    record = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
              "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}
    err = bad(record)
    assert err.field == "conversations" and "2 messages" in err.reason


def test_alpaca_history_must_be_pairs():
    err = bad({"instruction": "Q", "history": [["only one"]], "chosen": "a", "rejected": "b"}, "alpaca")
    assert err.field == "history[0]" and "[user, assistant] pair" in err.reason


def test_a_record_that_is_not_an_object():
    err = bad(["Q", "a", "b"], "prompt")
    assert err.field == "(whole record)" and "expected an object" in err.reason
