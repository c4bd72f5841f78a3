"""Record shapes → `PreferencePair`: one reader per shape (alpaca, sharegpt, openai messages, TRL
prompt/chosen/rejected, implicit prompt), and the detection of a file's shape from its columns.

Every problem with one record raises `RecordError(field, reason)`; `data/sources.py` adds the file
and record index and either stops with a `DataError` or skips the record.

Shapes (the column names are the defaults; a `dataset_info.json` entry can rename them):

    alpaca     instruction, input, chosen, rejected [, system, history, tools]
    sharegpt   conversations (list of {from, value}), chosen, rejected [, system, tools]
    openai     messages (list of {role, content}), chosen, rejected [, system, tools]
    prompt     prompt (string or messages), chosen, rejected: TRL's standard and conversational
               shapes, and UltraFeedback-binarized (chosen/rejected repeat the prompt)
    implicit   chosen, rejected only: two whole conversations sharing all but the last message,
               or two Anthropic-HH transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...")
    unpaired   prompt, completion, label: TRL's unpaired (KTO) shape, one reply and its label

KTO data (`to_example`: one reply with a true/false label) also comes as LLaMA-Factory's: a
`dataset_info.json` entry with a `kto_tag` column, its records alpaca (instruction, input, output)
or sharegpt/openai (the conversation's last assistant message is the reply).

A reply (`chosen`/`rejected`) may be a string, one assistant message, a list holding one assistant
message, or the whole conversation (the prompt's messages, then one assistant message). A reply that
is a tool call (a sharegpt `function_call` message, an assistant message with `tool_calls`) keeps its
calls (`PreferencePair.chosen_calls` / `rejected_calls`) and its text, which may then be empty.

Tools, in the three shapes people have them, become one form: `tools` (LLaMA-Factory's JSON string of
function definitions, or TRL's list of JSON schemas) → a JSON list of the definitions as the record
writes them (bare or {"type": "function", "function": {...}}: LLaMA-Factory's seed_oss prints them as
given; data/chat.py wraps bare ones for a tokenizer's own template); a sharegpt `function_call` turn (JSON
{"name", "arguments"} or a list of them) or an OpenAI assistant message's `tool_calls` → an
assistant message with `tool_calls` [{"type": "function", "function": {"name", "arguments"}}],
arguments parsed from JSON when they are a JSON object; an `observation` turn or `tool` message →
a tool message (keeping its `name` and `tool_call_id`). Any shape may carry a
`chat_template_kwargs` column (an object): that record's own chat-template arguments.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from prefalign.contracts import Message, PreferencePair, RecordSource
from prefalign.errors import DataError, did_you_mean

MAX_FIELD_CHARS = 1_000_000
"""The longest text accepted in one field. Far beyond any context window: a longer value is a broken
record (a whole file pasted into a cell, a runaway generation), refused rather than truncated."""

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"
FUNCTION_CALL = "function_call"  # a sharegpt turn holding tool calls as JSON; becomes an assistant message
# A prompt alternates "user-side" turns (a user message, or a tool's result that the model answers)
# with assistant turns.
USER_SIDE = (USER, TOOL)

# LLaMA-Factory's placeholders: where each image / video of the record goes in the message text
# (data/media.py reads the media and checks the counts).
IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"

WHOLE_RECORD = "(whole record)"
"""The `field` of a problem that is not in one column: a line that does not parse, a non-object."""


class RecordError(Exception):
    """One record that cannot become a `PreferencePair`: `field` names the column (with a path into
    nested values, e.g. `conversations[2]`), `reason` says what was found and what was expected,
    `stage` where it failed (errors.STAGES: "parse", or "media" for its images and videos)."""

    def __init__(self, field: str, reason: str, stage: str = "parse"):
        super().__init__(f"field '{field}': {reason}")
        self.field = field
        self.reason = reason
        self.stage = stage


# ---------------------------------------------------------------------------------------------
# Formats: which column holds what, and how messages spell their roles


@dataclass(frozen=True)
class Columns:
    """Which column holds each part of a record; None: this shape does not read it.

    The names are LLaMA-Factory's `columns` keys: `prompt` is alpaca's instruction (and TRL's
    `prompt`), `query` alpaca's input, `messages` the conversation of sharegpt/openai records.
    """

    prompt: str | None = "instruction"
    query: str | None = "input"
    history: str | None = None
    messages: str | None = "conversations"
    system: str | None = None
    tools: str | None = None
    chosen: str = "chosen"
    rejected: str = "rejected"
    chat_template_kwargs: str | None = "chat_template_kwargs"
    response: str | None = None
    """Unpaired records: the column of the one reply (alpaca's `output`, TRL's `completion`)."""
    kto_tag: str | None = None
    """Unpaired records: the column of the label (true: desirable, false: undesirable); set for KTO data only."""
    images: str | None = None
    """The column of the prompt's images (data/media.py); None: a text dataset."""
    videos: str | None = None
    """The column of the prompt's videos (data/media.py); None: no videos."""


