"""What `template: NAME` means, and the end-of-turn token of a template.

Every LLaMA-Factory template name resolves (`resolve_template`) to a built-in template: the name's
LLaMA-Factory slots and rules (data/lf_templates.py, generated from LLaMA-Factory's own registry;
data/template_formats.py for names it has dropped), which data/lf_encoding.py encodes slot by slot
exactly as LLaMA-Factory's DPO stage does. Leaving `template` unset uses the tokenizer's own chat
template (rendered as text, then tokenized; data/chat.py).

`jinja` is the same slots as a Jinja chat template (the text they write, thinking markup aside), for
`prefalign export` to save with the model so a server renders what training encoded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prefalign.data.lf_templates import LF_TEMPLATES, LF_VERSION
from prefalign.data.lf_tools import JINJA as TOOL_JINJA
from prefalign.data.lf_tools import jinja_literal as _literal
from prefalign.data.template_formats import OLDER_TEMPLATES, LFTemplate, Special, Token
from prefalign.errors import ConfigError, closest

LLAMA_FACTORY_TEMPLATES: dict[str, LFTemplate] = dict(sorted({**OLDER_TEMPLATES, **LF_TEMPLATES}.items()))


@dataclass(frozen=True)
class ChatTemplate:
    """A built-in (LLaMA-Factory) template: its slots and rules (`lf`), where they come from (`origin`),
    the Jinja equivalent of its slots, and a one-line `description` for listings and the data report.

    `end_of_turn` is the string that closes an assistant turn, the token generation stops at; None
    means the tokenizer's eos token.
    """

    name: str
    lf: LFTemplate
    jinja: str
    origin: str
    description: str = ""

    @property
    def end_of_turn(self) -> str | None:
        return self.lf.end_of_turn

    @property
    def rules(self) -> str:
        """Which rule set encodes it, in words (for `prefalign data` and the README table)."""
        notes = {"llama2": "system text inside the first user turn",
                 "reasoning": "thinking rules (enable_thinking)",
                 "reasoning_closing_only": "thinking rules (enable_thinking; empty thought = closing word)"}
        extra = [notes[self.lf.rules]] if self.lf.rules in notes else []
        if self.lf.efficient_eos:
            extra.append("EOS appended to each response")
        if self.lf.replace_eos:
            extra.append(f"EOS replaced by {self.lf.stop_words[0]}")
        return f"{self.origin}'s slots, encoded slot by slot" + (f" ({'; '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class TemplateChoice:
    """What a `template:` value resolves to: a built-in template, or (builtin None) the tokenizer's own."""

    name: str | None
    builtin: ChatTemplate | None

    @property
    def description(self) -> str:
        """For the data report and model card: what encodes the records."""
        if self.builtin is not None:
            return f"{self.builtin.name} ({self.builtin.rules})"
        return "the tokenizer's own chat template"


# The rules for the tokenizer's own templates that refuse a record (data/chat.py applies them): a
# system turn the template cannot render, a prompt that is not a prefix of prompt + reply.
UNSUPPORTED_SYSTEM = ("fold", "error")
NOT_PREFIX = ("error", "append")

# Arguments of apply_chat_template that prefalign sets; a chat_template_kwargs entry may not override them.
RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "return_dict", "return_tensors", "padding",
                            "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask")
# The template arguments LLaMA-Factory's templates read (the reasoning ones); other chat_template_kwargs
# are for the tokenizer's own template only.
LF_TEMPLATE_ARGUMENTS = ("enable_thinking",)


# ---------------------------------------------------------------------------------------------
# Slots → Jinja (for export)


def _expression(slot, content: str = "content") -> str:
    """A slot as a Jinja expression, `{{content}}` standing for the variable `content`."""
    parts = []
    for element in slot:
        if isinstance(element, Special):
            parts.append(f"({element.attribute} or '')")
            continue
        text = element.text if isinstance(element, Token) else element
        pieces = re.split(r"(\{\{content\}\}|\{\{idx\}\})", text)
        for piece in pieces:
            if piece == "{{content}}":
                parts.append(content)
            elif piece == "{{idx}}":
                parts.append("((loop.index0 // 2) | string)")
            elif piece:
                parts.append(_literal(piece))
    return " + ".join(parts) or "''"


def _raise(text: str) -> str:
    return "{{ raise_exception(" + text + ") }}"


def tool_macros(fmt: LFTemplate) -> tuple[str, str] | None:
    """The Jinja macros (tools_text, calls_text) of `fmt`'s tool format; None where it has none (its
    exported template refuses tools)."""
    macros = TOOL_JINJA.get(fmt.tool_format)
    if macros is not None and fmt.tools is not None:  # a plain tools slot: the definitions' JSON in it
        macros = ("{%- macro tools_text(tools) -%}{{ " + _expression(fmt.tools, "(tools | tojson)") +
                  " }}{%- endmacro -%}", macros[1])
    return macros


