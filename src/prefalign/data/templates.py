"""Built-in chat templates for models whose tokenizer has none, and the end-of-turn token of a template.

`template: NAME` in the config picks one of `BUILTIN_TEMPLATES`; without it the tokenizer's own
template is used. Each template is a Jinja string for `tokenizer.apply_chat_template(messages,
chat_template=..., add_generation_prompt=..., tokenize=False)`, written for prefalign from the
models' published prompt formats. All of them:

- insert message contents verbatim (no trimming), so the reply text a record holds is the text the
  model is trained on;
- render the prompt with `add_generation_prompt=True` as a string prefix of the prompt followed by
  an assistant reply, which is what lets chosen and rejected share one prompt encoding;
- write `{{ bos_token }}` where the model family starts with BOS (only if the tokenizer has one),
  so rendered text is the whole model input: encode it with `add_special_tokens=False`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.errors import ConfigError, closest


@dataclass(frozen=True)
class ChatTemplate:
    """A named chat template.

    `end_of_turn` is the string that closes an assistant turn, the token training ends each reply
    with and generation stops at; None means the tokenizer's eos token (the template writes
    `{{ eos_token }}`). `special_tokens` are the markup strings the template needs to be single
    tokens in the vocabulary (the model loader can add them); `description` is one line for
    listings and error messages.
    """

    name: str
    jinja: str
    end_of_turn: str | None
    special_tokens: tuple[str, ...] = ()
    description: str = ""


def _compact(text: str) -> str:
    """Join a template written one block per line into one line.

    Line breaks and indentation in the Python source are layout only; the newlines a format needs
    are written as '\\n' inside Jinja string literals. This keeps the rendering independent of the
    Jinja environment's trim_blocks/lstrip_blocks settings.
    """
    return "".join(line.strip() for line in text.strip().splitlines())


# `bos_token` is defined only when the tokenizer has one, so `{% if bos_token %}` covers both.
_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"

# Templates whose format has no system role fold a leading system message into the first user turn.
_SPLIT_SYSTEM = r"""
{% if messages and messages[0]['role'] == 'system' %}
    {% set system_message = messages[0]['content'] %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set system_message = '' %}
    {% set loop_messages = messages %}
{% endif %}
"""


def _unsupported_role(template: str, roles: str) -> str:
    return (
        "{{ raise_exception('The " + template + " chat template supports " + roles
        + " messages, not ' + message['role'] + '.') }}"
    )


_CHATML_TURNS = r"""
{% for message in messages %}
    {{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\n' }}
{% endif %}
"""

CHATML = ChatTemplate(
    name="chatml",
    jinja=_compact(_CHATML_TURNS),
    end_of_turn="<|im_end|>",
    special_tokens=("<|im_start|>", "<|im_end|>"),
    description="ChatML: <|im_start|>role\\n...<|im_end|> (OpenAI, Qwen, many fine-tunes)",
)

QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN = ChatTemplate(
    name="qwen",
    # Qwen2's format is ChatML plus a default system message when the conversation has none.
    jinja=_compact(
        r"""
{% if not messages or messages[0]['role'] != 'system' %}
    {{ '<|im_start|>system\n""" + QWEN_DEFAULT_SYSTEM + r"""<|im_end|>\n' }}
{% endif %}
"""
        + _CHATML_TURNS
    ),
    end_of_turn="<|im_end|>",
    special_tokens=("<|im_start|>", "<|im_end|>"),
    description=f"ChatML with Qwen2's default system message ({QWEN_DEFAULT_SYSTEM!r}) when none is given",
)

LLAMA3 = ChatTemplate(
    name="llama3",
    jinja=_compact(
        _BOS
        + r"""
{% for message in messages %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{% endif %}
"""
    ),
    end_of_turn="<|eot_id|>",
    special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    description="Llama 3: <|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>",
)

MISTRAL = ChatTemplate(
    name="mistral",
    # [INST] ... [/INST] already ends the user turn, so the generation prompt adds nothing; the
    # space before the reply belongs to the reply, so the prompt never ends in a space.
    jinja=_compact(
        _BOS
        + _SPLIT_SYSTEM
        + r"""
{% for message in loop_messages %}
    {% if message['role'] == 'user' %}
        {% if loop.first and system_message %}
            {{ '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {% else %}
            {{ '[INST] ' + message['content'] + ' [/INST]' }}
        {% endif %}
    {% elif message['role'] == 'assistant' %}
        {{ ' ' + message['content'] }}{{ eos_token }}
    {% else %}
"""
        + _unsupported_role("mistral", "a leading system, user and assistant")
        + r"""
    {% endif %}
{% endfor %}
"""
    ),
    end_of_turn=None,
    special_tokens=("[INST]", "[/INST]"),
    description="Mistral: [INST] user [/INST] reply</s>; a system message joins the first user turn",
)

GEMMA = ChatTemplate(
    name="gemma",
    jinja=_compact(
        _BOS
        + _SPLIT_SYSTEM
        + r"""
{% for message in loop_messages %}
    {% if message['role'] == 'user' %}
        {% set role = 'user' %}
    {% elif message['role'] == 'assistant' %}
        {% set role = 'model' %}
    {% else %}
"""
        + _unsupported_role("gemma", "a leading system, user and assistant")
        + r"""
    {% endif %}
    {% if loop.first and system_message %}
        {{ '<start_of_turn>' + role + '\n' + system_message + '\n\n' + message['content'] + '<end_of_turn>\n' }}
    {% else %}
        {{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<start_of_turn>model\n' }}
{% endif %}
"""
    ),
    end_of_turn="<end_of_turn>",
    special_tokens=("<start_of_turn>", "<end_of_turn>"),
    description="Gemma: <start_of_turn>user|model\\n...<end_of_turn>; a system message joins the first user turn",
)

ALPACA_DEFAULT_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA = ChatTemplate(
    name="alpaca",
    jinja=_compact(
        _BOS
        + _SPLIT_SYSTEM
        + r"""
{% if system_message %}
    {{ system_message + '\n\n' }}
{% else %}
    {{ '"""
        + ALPACA_DEFAULT_SYSTEM
        + r"""\n\n' }}
{% endif %}
{% for message in loop_messages %}
    {% if message['role'] == 'user' %}
        {{ '### Instruction:\n' + message['content'] + '\n\n' }}
    {% elif message['role'] == 'assistant' %}
        {{ '### Response:\n' + message['content'] }}{{ eos_token }}{{ '\n\n' }}
    {% else %}
"""
        + _unsupported_role("alpaca", "a leading system, user and assistant")
        + r"""
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{ '### Response:\n' }}
{% endif %}
"""
    ),
    end_of_turn=None,
    description="Alpaca: ### Instruction:/### Response: blocks after the Alpaca preamble (or the system message)",
)

VICUNA_DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA = ChatTemplate(
    name="vicuna",
    # Vicuna v1.1: "SYSTEM USER: ... ASSISTANT: reply</s>USER: ..."; the generation prompt is
    # "ASSISTANT:" and the reply brings its own leading space.
    jinja=_compact(
        _BOS
        + _SPLIT_SYSTEM
        + r"""
{% if system_message %}
    {{ system_message + ' ' }}
{% else %}
    {{ '"""
        + VICUNA_DEFAULT_SYSTEM.replace("'", "\\'")
        + r""" ' }}
{% endif %}
{% for message in loop_messages %}
    {% if message['role'] == 'user' %}
        {{ 'USER: ' + message['content'] + ' ' }}
    {% elif message['role'] == 'assistant' %}
        {{ 'ASSISTANT: ' + message['content'] }}{{ eos_token }}
    {% else %}
"""
        + _unsupported_role("vicuna", "a leading system, user and assistant")
        + r"""
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{ 'ASSISTANT:' }}
{% endif %}
"""
    ),
    end_of_turn=None,
    description="Vicuna v1.1: SYSTEM USER: ... ASSISTANT: reply</s>",
)

EMPTY = ChatTemplate(
    name="empty",
    jinja=_compact(
        r"""
{% for message in messages %}
    {{ message['content'] }}
    {% if message['role'] == 'assistant' %}
        {{ eos_token }}
    {% endif %}
{% endfor %}
"""
    ),
    end_of_turn=None,
    description="no markup: message contents concatenated, each assistant reply followed by eos",
)

BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t for t in (CHATML, QWEN, LLAMA3, MISTRAL, GEMMA, ALPACA, VICUNA, EMPTY)
}


def get_template(name: str) -> ChatTemplate:
    """The built-in template called `name` (case-insensitive); a ConfigError naming the known ones otherwise."""
    key = name.strip().lower()
    if key in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[key]
    known = ", ".join(sorted(BUILTIN_TEMPLATES))
    match = closest(key, BUILTIN_TEMPLATES)
    hint = f" Did you mean `template: {match}`?" if match else ""
    raise ConfigError(
        f"Unknown chat template `template: {name}`.{hint} Built-in templates: {known}; "
        "leave `template` unset to use the tokenizer's own."
    )


# Sentinels for probing a tokenizer's own template: plain words no template rewrites, unlikely to
# occur in its markup.
_PROBE_USER = "prefalignprobequestion"
_PROBE_REPLY = "prefalignprobereply"


def end_of_turn_token(tokenizer, template_name: str | None) -> str:
    """The string that ends an assistant turn under `template_name` (None: the tokenizer's own template).

    A built-in template declares it. For the tokenizer's own template it is found by rendering a
    user turn and an assistant reply: if a special or added token of the tokenizer follows the
    reply (after optional whitespace, as in Llama 2's " </s>"), that token ends the turn;
    otherwise the eos token does.
    """
    if template_name is not None:
        template = get_template(template_name)
        return template.end_of_turn if template.end_of_turn is not None else _eos(tokenizer, template.name)

    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"The tokenizer {_tokenizer_name(tokenizer)} has no chat template. Set `template:` to one of "
            f"{', '.join(sorted(BUILTIN_TEMPLATES))} (for a base model, `empty` adds no markup)."
        )
    conversation = [
        {"role": "user", "content": _PROBE_USER},
        {"role": "assistant", "content": _PROBE_REPLY},
    ]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
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