@dataclass(frozen=True)
class Tags:
    """How a message spells its role and content: the keys that may hold them (the first present
    wins) and a map from role values in the file to prefalign's roles."""

    role_keys: tuple[str, ...]
    content_keys: tuple[str, ...]
    roles: Mapping[str, str]

    @classmethod
    def from_names(cls, role_tag: str, content_tag: str, user_tag: str, assistant_tag: str,
                   observation_tag: str | None, function_tag: str | None, system_tag: str | None) -> "Tags":
        """Tags from LLaMA-Factory's `tags` names; a function call becomes an assistant turn with
        tool calls, an observation (a tool's result) a tool turn."""
        pairs = [(user_tag, USER), (assistant_tag, ASSISTANT), (observation_tag, TOOL),
                 (function_tag, FUNCTION_CALL), (system_tag, SYSTEM)]
        return cls((role_tag,), (content_tag,), {tag: role for tag, role in pairs if tag})


# LLaMA-Factory's default tags, and prefalign's for `formatting: openai`.
SHAREGPT_TAG_NAMES = dict(role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt",
                          observation_tag="observation", function_tag="function_call", system_tag="system")
OPENAI_TAG_NAMES = dict(role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant",
                        observation_tag="tool", function_tag=None, system_tag="system")
SHAREGPT_TAGS = Tags.from_names(**SHAREGPT_TAG_NAMES)
OPENAI_TAGS = Tags.from_names(**OPENAI_TAG_NAMES)
# Files read without a registry entry: accept either spelling, message by message.
AUTO_TAGS = Tags(("role", "from"), ("content", "value"), {**OPENAI_TAGS.roles, **SHAREGPT_TAGS.roles})


@dataclass(frozen=True)
class RecordFormat:
    """How to read the records of one dataset: the `shape` (a key of `SHAPES`), columns and tags."""

    shape: str
    columns: Columns = field(default_factory=Columns)
    tags: Tags = AUTO_TAGS

    @property
    def unpaired(self) -> bool:
        """Whether a record holds one labelled reply (KTO data) rather than a preference pair."""
        return self.columns.kto_tag is not None


# ---------------------------------------------------------------------------------------------
# Converting one record


class Turn(NamedTuple):
    """One message of a prompt, with the field it came from (for error messages); `extra` holds an
    assistant's `tool_calls` or a tool message's `name` / `tool_call_id`."""

    role: str
    content: str
    field: str
    extra: dict | None = None


# What a shape reader returns: prompt turns (no system), system text, chosen and rejected (a text, or the
# assistant Turn, which may hold tool calls).
Parts = tuple[list[Turn], "str | None", "str | Turn", "str | Turn"]


def _reply_parts(reply: "str | Turn") -> tuple[str, list[dict] | None]:
    """A reader's reply as (text, tool calls or None)."""
    if isinstance(reply, Turn):
        return reply.content, (reply.extra or {}).get("tool_calls")
    return reply, None


def to_pair(record: Any, fmt: RecordFormat, source: RecordSource) -> PreferencePair:
    """Convert one record to a `PreferencePair`; raise `RecordError` if it is not a usable pair."""
    if not isinstance(record, dict):
        raise RecordError(WHOLE_RECORD, f"expected an object with named fields, found {_kind(record)}")
    turns, system, *replies = SHAPES[fmt.shape].read(record, fmt)
    (chosen, chosen_calls), (rejected, rejected_calls) = map(_reply_parts, replies)
    _check_prompt(turns, fmt)
    _check_replies((chosen, chosen_calls), (rejected, rejected_calls), fmt.columns)
    prompt: list[Message] = [{"role": SYSTEM, "content": system}] if system else []
    prompt += [{"role": turn.role, "content": turn.content, **(turn.extra or {})} for turn in turns]
    return PreferencePair(prompt, chosen, rejected, source, _tools(record, fmt.columns.tools),
                          _template_kwargs(record, fmt.columns.chat_template_kwargs),
                          chosen_calls=chosen_calls, rejected_calls=rejected_calls)