def format_to_jinja(name: str, fmt: LFTemplate) -> str:
    """The Jinja chat template that writes the text of `fmt`'s slots for a list of messages.

    As in LLaMA-Factory: the prefix, then (if the record or the template has a system message, or there
    are tools) the system slot, before the first turn or, for llama2 rules, inside it, its content the
    system text followed by the tool definitions as the template's tool format writes them; then each
    turn's slot, an assistant message with tool calls in the function slot (its text, then the calls).
    A tool format not written in Jinja (lf_tools.JINJA) makes the template refuse tools, saying so.
    """
    llama2 = fmt.rules == "llama2"
    system = _expression(fmt.system, "system_content")
    macros = tool_macros(fmt)
    writes_tools = macros is not None
    no_tools = _literal(f"The {name} template's tool format ({fmt.tool_format}, LLaMA-Factory's) is not written in "
                        "this exported chat template (its Jinja is not written: only default, glm4, ling, llama3, "
                        "mistral, qwen and seed_oss are); render tools with prefalign chat, or use a template with "
                        "one of those.")
    parts = [
        "".join(macros) if writes_tools else "{% if tools %}" + _raise(no_tools) + "{% endif %}",
        "{{ " + _expression(fmt.prefix) + " }}" if fmt.prefix else "",
        "{% if messages and messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = '' %}"
        "{% set loop_messages = messages %}{% endif %}",
        "{% if not system_message %}{% set system_message = " + _literal(fmt.default_system) + " %}{% endif %}",
        "{% set system_content = system_message + (tools_text(tools) if tools else '') %}" if writes_tools
        else "{% set system_content = system_message %}",
        "" if llama2 else "{% if system_content %}{{ " + system + " }}{% endif %}",
        "{% for message in loop_messages %}{% set content = message['content'] or '' %}",
        "{% if loop.first and system_content %}{% set content = " + system + " + content %}{% endif %}"
        if llama2 else "",
        ("{% if message['tool_calls'] %}{% set content = content + calls_text(message['tool_calls']) %}"
         "{{ " + _expression(fmt.function or fmt.assistant) + " }}") if writes_tools
        else "{% if message['tool_calls'] %}" + _raise(no_tools),
        "{% elif message['role'] == 'user' %}{{ " + _expression(fmt.user) + " }}",
        "{% elif message['role'] == 'assistant' %}{{ " + _expression(fmt.assistant) + " }}",
        "{% elif message['role'] == 'tool' %}{{ " + _expression(fmt.observation or fmt.user) + " }}",
        "{% else %}" + _raise(f"'The {name} template has no ' + message['role'] + ' turns after the first.'"),
        "{% endif %}{% endfor %}",
    ]
    return "".join(parts)


def turn_layout(fmt: LFTemplate) -> str:
    """One user turn and its reply as the slots write them, e.g. `<bos>[INST] {user} [/INST]{reply}<eos>`."""
    def show(slot, content: str) -> str:
        out = []
        for element in slot:
            if isinstance(element, Special):
                out.append("<" + element.attribute.split("_")[0] + ">")
            else:
                text = element.text if isinstance(element, Token) else element
                out.append(text.replace("{{content}}", content).replace("{{idx}}", "0"))
        return "".join(out).replace("\n", "\\n")
    return show(fmt.prefix, "") + show(fmt.user, "{user}") + show(fmt.assistant, "{reply}")


def _builtin(name: str, fmt: LFTemplate) -> ChatTemplate:
    origin = f"LLaMA-Factory {LF_VERSION}" if name in LF_TEMPLATES else "an earlier LLaMA-Factory"
    return ChatTemplate(name=name, lf=fmt, jinja=format_to_jinja(name, fmt), origin=origin,
                        description=turn_layout(fmt))


BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {name: _builtin(name, fmt) for name, fmt in LLAMA_FACTORY_TEMPLATES.items()}
CHATML = BUILTIN_TEMPLATES["chatml"]
KNOWN_NAMES = tuple(LLAMA_FACTORY_TEMPLATES)


def resolve_template(name: str | None) -> TemplateChoice:
    """What `template: name` means (None: the tokenizer's own); a ConfigError listing the known names otherwise."""
    if name is None:
        return TemplateChoice(None, None)
    key = name.strip().lower()
    if key in BUILTIN_TEMPLATES:
        return TemplateChoice(key, BUILTIN_TEMPLATES[key])
    match = closest(key, KNOWN_NAMES)
    hint = f" Did you mean `template: {match}`?" if match else ""
    raise ConfigError(
        f"Unknown chat template `template: {name}`.{hint} Known names (LLaMA-Factory's): {', '.join(sorted(KNOWN_NAMES))}; "
        "leave `template` unset to use the tokenizer's own."
    )


def get_template(name: str) -> ChatTemplate:
    """The built-in template called `name`; a ConfigError if the name is unknown."""
    return resolve_template(name).builtin


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
    kwargs = dict(template_kwargs or {})
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
