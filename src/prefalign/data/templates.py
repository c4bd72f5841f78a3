"""What `template: NAME` means, and the end-of-turn token of a template.

Every LLaMA-Factory template name resolves (`resolve_template`), to one of:

- a built-in template: the name's LLaMA-Factory slots (`data/template_formats.py`) turned into a
  Jinja string for `tokenizer.apply_chat_template(..., chat_template=...)`, so it renders the text
  LLaMA-Factory renders for that name: a default system message where the record has none, the
  system text in the first user turn for Llama-2-style formats, tool results in the observation
  slot. Message contents are inserted verbatim, `{bos}`/`{eos}` only where the tokenizer has them,
  and the prompt is always a string prefix of prompt + reply (each user slot ends with the
  assistant header);
- the tokenizer's own chat template with the arguments the name implies (reasoning templates:
  `qwen3` → enable_thinking true, `qwen3_nothink` → enable_thinking false).

Leaving `template` unset uses the tokenizer's own template with no implied arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prefalign.data.template_formats import LLAMA_FACTORY_TEMPLATES, Format, Own
from prefalign.errors import ConfigError, closest


@dataclass(frozen=True)
class ChatTemplate:
    """A built-in chat template.

    `end_of_turn` is the string that closes an assistant turn, the token training ends each reply
    with and generation stops at; None means the tokenizer's eos token. `special_tokens` are the
    markup strings that must be single tokens of the vocabulary; `description` is one line for
    listings and the data report.
    """

    name: str
    jinja: str
    end_of_turn: str | None
    special_tokens: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class TemplateChoice:
    """What a `template:` value resolves to: a built-in template, or (builtin None) the tokenizer's
    own, rendered with `kwargs` on top of the config's chat_template_kwargs."""

    name: str | None
    builtin: ChatTemplate | None
    kwargs: dict = field(default_factory=dict)
    note: str = ""

    @property
    def description(self) -> str:
        """For the data report and model card: what renders the records, and with which arguments."""
        if self.builtin is not None:
            return f"{self.builtin.name} (built-in, LLaMA-Factory's format)"
        own = "the tokenizer's own chat template"
        if self.name is None:
            return own
        args = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in self.kwargs.items())
        return f"{self.name} → {own}" + (f" with {args}" if args else "") + (f" ({self.note})" if self.note else "")


# The rules for templates that refuse a record (data/chat.py applies them): a system turn the
# template cannot render, a prompt that is not a prefix of prompt + reply.
UNSUPPORTED_SYSTEM = ("fold", "error")
NOT_PREFIX = ("error", "append")

# Arguments of apply_chat_template that prefalign sets; a chat_template_kwargs entry may not override them.
RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "return_dict", "return_tensors", "padding",
                            "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask")


# ---------------------------------------------------------------------------------------------
# Slots → Jinja

_MARKER = re.compile(r"\{(content|bos|eos|idx)\}")
_MARKER_EXPRESSIONS = {"bos": "(bos_token or '')", "eos": "(eos_token or '')", "idx": "((loop.index0 // 2) | string)"}
# Markup that is one token in every model that uses it: `<|...|>`, DeepSeek's `<｜...｜>`, Gemma's turns.
_MARKUP_TOKEN = re.compile(r"<\|[^<>|\s]+\|>|<｜[^<>｜]+｜>|<(?:start|end)_of_turn>")


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _expression(slot: str, content: str = "content") -> str:
    """A slot as a Jinja expression, `{content}` standing for the variable `content`."""
    parts, at = [], 0
    for marker in _MARKER.finditer(slot):
        if marker.start() > at:
            parts.append(_literal(slot[at:marker.start()]))
        parts.append(content if marker.group(1) == "content" else _MARKER_EXPRESSIONS[marker.group(1)])
        at = marker.end()
    if at < len(slot):
        parts.append(_literal(slot[at:]))
    return " + ".join(parts) or "''"


def _raise(text: str) -> str:
    return "{{ raise_exception(" + text + ") }}"


def format_to_jinja(name: str, fmt: Format) -> str:
    """The Jinja chat template that renders LLaMA-Factory's `fmt` for a list of messages.

    As in LLaMA-Factory: the prefix, then (if the record or the format has a system message) the
    system slot, before the first turn or, for `system_in_first_user`, inside it; then each turn's
    slot. A tool call or a tool list has no built-in format: the record needs the tokenizer's own
    template.
    """
    no_tools = (f"'The {name} template renders no tool definitions or tool calls; leave template unset to "
                "use the tokenizer\\'s own chat template for data with tools.'")
    system = _expression(fmt.system, "system_message")
    parts = [
        "{% if tools %}" + _raise(no_tools) + "{% endif %}",
        "{{ " + _expression(fmt.prefix) + " }}" if fmt.prefix else "",
        "{% if messages and messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = '' %}"
        "{% set loop_messages = messages %}{% endif %}",
        "{% if not system_message %}{% set system_message = " + _literal(fmt.default_system) + " %}{% endif %}",
        "" if fmt.system_in_first_user else "{% if system_message %}{{ " + system + " }}{% endif %}",
        "{% for message in loop_messages %}{% set content = message['content'] %}",
        "{% if loop.first and system_message %}{% set content = " + system + " + content %}{% endif %}"
        if fmt.system_in_first_user else "",
        "{% if message['tool_calls'] %}" + _raise(no_tools) + "{% endif %}",
        "{% if message['role'] == 'user' %}{{ " + _expression(fmt.user) + " }}",
        "{% elif message['role'] == 'assistant' %}{{ " + _expression(fmt.assistant) + " }}",
        "{% elif message['role'] == 'tool' %}{{ " + _expression(fmt.observation or fmt.user) + " }}",
        "{% else %}" + _raise(f"'The {name} template has no ' + message['role'] + ' turns after the first.'"),
        "{% endif %}{% endfor %}",
    ]
    return "".join(parts)


