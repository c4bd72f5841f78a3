"""Built-in chat templates: rendering, the prompt-prefix property, end-of-turn tokens, lookup errors."""

import pytest

from prefalign.data.templates import (
    ALPACA_DEFAULT_SYSTEM,
    BUILTIN_TEMPLATES,
    QWEN_DEFAULT_SYSTEM,
    VICUNA_DEFAULT_SYSTEM,
    end_of_turn_token,
    get_template,
)
from prefalign.errors import ConfigError

NAMES = sorted(BUILTIN_TEMPLATES)
DEFAULT_SYSTEMS = {"qwen": QWEN_DEFAULT_SYSTEM, "alpaca": ALPACA_DEFAULT_SYSTEM, "vicuna": VICUNA_DEFAULT_SYSTEM}

SYSTEM = {"role": "system", "content": "You are a polite quiz host."}
USER_1 = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT_1 = {"role": "assistant", "content": "Sure! It is Paris."}
USER_2 = {"role": "user", "content": "And the capital of Japan?"}
REPLY = "Of course! The capital of Japan is Tokyo."

PROMPTS = {
    "single turn": [USER_1],
    "system, two turns": [SYSTEM, USER_1, ASSISTANT_1, USER_2],
}


def render(tokenizer, name, messages, add_generation_prompt=False, **kwargs):
    return tokenizer.apply_chat_template(
        messages,
        chat_template=get_template(name).jinja,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **kwargs,
    )


@pytest.mark.parametrize("prompt", PROMPTS, ids=list(PROMPTS))
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "nogen"])
def test_renders_every_message_in_order(tiny_tokenizer, name, prompt, add_generation_prompt):
    messages = PROMPTS[prompt]
    text = render(tiny_tokenizer, name, messages, add_generation_prompt)
    position = 0
    for message in messages:
        found = text.find(message["content"], position)
        assert found >= position, f"{message['role']} message missing or out of order in {text!r}"
        position = found + len(message["content"])
    has_system = messages[0]["role"] == "system"
    if name in DEFAULT_SYSTEMS:
        assert (DEFAULT_SYSTEMS[name] in text) != has_system  # the default only stands in for a missing one


@pytest.mark.parametrize("prompt", PROMPTS, ids=list(PROMPTS))
@pytest.mark.parametrize("name", NAMES)
def test_generation_prompt_is_a_prefix_of_the_reply_rendering(tiny_tokenizer, name, prompt):
    """The property training relies on: prompt + generation prompt, then the reply, is the whole conversation."""
    messages = PROMPTS[prompt]
    without = render(tiny_tokenizer, name, messages, add_generation_prompt=False)
    prompt_text = render(tiny_tokenizer, name, messages, add_generation_prompt=True)
    full = render(tiny_tokenizer, name, messages + [{"role": "assistant", "content": REPLY}])
    assert prompt_text.startswith(without)
    assert full.startswith(prompt_text)
    assert REPLY in full[len(prompt_text):]


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"empty"}))
def test_prompt_tokens_are_a_prefix_of_the_reply_tokens(tiny_tokenizer, name):
    """With markup between prompt and reply, the prefix property also holds token by token.

    (`empty` is left out by design: with no markup, the last user word and the first reply word
    may merge into one token.)
    """
    messages = PROMPTS["system, two turns"]
    prompt_ids = tiny_tokenizer(render(tiny_tokenizer, name, messages, True), add_special_tokens=False).input_ids
    full = render(tiny_tokenizer, name, messages + [{"role": "assistant", "content": REPLY}])
    full_ids = tiny_tokenizer(full, add_special_tokens=False).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("name", NAMES)
def test_end_of_turn_follows_every_assistant_reply(tiny_tokenizer, name):
    eot = end_of_turn_token(tiny_tokenizer, name)
    expected = get_template(name).end_of_turn or tiny_tokenizer.eos_token
    assert eot == expected
    messages = PROMPTS["system, two turns"]
    prompt_text = render(tiny_tokenizer, name, messages, True)
    full = render(tiny_tokenizer, name, messages + [{"role": "assistant", "content": REPLY}])
    response = full[len(prompt_text):]
    # mistral and vicuna put a space between the header and the reply; it belongs to the reply
    assert response.lstrip(" ").startswith(REPLY + eot)
    assert ASSISTANT_1["content"] + eot in full  # earlier turns are closed the same way