def to_example(record: Any, fmt: RecordFormat, source: RecordSource) -> PreferencePair:
    """Convert one unpaired record (a prompt, one reply, its label) to a KTO example: a `PreferencePair`
    with `desirable` set, the reply as `chosen` and no `rejected` yet (data/feedback.py pairs it with
    its KL completion); raise `RecordError` naming the field if it is not usable."""
    if not isinstance(record, dict):
        raise RecordError(WHOLE_RECORD, f"expected an object with named fields, found {_kind(record)}")
    cols = fmt.columns
    desirable = _label(record, cols.kto_tag)
    if fmt.shape == "alpaca":
        turns = _alpaca_turns(record, cols)
        system, reply = _optional_text(record, cols.system), _text(_required(record, cols.response), cols.response)
        calls = None  # an Alpaca reply is text
    elif fmt.shape in ("sharegpt", "openai"):
        # LLaMA-Factory's KTO records: the conversation's last (assistant) message is the reply.
        turns = _messages(_required(record, cols.messages), cols.messages, fmt.tags)
        system = _leading_system(turns, record, cols.system)
        if not turns:
            raise RecordError(cols.messages, "is an empty list: expected a conversation ending with the reply")
        reply, calls = _reply_parts(_assistant(turns.pop(), "the last message (the labelled reply)"))
    else:  # TRL's unpaired shape: prompt, completion, label
        turns = _prompt_turns(record, fmt)
        system = _leading_system(turns, record, cols.system)
        reply, calls = _reply_parts(_reply(_required(record, cols.response), cols.response, turns, fmt.tags))
    _check_prompt(turns, fmt)
    if not reply.strip() and not calls:
        raise RecordError(cols.response or cols.messages, "the reply is empty or whitespace only: expected the "
                                                          "assistant's reply")
    prompt: list[Message] = [{"role": SYSTEM, "content": system}] if system else []
    prompt += [{"role": turn.role, "content": turn.content, **(turn.extra or {})} for turn in turns]
    return PreferencePair(prompt, reply, "", source, _tools(record, cols.tools),
                          _template_kwargs(record, cols.chat_template_kwargs), desirable=desirable,
                          chosen_calls=calls)


def _label(record: dict, column: str) -> bool:
    """A KTO label: a boolean, or the strings "true" / "false" (any case)."""
    value = _required(record, column)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise RecordError(column, f"expected the label true (a desirable reply) or false (an undesirable one), "
                                  f"found {_kind(value)}")
    return value


def _alpaca_turns(record: dict, cols: Columns) -> list[Turn]:
    turns = _history(record, cols.history)
    # LLaMA-Factory's rule: the user turn is "instruction\ninput", leaving out an empty part.
    parts = [_text(_required(record, cols.prompt), cols.prompt), _optional_text(record, cols.query)]
    turns.append(Turn(USER, "\n".join(part for part in parts if part), cols.prompt))
    return turns


def _read_alpaca(record: dict, fmt: RecordFormat) -> Parts:
    turns = _alpaca_turns(record, fmt.columns)
    return (turns, _optional_text(record, fmt.columns.system), *_replies(record, fmt, turns))


def _read_conversation(record: dict, fmt: RecordFormat) -> Parts:
    column = fmt.columns.messages
    turns = _messages(_required(record, column), column, fmt.tags)
    system = _leading_system(turns, record, fmt.columns.system)
    return (turns, system, *_replies(record, fmt, turns))


def _prompt_turns(record: dict, fmt: RecordFormat) -> list[Turn]:
    column = fmt.columns.prompt
    value = _required(record, column)
    if isinstance(value, list):
        return _messages(value, column, fmt.tags)
    # A prompt string is one user message (TRL's standard shape).
    return [Turn(USER, _text(value, column, "a string or a list of messages"), column)]


def _read_prompt(record: dict, fmt: RecordFormat) -> Parts:
    turns = _prompt_turns(record, fmt)
    system = _leading_system(turns, record, fmt.columns.system)
    return (turns, system, *_replies(record, fmt, turns))


