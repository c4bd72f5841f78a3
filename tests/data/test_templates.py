"""Template names: every LLaMA-Factory name resolves; built-ins render LLaMA-Factory's text; end-of-turn tokens."""

import pytest

from prefalign.data.templates import (
    BUILTIN_TEMPLATES,
    KNOWN_NAMES,
    end_of_turn_token,
    get_template,
    resolve_template,
)
from prefalign.errors import ConfigError

# Every name registered in LLaMA-Factory 0.9.5's src/llamafactory/data/template.py.
LLAMA_FACTORY_NAMES = """
aeva alpaca bailing bailing_v2 breeze chatglm3 chatml chatml_de cohere cpm4 dbrx deepseek deepseek3 deepseekcoder
deepseekr1 default dots_ocr empty ernie ernie_nothink ernie_vl exaone falcon falcon_h1 fewshot gemma gemma2 gemma3
gemma3n gemma4 gemma4n glm4 glm4_5v glm4_7 glm4_moe glm4v glm_ocr glmz1 gpt_oss granite3 granite3_vision granite4
hunyuan hunyuan_small hy3 index intern2 intern_s1 intern_vl keye_vl kimi_vl lfm2 lfm2_vl llama2 llama2_zh llama3
llama4 llava llava_next llava_next_llama3 llava_next_mistral llava_next_qwen llava_next_video
llava_next_video_mistral llava_next_video_yi llava_next_yi mimo mimo_v2 mimo_vl minicpm_o minicpm_v minicpm_v_4_6
minimax1 minimax2 ministral ministral3 mistral mistral_small mllama moonlight olmo openchat openchat-3.6 opencoder
paligemma paligemma_chat phi phi4 phi4_mini phi_small pixtral qwen qwen2_audio qwen2_omni qwen2_vl qwen3 qwen3_5
qwen3_5_nothink qwen3_6 qwen3_nothink qwen3_omni qwen3_omni_nothink qwen3_vl qwen3_vl_nothink sailor seed_coder
seed_oss smollm smollm2 solar starchat telechat2 vicuna video_llava xuanyuan yi yi_vl youtu youtu_vl yuan zephyr
""".split()
# Names of earlier LLaMA-Factory releases that 0.9.5 dropped; prefalign keeps them.
OLDER_NAMES = """
aquila atom baichuan baichuan2 belle bluelm chatglm2 codegeex2 codegeex4 cpm cpm3 intern marco orion skywork_o1
telechat xverse yayi ziya
""".split()
# LLaMA-Factory 0.9.5's ReasoningTemplate / Glm47ReasoningTemplate names.
REASONING = {"aeva", "deepseekr1", "ernie_vl", "gemma4", "gemma4n", "glm4_5v", "glm4_7", "glm4_moe", "glm4v", "glmz1",
             "gpt_oss", "hy3", "keye_vl", "kimi_vl", "mimo", "mimo_v2", "mimo_vl", "minimax2", "qwen3", "qwen3_5",
             "qwen3_6", "qwen3_omni", "qwen3_vl", "seed_oss", "youtu"}

S = {"role": "system", "content": "You are terse."}
U1 = {"role": "user", "content": "Hi"}
A1 = {"role": "assistant", "content": "Hello!"}
U2 = {"role": "user", "content": "2+2?"}
REPLY = {"role": "assistant", "content": "4"}
TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}