def _builtin(name: str, fmt: Format) -> ChatTemplate:
    slots = fmt.prefix + fmt.system + fmt.user + fmt.assistant + (fmt.observation or "")
    tokens = tuple(dict.fromkeys(_MARKUP_TOKEN.findall(slots)))
    return ChatTemplate(name=name, jinja=format_to_jinja(name, fmt), end_of_turn=fmt.end_of_turn,
                        special_tokens=tokens, description=turn_layout(fmt))


def turn_layout(fmt: Format) -> str:
    """One user turn and its reply as the format writes them, e.g. `[INST] {user}[/INST] {reply}{eos}`."""
    def show(slot: str, content: str) -> str:
        return slot.replace("{content}", content).replace("\n", "\\n")
    return show(fmt.prefix, "") + show(fmt.user, "{user}") + show(fmt.assistant, "{reply}")


BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    name: _builtin(name, fmt) for name, fmt in LLAMA_FACTORY_TEMPLATES.items() if isinstance(fmt, Format)
}
CHATML = BUILTIN_TEMPLATES["chatml"]
KNOWN_NAMES = tuple(LLAMA_FACTORY_TEMPLATES)


def resolve_template(name: str | None) -> TemplateChoice:
    """What `template: name` means (None: the tokenizer's own); a ConfigError listing the known names otherwise."""
    if name is None:
        return TemplateChoice(None, None)
    key = name.strip().lower()
    meaning = LLAMA_FACTORY_TEMPLATES.get(key)
    if isinstance(meaning, Format):
        return TemplateChoice(key, BUILTIN_TEMPLATES[key])
    if isinstance(meaning, Own):
        return TemplateChoice(key, None, dict(meaning.kwargs), meaning.why)
    match = closest(key, KNOWN_NAMES)
    hint = f" Did you mean `template: {match}`?" if match else ""
    raise ConfigError(
        f"Unknown chat template `template: {name}`.{hint} Known names (LLaMA-Factory's): {', '.join(sorted(KNOWN_NAMES))}; "
        "leave `template` unset to use the tokenizer's own."
    )


def get_template(name: str) -> ChatTemplate:
    """The built-in template called `name`; a ConfigError if the name is unknown or means the tokenizer's own."""
    choice = resolve_template(name)
    if choice.builtin is None:
        raise ConfigError(f"`template: {name}` has no built-in template: it uses the tokenizer's own ({choice.note})")
    return choice.builtin


# ---------------------------------------------------------------------------------------------
# End of turn

# Sentinels for probing a tokenizer's own template: plain words no template rewrites, unlikely to
# occur in its markup.
_PROBE_USER = "prefalignprobequestion"
_PROBE_REPLY = "prefalignprobereply"


def end_of_turn_token(tokenizer, template_name: str | None, template_kwargs: dict | None = None) -> str:
    """The string that ends an assistant turn under `template_name` (None: the tokenizer's own template).

    A built-in template declares it. For the tokenizer's own template it is found by rendering a
    user turn and an assistant reply (with `template_kwargs`): if a special or added token of the
    tokenizer follows the reply (after optional whitespace, as in Llama 2's " </s>"), that token
    ends the turn; otherwise the eos token does.
    """
    choice = resolve_template(template_name)
    if choice.builtin is not None:
        template = choice.builtin
        return template.end_of_turn if template.end_of_turn is not None else _eos(tokenizer, template.name)

    if not getattr(tokenizer, "chat_template", None):
        which = f"`template: {template_name}` uses the tokenizer's own chat template, but the tokenizer" \
            if template_name else "The tokenizer"
        raise ConfigError(
            f"{which} {_tokenizer_name(tokenizer)} has no chat template. Set `template:` to a built-in one "
            "(e.g. chatml, llama3, qwen; for a base model, `empty` adds no markup)."
        )
    conversation = [
        {"role": "user", "content": _PROBE_USER},
        {"role": "assistant", "content": _PROBE_REPLY},
    ]
    kwargs = {**(template_kwargs or {}), **choice.kwargs}
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
    at = rendered.rfind(_PROBE_REPLY)
    if at < 0:
        # The template drops or rewrites the reply; nothing to read the closing token from.
        return _eos(tokenizer, None)
    after = rendered[at + len(_PROBE_REPLY) :].lstrip()
    candidates = set(tokenizer.all_special_tokens) | {
        str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values()
    }
    matches = [token for token in candidates if token and after.startswith(token)]
    if matches:
        return max(matches, key=len)
    return _eos(tokenizer, None)


def _eos(tokenizer, template_name: str | None) -> str:
    if tokenizer.eos_token is None:
        which = f"`template: {template_name}`" if template_name else "the tokenizer's chat template"
        raise ConfigError(
            f"{which} ends assistant turns with the eos token, but the tokenizer {_tokenizer_name(tokenizer)} "
            "has none. Pick a template with its own end-of-turn token (e.g. `template: chatml`) or use a "
            "tokenizer with an eos token."
        )
    return tokenizer.eos_token


def _tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"of {name!r}" if name else "in use"


def stop_token_ids(tokenizer, end_of_turn: str | None) -> list[int]:
    """The token ids generation stops at: the tokenizer's EOS and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if end_of_turn:
        encoded = tokenizer.convert_tokens_to_ids(end_of_turn)
        if isinstance(encoded, int) and encoded != tokenizer.unk_token_id and encoded not in ids:
            ids.append(encoded)
    return ids