def _read_implicit(record: dict, fmt: RecordFormat) -> Parts:
    """No prompt column: the prompt is what `chosen` and `rejected` share."""
    cols = fmt.columns
    chosen, rejected = _required(record, cols.chosen), _required(record, cols.rejected)
    expected = "a conversation (list of messages) or a Human/Assistant transcript string"
    if isinstance(chosen, str):
        _text(rejected, cols.rejected, f"a string like '{cols.chosen}'")
        return _split_transcripts(chosen, rejected, cols)
    if isinstance(chosen, list):
        if not isinstance(rejected, list):
            raise RecordError(cols.rejected, f"expected a list of messages like '{cols.chosen}', "
                                             f"found {_kind(rejected)}")
        return _split_conversations(chosen, rejected, fmt)
    raise RecordError(cols.chosen, f"expected {expected}, found {_kind(chosen)}")


def _split_conversations(chosen: list, rejected: list, fmt: RecordFormat) -> Parts:
    cols = fmt.columns
    chosen_turns = _messages(chosen, cols.chosen, fmt.tags)
    rejected_turns = _messages(rejected, cols.rejected, fmt.tags)
    for turns, column in ((chosen_turns, cols.chosen), (rejected_turns, cols.rejected)):
        if not turns:
            raise RecordError(column, "is an empty list: expected a conversation ending in the reply")
    shared = _shared_length(chosen_turns, rejected_turns)
    if len(chosen_turns) != len(rejected_turns) or shared < len(chosen_turns) - 1:
        raise RecordError(cols.rejected, f"does not match '{cols.chosen}' before the last message "
                                         f"({len(rejected_turns)} and {len(chosen_turns)} messages, first "
                                         f"difference at message {shared}): without a prompt column, both "
                                         "must be the same conversation with a different last message")
    turns = chosen_turns[:-1]
    system = _leading_system(turns, {}, None)
    replies = [_assistant(t, "the last message") for t in (chosen_turns[-1], rejected_turns[-1])]
    return (turns, system, *replies)


HUMAN_MARK, ASSISTANT_MARK = "\n\nHuman:", "\n\nAssistant:"
_TRANSCRIPT_SPLIT = re.compile(r"(\n\nHuman:|\n\nAssistant:)")


def _split_transcripts(chosen: str, rejected: str, cols: Columns) -> Parts:
    """Anthropic-HH strings: the prompt ends at the last "\\n\\nAssistant:" both strings share; it is
    parsed into user/assistant turns (as TRL's hh-rlhf script does), the rest is the reply."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARK)
    if cut < 0 or HUMAN_MARK not in "\n\n" + chosen[:cut]:
        raise RecordError(cols.chosen, "is a string and there is no prompt column: expected an "
                                       "Anthropic-HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...') "
                                       f"sharing everything up to its last Assistant turn with "
                                       f"'{cols.rejected}'; otherwise add a 'prompt' column")
    replies = []
    for text, column in ((chosen, cols.chosen), (rejected, cols.rejected)):
        reply = text[cut + len(ASSISTANT_MARK):]
        if HUMAN_MARK in reply or ASSISTANT_MARK in reply:
            raise RecordError(column, f"differs from '{cols.rejected if column == cols.chosen else cols.chosen}'"
                                      " before its last Assistant turn: the transcripts must share "
                                      "every turn but the last")
        replies.append(reply.strip())
    prompt = chosen[:cut]
    if not prompt.startswith("\n\n"):
        prompt = "\n\n" + prompt  # some transcripts start with "Human:" directly
    pieces = _TRANSCRIPT_SPLIT.split(prompt)
    if pieces[0].strip():
        raise RecordError(cols.chosen, "expected the transcript to start with 'Human:'")
    turns = [
        Turn(USER if mark == HUMAN_MARK else ASSISTANT, content.strip(), f"{cols.chosen} (turn {n})")
        for n, (mark, content) in enumerate(zip(pieces[1::2], pieces[2::2]))
    ]
    return turns, None, replies[0], replies[1]


@dataclass(frozen=True)
class Shape:
    """A record shape: the columns that identify it, its reader, and its default columns."""

    keys: tuple[str, ...]
    read: Callable[[dict, RecordFormat], Parts]
    columns: Columns


SHAPES: dict[str, Shape] = {
    "alpaca": Shape(("instruction", "chosen", "rejected"), _read_alpaca,
                    Columns(system="system", history="history", tools="tools")),
    "sharegpt": Shape(("conversations", "chosen", "rejected"), _read_conversation,
                      Columns(system="system", tools="tools")),
    "openai": Shape(("messages", "chosen", "rejected"), _read_conversation,
                    Columns(messages="messages", system="system", tools="tools")),
    "prompt": Shape(("prompt", "chosen", "rejected"), _read_prompt,
                    Columns(prompt="prompt", query=None, system="system", tools="tools")),
    "implicit": Shape(("chosen", "rejected"), _read_implicit,
                      Columns(prompt=None, query=None, messages=None, tools="tools")),
    # TRL's unpaired (KTO) shape; records are read by `to_example`, never as pairs
    "unpaired": Shape(("prompt", "completion", "label"), _read_prompt,
                      Columns(prompt="prompt", query=None, system="system", tools="tools", response="completion",
                              kto_tag="label")),
}


# ---------------------------------------------------------------------------------------------
# Parts of a record


def _required(record: dict, column: str | None) -> Any:
    if column not in record:
        raise RecordError(str(column), f"is missing: the record has fields {_names(record)}")
    return record[column]


def _optional(record: dict, column: str | None) -> Any:
    return record.get(column) if column else None


def _text(value: Any, field: str, expected: str = "a string") -> str:
    """`value` as text: a string of at most MAX_FIELD_CHARS characters."""
    if value is None:
        raise RecordError(field, f"is null: expected {expected}")
    if not isinstance(value, str):
        raise RecordError(field, f"expected {expected}, found {_kind(value)}")
    if len(value) > MAX_FIELD_CHARS:
        raise RecordError(field, f"holds {len(value):,} characters, more than the limit of "
                                 f"{MAX_FIELD_CHARS:,}: a broken record, not a training example")
    return value


def _optional_text(record: dict, column: str | None) -> str | None:
    value = _optional(record, column)
    return None if value is None else _text(value, column) or None


def _history(record: dict, column: str | None) -> list[Turn]:
    """Alpaca's `history`: earlier [user, assistant] exchanges, oldest first."""
    value = _optional(record, column)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError(column, f"expected a list of [user, assistant] pairs, found {_kind(value)}")
    turns = []
    for n, pair in enumerate(value):
        where = f"{column}[{n}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RecordError(where, f"expected a [user, assistant] pair of strings, found {_kind(pair)}")
        turns.append(Turn(USER, _text(pair[0], f"{where}[0]"), f"{where}[0]"))
        turns.append(Turn(ASSISTANT, _text(pair[1], f"{where}[1]"), f"{where}[1]"))
    return turns