# [S, U1, A1, U2, REPLY] as LLaMA-Factory renders it, written out from each name's slots.
EXPECTED = {
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
              "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "llama4": "<s><|header_start|>system<|header_end|>\n\nYou are terse.<|eot|><|header_start|>user<|header_end|>\n\n"
              "Hi<|eot|><|header_start|>assistant<|header_end|>\n\nHello!<|eot|><|header_start|>user<|header_end|>\n\n"
              "2+2?<|eot|><|header_start|>assistant<|header_end|>\n\n4<|eot|>",
    "gemma": "<s><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "paligemma_chat": "<s><start_of_turn>user\nYou are terse.Hi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                      "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "mistral": "<s>[INST] You are terse.\n\nHi[/INST] Hello!</s>[INST] 2+2?[/INST] 4</s>",
    "ministral": "<s>[INST]You are terse.\n\nHi[/INST]Hello!</s>[INST]2+2?[/INST]4</s>",
    "mistral_small": "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>[INST]2+2?[/INST]4</s>",
    "llama2": "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST]Hello!</s><s>[INST] 2+2? [/INST]4</s>",
    "vicuna": "You are terse.USER: Hi ASSISTANT:Hello!</s>USER: 2+2? ASSISTANT:4</s>",
    "alpaca": "You are terse.### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n### Instruction:\n2+2?\n\n"
              "### Response:\n4</s>\n\n",
    "default": "System: You are terse.</s>\nHuman: Hi</s>\nAssistant:Hello!</s>\nHuman: 2+2?</s>\nAssistant:4</s>\n",
    "zephyr": "<|system|>\nYou are terse.</s><|user|>\nHi</s><|assistant|>\nHello!</s><|user|>\n2+2?</s>"
              "<|assistant|>\n4</s>",
    "deepseek": "<s>You are terse.\n\nUser: Hi\n\nAssistant:Hello!</s>User: 2+2?\n\nAssistant:4</s>",
    "deepseek3": "<s>You are terse.<｜User｜>Hi<｜Assistant｜>Hello!</s><｜User｜>2+2?<｜Assistant｜>4</s>",
    "glm4": "[gMASK]<sop><|system|>\nYou are terse.<|user|>\nHi<|assistant|>\nHello!<|user|>\n2+2?<|assistant|>\n4",
    "phi": "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n"
           "<|assistant|>\n4<|end|>\n",
    "phi4": "<|im_start|>system<|im_sep|>You are terse.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>"
            "<|im_start|>assistant<|im_sep|>Hello!<|im_end|><|im_start|>user<|im_sep|>2+2?<|im_end|>"
            "<|im_start|>assistant<|im_sep|>4<|im_end|>",
    "cohere": "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are terse.<|END_OF_TURN_TOKEN|>"
              "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
              "Hello!</s><|START_OF_TURN_TOKEN|><|USER_TOKEN|>2+2?<|END_OF_TURN_TOKEN|>"
              "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>4</s>",
    "empty": "You are terse.HiHello!2+2?4",
    "chatglm2": "[gMASK]sopYou are terse.[Round 0]\n\n问：Hi\n\n答：Hello![Round 1]\n\n问：2+2?\n\n答：4",
    "olmo": "</s>You are terse.<|user|>\nHi<|assistant|>\nHello!</s><|user|>\n2+2?<|assistant|>\n4</s>",
    "solar": "### System:\nYou are terse.\n\n### User:\nHi\n\n### Assistant:\nHello!### User:\n2+2?\n\n### Assistant:\n4",
    "ernie_nothink": "<|begin_of_sentence|>You are terse.\nUser: Hi\nAssistant: Hello!<|end_of_sentence|>User: 2+2?\n"
                     "Assistant: 4<|end_of_sentence|>",
    "starchat": "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>Hello!<|end|>\n<|user|>\n2+2?<|end|>\n"
                "<|assistant|>4<|end|>\n",
    "baichuan2": "You are terse.<reserved_106>Hi<reserved_107>Hello!<reserved_106>2+2?<reserved_107>4",
}
# Where the record has no system message, the name's default one (LLaMA-Factory's `default_system`).
EXPECTED_DEFAULT_SYSTEM = {
    "qwen": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.USER: Hi ASSISTANT:",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nHi\n\n### Response:\n",
    "zephyr": "<|system|>\nYou are Zephyr, a helpful assistant.</s><|user|>\nHi</s><|assistant|>\n",
    "llama2_zh": "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\nHi [/INST]",
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}


def render(tokenizer, name, messages, add_generation_prompt=False, **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=get_template(name).jinja,
                                         add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)


def test_every_llama_factory_name_resolves_and_no_other():
    assert sorted(KNOWN_NAMES) == sorted(LLAMA_FACTORY_NAMES + OLDER_NAMES)
    for name in KNOWN_NAMES:
        choice = resolve_template(name)
        assert choice.builtin is BUILTIN_TEMPLATES[name], name
        assert choice.builtin.lf.reasoning == (name in REASONING), name
        origin = "an earlier LLaMA-Factory" if name in OLDER_NAMES else "LLaMA-Factory 0.9.5"
        assert choice.description.startswith(f"{name} ({origin}'s slots, encoded slot by slot"), name
    # the names without thinking rules write no thought block at all
    assert not BUILTIN_TEMPLATES["qwen3_nothink"].lf.reasoning and BUILTIN_TEMPLATES["qwen3"].lf.reasoning


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_renders_what_llama_factory_renders(tiny_tokenizer, name):
    assert render(tiny_tokenizer, name, [S, U1, A1, U2, REPLY], **TOKENS) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_DEFAULT_SYSTEM))
def test_default_system_stands_in_only_for_a_missing_one(tiny_tokenizer, name):
    assert render(tiny_tokenizer, name, [U1], add_generation_prompt=True, **TOKENS) == EXPECTED_DEFAULT_SYSTEM[name]
    assert "You are terse." in render(tiny_tokenizer, name, [S, U1], True, **TOKENS)