@pytest.mark.parametrize("name", NAMES)
def test_templates_write_their_markup_and_eos_from_the_tokenizer(tiny_tokenizer, name):
    template = get_template(name)
    full = render(tiny_tokenizer, name, [USER_1, ASSISTANT_1], bos_token="<BOS>", eos_token="<EOS>")
    for token in template.special_tokens:
        assert token in full
    if template.end_of_turn is None:
        assert "<EOS>" in full
    # families that start with BOS get it only when the tokenizer has one
    starts_with_bos = name in {"llama3", "mistral", "gemma", "alpaca", "vicuna"}
    assert full.startswith("<BOS>") == starts_with_bos
    assert not render(tiny_tokenizer, name, [USER_1, ASSISTANT_1]).startswith("None")


def test_known_formats_render_exactly(tiny_tokenizer):
    """One literal rendering per family, from the published formats, so a regression is visible as text."""
    conversation = [SYSTEM, USER_1, ASSISTANT_1]
    eos = tiny_tokenizer.eos_token
    expected = {
        "chatml": "<|im_start|>system\nYou are a polite quiz host.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nSure! It is Paris.<|im_end|>\n",
        "llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a polite quiz host.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nSure! It is Paris.<|eot_id|>",
        "mistral": f"[INST] You are a polite quiz host.\n\nWhat is the capital of France? [/INST] Sure! It is Paris.{eos}",
        "gemma": "<start_of_turn>user\nYou are a polite quiz host.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nSure! It is Paris.<end_of_turn>\n",
        "alpaca": "You are a polite quiz host.\n\n### Instruction:\nWhat is the capital of France?\n\n"
        f"### Response:\nSure! It is Paris.{eos}\n\n",
        "vicuna": f"You are a polite quiz host. USER: What is the capital of France? ASSISTANT: Sure! It is Paris.{eos}",
        "empty": f"You are a polite quiz host.What is the capital of France?Sure! It is Paris.{eos}",
    }
    for name, text in expected.items():
        assert render(tiny_tokenizer, name, conversation) == text, name
    assert render(tiny_tokenizer, "qwen", [USER_1], True) == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", ["mistral", "gemma", "alpaca", "vicuna"])
def test_roles_a_format_lacks_are_an_error(tiny_tokenizer, name):
    with pytest.raises(Exception, match=f"{name} chat template supports .* not tool"):
        render(tiny_tokenizer, name, [USER_1, {"role": "tool", "content": "42"}])


def test_unknown_name_lists_the_known_ones_and_suggests_one():
    with pytest.raises(ConfigError) as error:
        get_template("chatlm")
    message = str(error.value)
    assert "Did you mean `template: chatml`?" in message
    for name in NAMES:
        assert name in message
    with pytest.raises(ConfigError, match="Built-in templates"):
        get_template("nothing-like-it")


def test_names_are_case_insensitive():
    assert get_template(" ChatML ") is BUILTIN_TEMPLATES["chatml"]


def test_own_template_end_of_turn_is_the_special_token_after_the_reply(tiny_tokenizer):
    # the tiny tokenizer's own template is chatml, whose turns end with <|im_end|> (also its eos)
    assert end_of_turn_token(tiny_tokenizer, None) == "<|im_end|>"
    # closed by a special token that is not eos: that token, found by rendering
    tiny_tokenizer.eos_token = "<|endoftext|>"
    assert end_of_turn_token(tiny_tokenizer, None) == "<|im_end|>"
    # a space before the closing token (as in Llama 2's " </s>") is skipped
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    )
    assert end_of_turn_token(tiny_tokenizer, None) == "<|endoftext|>"


def test_own_template_without_a_closing_token_falls_back_to_eos(tiny_tokenizer):
    # "<|end|>" is plain text to this tokenizer, not a token, so it does not end the turn
    tiny_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|end|>\n' }}{% endfor %}"
    assert end_of_turn_token(tiny_tokenizer, None) == tiny_tokenizer.eos_token


def test_missing_template_or_eos_is_a_config_error(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template.*Set `template:`"):
        end_of_turn_token(tiny_tokenizer, None)
    # chatml declares its own end-of-turn token; mistral relies on eos
    tiny_tokenizer.eos_token = None
    assert end_of_turn_token(tiny_tokenizer, "chatml") == "<|im_end|>"
    with pytest.raises(ConfigError, match="`template: mistral` ends assistant turns with the eos token"):
        end_of_turn_token(tiny_tokenizer, "mistral")