def _messages(value: Any, field: str, tags: Tags) -> list[Turn]:
    if value is None:
        raise RecordError(field, "is null: expected a list of messages")
    if not isinstance(value, list):
        raise RecordError(field, f"expected a list of messages, found {_kind(value)}")
    return [_message(item, f"{field}[{n}]", tags) for n, item in enumerate(value)]


def _message(value: Any, field: str, tags: Tags) -> Turn:
    """One message object → Turn; tool calls and tool results as the module docstring says; a list
    of text parts is joined."""
    if not isinstance(value, dict):
        raise RecordError(field, f"expected a message object with '{tags.role_keys[0]}' and "
                                 f"'{tags.content_keys[0]}', found {_kind(value)}")
    role_key = next((key for key in tags.role_keys if key in value), tags.role_keys[0])
    tag = value.get(role_key)
    if role_key not in value:
        raise RecordError(f"{field}.{role_key}", f"is missing: the message has fields {_names(value)}")
    if tag not in tags.roles:
        raise RecordError(f"{field}.{role_key}", f"is {_kind(tag)}: expected one of the roles "
                                                 f"{sorted(tags.roles)}")
    role = tags.roles[tag]
    content_key = next((key for key in tags.content_keys if key in value), tags.content_keys[0])
    content = value.get(content_key)
    where = f"{field}.{content_key}"
    if role == FUNCTION_CALL:  # sharegpt: the content is the call(s) as JSON
        calls = _json(_text(content, where), where, "the tool call(s) as JSON, e.g. {\"name\": ..., \"arguments\": ...}")
        return Turn(ASSISTANT, "", field, {"tool_calls": _tool_calls(calls, where)})
    if role == ASSISTANT and value.get("tool_calls"):
        calls = _tool_calls(value["tool_calls"], f"{field}.tool_calls")
        text = "" if content is None else _text(content, where)
        return Turn(ASSISTANT, text, field, {"tool_calls": calls})
    if isinstance(content, list):
        content = _join_text_parts(content, where)
    extra = {key: value[key] for key in ("name", "tool_call_id") if role == TOOL and isinstance(value.get(key), str)}
    return Turn(role, _text(content, where), field, extra or None)