def test_tool_results_use_the_observation_slot(tiny_tokenizer):
    tool = {"role": "tool", "content": "42"}
    assert render(tiny_tokenizer, "qwen", [S, U1, A1, tool], True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert render(tiny_tokenizer, "mistral", [U1, A1, tool], True, **TOKENS) == (
        '<s>[INST] Hi[/INST] Hello!</s>[TOOL_RESULTS] {"content": 42}[/TOOL_RESULTS]')


def test_a_template_whose_tool_format_has_no_jinja_refuses_tools_naming_it(tiny_tokenizer):
    """lfm2's tool format (Pythonic calls) is not written in Jinja: the exported template says so in one line,
    for definitions and for calls; without tools it renders as before."""
    with pytest.raises(Exception, match=r"^The lfm2 template's tool format \(lfm2, LLaMA-Factory's\) is not written"):
        render(tiny_tokenizer, "lfm2", [U1], tools=[{"type": "function", "function": {"name": "f"}}])
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    with pytest.raises(Exception, match="tool format .lfm2, LLaMA-Factory's. is not written in this exported"):
        render(tiny_tokenizer, "lfm2", [U1, call, U2])
    assert render(tiny_tokenizer, "lfm2", [U1], True).endswith("Hi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_builtin_prompt_is_a_prefix_and_the_reply_ends_the_turn(tiny_tokenizer, name):
    """The property training relies on, for every built-in: prompt + generation prompt, then the
    reply, is the whole conversation; the reply's turn ends with the declared end-of-turn token or
    (a format that writes none) nothing, to which training appends eos."""
    template = get_template(name)
    for messages in ([U1], [S, U1, A1, U2]):
        prompt = render(tiny_tokenizer, name, messages, True, **TOKENS)
        full = render(tiny_tokenizer, name, messages + [REPLY], **TOKENS)
        assert full.startswith(prompt), name
        response = full[len(prompt):]
        # the reply follows the text the assistant slot writes before it (ernie_vl's "\nAssistant: ")
        lead = template.lf.assistant[0].split("{{content}}")[0] if isinstance(template.lf.assistant[0], str) else ""
        assert response.startswith(lead) and response[len(lead):].lstrip(" \n").startswith("4"), (name, response)
        if template.end_of_turn is not None:
            assert template.end_of_turn in response
        position = 0
        for message in messages:  # every message, in order
            position = full.index(message["content"], position) + len(message["content"])


def test_bos_and_eos_are_written_only_where_the_tokenizer_has_them(tiny_tokenizer):
    tiny_tokenizer.bos_token = None  # the tiny tokenizer has no BOS; make sure
    assert render(tiny_tokenizer, "llama3", [U1]).startswith("<|start_header_id|>")
    assert not render(tiny_tokenizer, "mistral", [U1, A1]).startswith("None")


def test_unknown_name_lists_the_known_ones_and_suggests_one():
    with pytest.raises(ConfigError) as error:
        resolve_template("qwen3_nothing")
    message = str(error.value)
    assert "Did you mean `template: qwen3_nothink`?" in message
    for name in LLAMA_FACTORY_NAMES + OLDER_NAMES:
        assert name in message
    with pytest.raises(ConfigError, match="Known names"):
        resolve_template("nothing-like-it")


def test_names_are_case_insensitive():
    assert get_template(" ChatML ") is BUILTIN_TEMPLATES["chatml"]
    assert resolve_template("QWEN3_NoThink").builtin is BUILTIN_TEMPLATES["qwen3_nothink"]


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


def test_own_template_end_of_turn_is_probed_with_the_template_arguments(tiny_tokenizer):
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ '<|im_end|>' if short_turns else eos_token }}{% endif %}{% endfor %}")
    tiny_tokenizer.eos_token = "<|endoftext|>"
    assert end_of_turn_token(tiny_tokenizer, None) == "<|endoftext|>"
    assert end_of_turn_token(tiny_tokenizer, None, {"short_turns": True}) == "<|im_end|>"


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


def test_readme_template_table_is_current():
    """The README's name table is generated from the name registry: regenerate it when a name changes."""
    import sys

    from helpers import ROOT as root

    sys.path.insert(0, str(root / "scripts"))
    from template_table import table

    readme = (root / "README.md").read_text()
    section = readme.split("<!-- template-table:start -->\n")[1].split("\n<!-- template-table:end -->")[0]
    assert section.strip() == table().strip(), "run: python scripts/template_table.py and paste into README.md"
    for name in LLAMA_FACTORY_NAMES + OLDER_NAMES:
        assert f"| `{name}` |" in section