def _json(text: str, field: str, expected: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(field, f"is not JSON ({err.msg} at character {err.pos}): expected {expected}") from None


def _tool_calls(value: Any, field: str) -> list[dict]:
    """Tool calls in any of the three shapes → [{"type": "function", "function": {"name", "arguments"}}]."""
    calls = value if isinstance(value, list) else [value]
    normalized = []
    for n, call in enumerate(calls):
        where = f"{field}[{n}]"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError(where, f"expected a tool call {{\"name\": ..., \"arguments\": ...}}, found {_kind(call)}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
                arguments = parsed if isinstance(parsed, dict) else arguments
            except json.JSONDecodeError:
                pass  # arguments a template prints as they are
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        normalized.append(entry)
    return normalized


_MEDIA_PARTS = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}


def _join_text_parts(parts: list, field: str) -> str:
    """A message's content parts as one text: text parts joined by newlines; an image (video) part,
    TRL's `{"type": "image"}`, becomes the placeholder `<image>` (`<video>`) right where it stands,
    its image read from the record's images column in placeholder order (data/media.py)."""
    text, last = "", None
    for n, part in enumerate(parts):
        where = f"{field}[{n}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            if any(part.get(key) is not None for key in ("image", "video", "url", "path")):
                raise RecordError(where, f"a {kind} part that carries the {kind} itself: prefalign reads "
                                         f"media from the record's {kind}s column; keep {{'type': '{kind}'}} "
                                         f"here and put the {kind} in the column")
            text, last = text + _MEDIA_PARTS[kind], kind
            continue
        if kind != "text":
            raise RecordError(where, f"expected a text part {{'type': 'text', 'text': ...}} or an image "
                                     f"part {{'type': 'image'}}, found {_kind(part)}")
        text += ("\n" if last == "text" else "") + _text(part.get("text"), f"{where}.text")
        last = "text"
    return text


def _leading_system(turns: list[Turn], record: dict, column: str | None) -> str | None:
    """Pop a leading system message from `turns`; else read the system column. The message wins, as
    in LLaMA-Factory."""
    if turns and turns[0].role == SYSTEM:
        return turns.pop(0).content or None
    return _optional_text(record, column)


def _replies(record: dict, fmt: RecordFormat, turns: list[Turn]) -> tuple["str | Turn", "str | Turn"]:
    cols = fmt.columns
    return (_reply(_required(record, cols.chosen), cols.chosen, turns, fmt.tags),
            _reply(_required(record, cols.rejected), cols.rejected, turns, fmt.tags))


def _reply(value: Any, field: str, prompt: list[Turn], tags: Tags) -> "str | Turn":
    """A reply: a string, an assistant message, or a message list (one assistant message, or the
    prompt's messages followed by one assistant message, as in UltraFeedback-binarized)."""
    if isinstance(value, dict):
        return _assistant(_message(value, field, tags), "the reply")
    if not isinstance(value, list):
        return _text(value, field, "a string, an assistant message or a list of messages")
    turns = _messages(value, field, tags)
    if turns and turns[0].role == SYSTEM:
        turns = turns[1:]
    if not turns:
        raise RecordError(field, "is an empty list: expected the assistant's reply")
    if len(turns) > 1:
        head = turns[:-1]
        if _shared_length(head, prompt) != len(head) or len(head) != len(prompt):
            raise RecordError(field, f"holds {len(turns)} messages: expected one assistant message, or "
                                     "the prompt's messages followed by one assistant message, but its "
                                     "first messages are not the prompt")
    return _assistant(turns[-1], "the reply")


def _assistant(turn: Turn, what: str) -> Turn:
    if turn.role != ASSISTANT:
        raise RecordError(turn.field, f"{what} has role '{turn.role}': expected an assistant message")
    return turn


def _shared_length(a: list[Turn], b: list[Turn]) -> int:
    """How many leading messages `a` and `b` share (same role, same text up to surrounding space)."""
    n = 0
    while n < min(len(a), len(b)) and (a[n].role, a[n].content.strip()) == (b[n].role, b[n].content.strip()):
        n += 1
    return n


def _tools(record: dict, column: str | None) -> str | None:
    """Tool definitions as a JSON list, each as the record writes it; None when absent.

    The column holds a list or an object, or (LLaMA-Factory) a JSON string of one. A bare function
    definition ({"name", "description", "parameters"}) stays bare: LLaMA-Factory's tool formats read
    either, and its seed_oss format prints the list as given.
    """
    value = _optional(record, column)
    expected = "a JSON list of tool definitions"
    if isinstance(value, str):
        value = _json(_text(value, column), column, expected) if value.strip() else None
    if not value:
        return None
    if not isinstance(value, (list, dict)):
        raise RecordError(column, f"expected a list (or an object, or a JSON string) of tool definitions, found "
                                  f"{_kind(value)}")
    tools = value if isinstance(value, list) else [value]
    for n, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise RecordError(f"{column}[{n}]", f"expected a tool definition (an object), found {_kind(tool)}")
    return json.dumps(tools, ensure_ascii=False)


def _template_kwargs(record: dict, column: str | None) -> dict | None:
    """A record's own chat-template arguments (an object, or a JSON string of one); None when absent."""
    from prefalign.data.templates import RESERVED_TEMPLATE_KWARGS

    value = _optional(record, column)
    if isinstance(value, str):
        value = _json(value, column, "an object of chat-template arguments") if value.strip() else None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RecordError(column, f"expected an object of chat-template arguments, found {_kind(value)}")
    reserved = sorted(set(value) & set(RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise RecordError(f"{column}.{reserved[0]}", "is set by prefalign itself, not by a record")
    return value or None


# ---------------------------------------------------------------------------------------------
# Checks on the converted pair


def _check_prompt(turns: list[Turn], fmt: RecordFormat) -> None:
    """Alternating user-side/assistant turns, ending with a user-side turn that is not empty."""
    where = fmt.columns.messages if fmt.shape in ("sharegpt", "openai") else (
        fmt.columns.prompt or fmt.columns.chosen)
    if not turns:
        raise RecordError(where, "the prompt is empty: expected at least one user message")
    for n, turn in enumerate(turns):
        expected = USER_SIDE if n % 2 == 0 else (ASSISTANT,)
        if turn.role not in expected:
            wanted = "a user (or tool) message" if n % 2 == 0 else "an assistant message"
            after = "first" if n == 0 else f"after a {turns[n - 1].role} message"
            raise RecordError(turn.field, f"has role '{turn.role}' {after}: expected {wanted}; a prompt "
                                          "is an optional system message, then user and assistant "
                                          "messages taking turns")
    if len(turns) % 2 == 0:
        raise RecordError(where, f"the prompt has {len(turns)} messages and ends with an assistant "
                                 "message: expected an odd number ending with a user message (the "
                                 "replies belong in the chosen and rejected columns)")
    if not turns[-1].content.strip():
        raise RecordError(turns[-1].field, "the last user message is empty")


def _check_replies(chosen: tuple[str, list | None], rejected: tuple[str, list | None], cols: Columns) -> None:
    """Each reply (text, tool calls) says something; the two differ."""
    for (text, calls), column in ((chosen, cols.chosen), (rejected, cols.rejected)):
        if not text.strip() and not calls:
            raise RecordError(column, "is empty or whitespace only: expected the assistant's reply")
    if (chosen[0].strip(), chosen[1]) == (rejected[0].strip(), rejected[1]):
        raise RecordError(cols.rejected, f"is identical to '{cols.chosen}': such a pair carries no "
                                         "preference (its DPO loss cannot change)")


# ---------------------------------------------------------------------------------------------
# Which shape: detected from the columns, or given by a dataset_info.json entry


def detect_format(records: Iterable[Any], where: str) -> RecordFormat:
    """The shape whose columns the records have (the union of the first 100 records' keys).

    Raises `DataError` listing the columns found when no shape or more than one fits.
    """
    keys: set[str] = set()
    for n, record in enumerate(records):
        if n == 100:
            break
        if isinstance(record, dict):
            keys.update(record)
    fits = [name for name, shape in SHAPES.items() if set(shape.keys) <= keys]
    if len(fits) > 1 and "implicit" in fits:
        fits.remove("implicit")  # any prompt column means the prompt is explicit
    if fits == ["openai", "prompt"]:
        # UltraFeedback-binarized keeps the chosen conversation in `messages` beside `prompt`.
        fits = ["prompt"]
    if len(fits) == 1:
        # media columns by their usual names: LF's `images` / `videos`, TRL's `image` / `images`
        media = {kind: next((name for name in (f"{kind}s", kind) if name in keys), None) for kind in ("image", "video")}
        columns = replace(SHAPES[fits[0]].columns, images=media["image"], videos=media["video"])
        return RecordFormat(fits[0], columns, AUTO_TAGS)
    considered = "; ".join(f"{name} ({', '.join(shape.keys)})" for name, shape in SHAPES.items())
    problem = (f"fit several shapes ({', '.join(fits)})" if fits
               else "fit no preference record shape")
    hint = (" (a preference dataset needs 'chosen' and 'rejected' columns; KTO data 'prompt', 'completion' and "
            "'label')"
            if not {"chosen", "rejected"} <= keys else "")
    raise DataError(f"{where}: cannot tell the record format: its columns {sorted(keys)} {problem}"
                    f"{hint}. Shapes considered: {considered}. Rename the columns, or register the "
                    "file in dataset_info.json with \"formatting\" and \"columns\"")


REGISTRY_FORMATTINGS = ("alpaca", "sharegpt", "openai")
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools", "chosen",
               "rejected", "chat_template_kwargs", "kto_tag", "images", "videos")
UNSUPPORTED_COLUMNS = {
    "audios": "prefalign trains text and vision-language models, not audio ones",
}
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag",
            "function_tag", "system_tag")


def format_from_registry(formatting: Any, columns: Any, tags: Any, where: str) -> RecordFormat:
    """The format a LLaMA-Factory `dataset_info.json` entry describes (`where` names the entry).

    The entry's `columns` and `tags` override the defaults of its formatting one by one (LLaMA-Factory
    instead drops the defaults it does not repeat); `system`, `history` and `tools` are read only
    when `columns` names them, as in LLaMA-Factory.
    """
    if formatting not in REGISTRY_FORMATTINGS:
        raise DataError(f"{where}: \"formatting\" is {formatting!r}; expected one of "
                        f"{', '.join(REGISTRY_FORMATTINGS)}")
    defaults = Columns(messages="messages") if formatting == "openai" else Columns()
    renamed = _names_map(columns, "columns", COLUMN_KEYS, where, UNSUPPORTED_COLUMNS)
    if renamed.get("kto_tag"):  # a KTO dataset: one reply per record (alpaca's `output`, or the last message)
        renamed.setdefault("response", "output")
    else:
        renamed.pop("kto_tag", None)
        renamed.pop("response", None)  # the SFT answer; a preference dataset's replies are chosen/rejected
    tag_names = {**(OPENAI_TAG_NAMES if formatting == "openai" else SHAREGPT_TAG_NAMES),
                 **_names_map(tags, "tags", TAG_KEYS, where, {})}
    for key in ("chosen", "rejected", "prompt" if formatting == "alpaca" else "messages"):
        if key in renamed and renamed[key] is None:
            raise DataError(f'{where}: "columns"."{key}" is null: expected a column name')
    for key in ("role_tag", "content_tag", "user_tag", "assistant_tag"):
        if tag_names[key] is None:
            raise DataError(f'{where}: "tags"."{key}" is null: expected a name')
    return RecordFormat(formatting, replace(defaults, **renamed), Tags.from_names(**tag_names))


def _names_map(value: Any, key: str, allowed: tuple[str, ...], where: str,
               unsupported: Mapping[str, str]) -> dict[str, str | None]:
    """A registry entry's `columns`/`tags` object, checked: known keys, string (or null) values."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: \"{key}\" is {_kind(value)}; expected an object")
    for name, column in value.items():
        if name in unsupported:
            raise DataError(f"{where}: \"{key}\".\"{name}\" is not supported: {unsupported[name]}")
        if name not in allowed:
            raise DataError(f"{where}: unknown key \"{key}\".\"{name}\"{hint_in_parentheses(name, allowed)}; "
                            f"known keys: {', '.join(allowed)}")
        if column is not None and not isinstance(column, str):
            raise DataError(f"{where}: \"{key}\".\"{name}\" is {_kind(column)}; expected a name (string)")
    return dict(value)


# ---------------------------------------------------------------------------------------------
# Wording


def hint_in_parentheses(name: str, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" (errors.did_you_mean) after a message, or "" when no choice is close."""
    hint = did_you_mean(name, list(choices))
    return f" ({hint})" if hint else ""


def _kind(value: Any) -> str:
    """A short description of a JSON value for error messages: 'a number (42)', 'a list'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"an object with fields {_names(value)}"
    return f"a {type(value).__name__}"


def _names(record: dict) -> str:
    names = [str(key) for key in record]
    return "[" + ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") + "]"
