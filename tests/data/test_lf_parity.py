"""`template: NAME` gives LLaMA-Factory's own token ids, checked against ids LLaMA-Factory itself produced.

tests/fixtures/lf_parity/frozen.json holds LLaMA-Factory's ids (its version recorded in the file) for the
most used names, each of the small real-family tokenizers under tests/fixtures/lf_parity/tokenizers and
the records of tests/fixtures/lf_parity/data (LF's dpo_en_demo / dpo_zh_demo plus a system-prompt and a
thinking multi-turn record), written by `benchmarks/lf_template_parity.py freeze` run with LLaMA-Factory's
venv (`get_template_and_fix_tokenizer` + its sharegpt converter + `PairwiseDatasetProcessor`). Where
LLaMA-Factory adds a token to the tokenizer (its template fix), prefalign adds the same one (data/vocab.py).
"""

import json
from functools import lru_cache

import pytest
from helpers import ROOT
from transformers import AutoTokenizer

from prefalign.data.chat import ChatRenderer
from prefalign.data.encode import encode_pair
from prefalign.data.sources import load_preference_pairs

PARITY = ROOT / "tests" / "fixtures" / "lf_parity"
FROZEN = json.loads((PARITY / "frozen.json").read_text())
NO_CUT = 100_000


@lru_cache(maxsize=None)
def tokenizer(family: str):
    return AutoTokenizer.from_pretrained(PARITY / "tokenizers" / family)


@lru_cache(maxsize=1)
def pairs():
    return load_preference_pairs(["lf_parity"], str(PARITY / "data"))[0]


def renderer(key: str) -> ChatRenderer:
    family, name, *thinking = key.split("/")
    kwargs = {"enable_thinking": False} if thinking == ["enable_thinking=false"] else {}
    return ChatRenderer(tokenizer(family), name, kwargs)


def test_the_frozen_ids_are_llama_factorys():
    assert FROZEN["llamafactory"] == "0.9.5"
    names = {key.split("/")[1] for key in FROZEN["ids"]}
    assert {"qwen", "qwen3", "qwen3_nothink", "llama2", "mistral", "phi", "alpaca", "vicuna", "default", "zephyr",
            "chatml", "smollm2"} <= names
    assert len(pairs()) == 6


@pytest.mark.parametrize("key", sorted(k for k, v in FROZEN["ids"].items() if "records" in v))
def test_prompt_and_response_ids_equal_llama_factorys(key):
    """Prompt ids, response ids and the mask (every response token trained, no prompt token) equal LF's."""
    theirs = FROZEN["ids"][key]["records"]
    encoder = renderer(key)
    for index, (pair, lf) in enumerate(zip(pairs(), theirs, strict=True)):
        ours = encode_pair(pair, encoder, NO_CUT)
        assert ours["prompt_ids"] == lf["prompt"], (key, index, "prompt")
        assert ours["chosen_ids"] == lf["chosen"], (key, index, "chosen")
        assert ours["rejected_ids"] == lf["rejected"], (key, index, "rejected")
        assert all(lf["chosen_trained"]) and lf["rejected_prompt_equal"], (key, index)  # LF masks the prompt only


@pytest.mark.parametrize("key", sorted(k for k, v in FROZEN["ids"].items() if "added" in v))
def test_where_llama_factory_adds_a_token_prefalign_adds_the_same_ids(key):
    """Where LF's template fix adds tokens to the tokenizer, they get LF's ids (their ids are in the records
    the test above compares) and the tokenizer prefalign encodes with has each of them."""
    family, added = key.split("/")[0], FROZEN["ids"][key]["added"]
    fixed = renderer(key).lf_encoder._fixed
    assert len(fixed) == len(tokenizer(family)) + len(added)
    assert all(token in fixed.get_vocab() for token in added)
    assert all(token not in tokenizer(family).get_vocab() for token in added)  # the shared one is untouched


def test_qwen3_nothink_writes_no_think_block_and_qwen3_writes_lf_s_empty_one():
    """qwen3_nothink (Qwen3-Instruct-2507): no <think> anywhere; qwen3: the empty block LF writes, trained in
    the response with thinking on and in the untrained prompt with thinking off, never in a reply that thinks."""
    qwen = tokenizer("qwen2")
    first = pairs()[0]  # no thought in its replies
    nothink = encode_pair(first, renderer("qwen2/qwen3_nothink"), NO_CUT)
    decoded = qwen.decode(nothink["prompt_ids"] + nothink["chosen_ids"])
    assert "<think>" not in decoded and "</think>" not in decoded
    thinking = encode_pair(first, renderer("qwen2/qwen3"), NO_CUT)
    assert qwen.decode(thinking["chosen_ids"]).startswith("<think>\n\n</think>\n\n")
    assert thinking["prompt_ids"] == nothink["prompt_ids"]
    off = encode_pair(first, renderer("qwen2/qwen3/enable_thinking=false"), NO_CUT)
    assert qwen.decode(off["prompt_ids"]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert off["chosen_ids"] == nothink["chosen_ids"]
    thinks = encode_pair(pairs()[-1], renderer("qwen2/qwen3"), NO_CUT)  # its chosen reply has a thought
    assert qwen.decode(thinks["chosen_ids"]).startswith("<think>\n12 * 4 = 48.\n</think>\n\n48.")
    assert "Easy." not in qwen.decode(thinks["prompt_ids"])  # a history reply loses its thought


@pytest.mark.parametrize("family", ["llama-spm", "phi-3"])
def test_llama2_encodes_the_records_whole_text_tokenization_refused(family):
    """Llama 2's `[/INST]` followed by a reply merged tokens across the boundary when the whole text was
    tokenized; slot by slot no token can, and every record encodes, with LF's BOS and EOS."""
    tok = tokenizer(family)
    for pair in pairs():
        ours = encode_pair(pair, renderer(f"{family}/llama2"), NO_CUT)
        assert ours["prompt_ids"][0] == tok.bos_token_id and ours["chosen_ids"][-1] == tok.eos_token_id
        assert tok.decode(ours["prompt_ids"]).rstrip().endswith("[/INST]")


# -- tool records: ShareGPT with a tools column, function_call and observation turns ----------------------
# tests/fixtures/lf_parity/frozen_tools.json (`benchmarks/lf_template_parity.py freeze-tools`, LF's venv):
# LLaMA-Factory's ids of the records in tests/fixtures/lf_parity/tools_data for tool-capable names (each
# with its own tool format, and two with `tool_format` set), and each LF tool format's text of the
# records' definitions and calls, straight from LF's tool_utils. llama3's prompt states the day LF
# encodes; LF's side ran with the date fixed at FROZEN_TOOLS["today"], and prefalign's is set to it.
FROZEN_TOOLS = json.loads((PARITY / "frozen_tools.json").read_text())
TODAY = "26 Jul 2024"


@lru_cache(maxsize=1)
def tool_pairs():
    return load_preference_pairs(["lf_parity_tools"], str(PARITY / "tools_data"))[0]


def tool_renderer(key: str) -> ChatRenderer:
    family, name, *rest = key.split("/")
    tool_format = rest[0].removeprefix("tool_format=") if rest else None
    made = ChatRenderer(tokenizer(family), name, {}, tool_format=tool_format)
    made.lf_encoder.today = TODAY
    return made


def test_the_frozen_tool_ids_are_llama_factorys_and_cover_the_tool_formats():
    assert FROZEN_TOOLS["llamafactory"] == "0.9.5" and FROZEN_TOOLS["today"] == [2024, 7, 26]
    equal = {key for key, value in FROZEN_TOOLS["ids"].items() if "records" in value}
    assert {"qwen2/qwen", "qwen2/qwen3", "llama3.1-bpe/llama3", "qwen2/mistral", "qwen2/default",
            "qwen2/qwen/tool_format=llama3", "qwen2/llama2/tool_format=mistral"} <= equal
    assert "qwen2/seed_oss" in equal
    pairs = tool_pairs()
    assert len(pairs) == 5 and all(pair.tools for pair in pairs)
    assert [m["role"] for m in pairs[0].prompt] == ["user", "assistant", "tool"]
    assert pairs[0].prompt[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    # records 3 and 4: the chosen, then the rejected reply is a tool call (a function_call message)
    assert (pairs[3].chosen, pairs[3].chosen_calls[0]["function"]) == ("", {"name": "get_weather",
                                                                           "arguments": {"city": "Oslo"}})
    assert pairs[4].rejected_calls[0]["function"]["name"] == "get_weather" and pairs[4].chosen_calls is None


@pytest.mark.parametrize("key", sorted(k for k, v in FROZEN_TOOLS["ids"].items() if "records" in v))
def test_tool_record_ids_equal_llama_factorys(key):
    """Tool definitions in the system slot, calls in the function slot, results in the observation slot: LF's ids."""
    theirs = FROZEN_TOOLS["ids"][key]["records"]
    encoder = tool_renderer(key)
    for index, (pair, lf) in enumerate(zip(tool_pairs(), theirs, strict=True)):
        ours = encode_pair(pair, encoder, NO_CUT)
        assert ours["prompt_ids"] == lf["prompt"], (key, index, "prompt")
        assert ours["chosen_ids"] == lf["chosen"], (key, index, "chosen")
        assert ours["rejected_ids"] == lf["rejected"], (key, index, "rejected")


@pytest.mark.parametrize("key", sorted(k for k, v in FROZEN_TOOLS["ids"].items() if "records" in v))
def test_an_openai_style_reply_with_tool_calls_encodes_as_the_sharegpt_function_call_reply(key):
    """The OpenAI-style record (an assistant reply with `tool_calls`) is the ShareGPT record 3 (a function_call
    reply) written otherwise: it gets LF's ids of that record, the calls in the function slot. (LF's own openai
    converter drops a reply's tool_calls and trains its empty text: the difference README states.)"""
    openai = load_preference_pairs(["lf_parity_openai"], str(PARITY / "tools_data"))[0]
    lf = FROZEN_TOOLS["ids"][key]["records"][3]
    ours = encode_pair(openai[0], tool_renderer(key), NO_CUT)
    assert (ours["prompt_ids"], ours["chosen_ids"], ours["rejected_ids"]) == (lf["prompt"], lf["chosen"],
                                                                           lf["rejected"])


@pytest.mark.parametrize("key", sorted(k for k, v in FROZEN_TOOLS["ids"].items() if "added" in v))
def test_for_tool_templates_where_llama_factory_adds_a_token_prefalign_adds_the_same(key):
    """The tokens LF named as added for the tool records' template (frozen ids: only their names) are the
    ones prefalign's encoder adds, and the tool records then encode."""
    family, added = key.split("/")[0], FROZEN_TOOLS["ids"][key]["added"]
    encoder = tool_renderer(key)
    fixed = encoder.lf_encoder._fixed
    assert sorted(set(fixed.get_vocab()) - set(tokenizer(family).get_vocab())) == sorted(added)
    assert all(encode_pair(pair, encoder, NO_CUT)["chosen_ids"] for pair in tool_pairs())


def test_each_tool_format_writes_llama_factorys_text():
    """Every LF tool format (glm4, minimax, gemma4, ... included, which no shrunk tokenizer encodes): the text of
    the records' definitions (as the records hold them) and of single and parallel calls equals LF's tool_utils'."""
    from prefalign.data.lf_tools import TOOL_FORMATS

    texts = FROZEN_TOOLS["texts"]
    assert set(TOOL_FORMATS) == set(texts["formats"])
    records = json.loads((PARITY / "tools_data" / "lf_parity_tools.json").read_text())
    definitions = [json.loads(record["tools"]) for record in records]
    for name, fmt in TOOL_FORMATS.items():
        lf = texts["formats"][name]
        assert [fmt.tools(d, TODAY) for d in definitions] == lf["tools"], name
        for calls, theirs in zip(texts["calls"], lf["calls"], strict=True):
            if isinstance(theirs, dict):  # LF refuses (glm4: no parallel calls)
                with pytest.raises(ValueError):
                    fmt.calls([tuple(c) for c in calls])
            else:
                assert fmt.calls([tuple(c) for c in calls]) == theirs, name


def test_the_definitions_reach_the_tool_formats_as_the_record_writes_them():
    """LF's seed_oss format prints the record's tools JSON as it is (a bare definition stays bare): read through
    prefalign's reader, the fixture records' definitions give the text LF's tool_utils wrote for them."""
    from prefalign.data.lf_tools import TOOL_FORMATS

    theirs = FROZEN_TOOLS["texts"]["formats"]["seed_oss"]["tools"]
    assert [TOOL_FORMATS["seed_oss"].tools(json.loads(pair.tools), TODAY) for pair in tool_pairs()] == theirs
    assert '"type": "function"' not in theirs[0]  # the records' definitions are bare


@pytest.mark.parametrize("key", sorted(k for k, v in FROZEN_TOOLS["ids"].items() if "records" in v and
                                     k.split("/")[0] == "qwen2" and
                                     k.split("/")[1:] in (["qwen"], ["mistral"], ["chatml"], ["default"], ["llama3"])))
def test_the_exported_chat_template_writes_the_tool_records_as_llama_factory_encodes_them(key):
    """The Jinja template export writes (for serving) renders each tool record, definitions, calls in the prompt
    and tool-call replies included, to the text of LF's ids (prompt + chosen) (byte-level tokenizers decode
    losslessly); llama3's prompt states the day it renders."""
    from datetime import datetime

    from prefalign.data.templates import get_template

    name = key.split("/")[1]
    tok = tool_renderer(key).lf_encoder._fixed  # with LF's fix (llama3: <|eot_id|> added, the EOS replaced)
    for pair, lf in zip(tool_pairs(), FROZEN_TOOLS["ids"][key]["records"], strict=True):
        text = tok.apply_chat_template(pair.prompt + [pair.reply_message("chosen")], tools=json.loads(pair.tools),
                                       chat_template=get_template(name).jinja, tokenize=False)
        theirs = tok.decode(lf["prompt"] + lf["chosen"]).replace(TODAY, datetime.now().strftime("%d %b %Y"))
        assert text == theirs, key


def test_a_tool_call_reply_under_a_tokenizers_own_template_is_its_assistant_message_with_tool_calls():
    """`template` unset: the reply that is a tool call is rendered as an assistant message with tool_calls. With
    the exported qwen template as the tokenizer's own, its ids are LF's ids of that record up to the end-of-turn
    token (the newline after it is left untrained: the documented difference)."""
    import copy

    from prefalign.data.templates import get_template

    tok = copy.deepcopy(tokenizer("qwen2"))
    tok.chat_template = get_template("qwen").jinja
    lf = FROZEN_TOOLS["ids"]["qwen2/qwen"]["records"]
    for index in (3, 4):  # the chosen, then the rejected reply is a tool call
        ours = encode_pair(tool_pairs()[index], ChatRenderer(tok, None), NO_CUT)
        assert ours["prompt_ids"] == lf[index]["prompt"], index
        assert ours["chosen_ids"] == lf[index]["chosen"][:-1] and ours["rejected_ids"] == lf[index]["rejected"][:-1]
        assert tok.decode(lf[index]["chosen"][-1:]) == "\n"


def test_the_exported_tool_macros_write_llama_factorys_texts():
    """Each tool format the export writes in Jinja (lf_tools.JINJA): its definitions' text and its calls' text
    (one call, parallel calls; glm4 refuses parallel ones) equal LF's tool_utils' frozen texts."""
    from datetime import datetime

    from transformers.utils.chat_template_utils import render_jinja_template

    from prefalign.data.lf_tools import JINJA

    def run(macros, call, **kwargs):
        return render_jinja_template([[{"role": "user", "content": "x"}]], chat_template="".join(macros) + call,
                                     **kwargs)[0][0]

    records = json.loads((PARITY / "tools_data" / "lf_parity_tools.json").read_text())
    texts = FROZEN_TOOLS["texts"]
    assert {"default", "qwen", "llama3", "mistral", "glm4", "seed_oss", "ling"} <= set(JINJA)
    for name, macros in JINJA.items():
        lf = texts["formats"][name]
        for record, theirs in zip(records, lf["tools"], strict=True):
            theirs = theirs.replace(TODAY, datetime.now().strftime("%d %b %Y"))
            assert run(macros, "{{ tools_text(tools) }}", tools=json.loads(record["tools"])) == theirs, name
        for calls, theirs in zip(texts["calls"], lf["calls"], strict=True):
            tool_calls = [{"type": "function", "function": {"name": n, "arguments": json.loads(a)}} for n, a in calls]
            if isinstance(theirs, dict):  # LF refuses (glm4: no parallel calls)
                with pytest.raises(Exception, match="one tool call per assistant turn"):
                    run(macros, "{{ calls_text(calls) }}", calls=tool_calls)
            else:
                assert run(macros, "{{ calls_text(calls) }}", calls=tool_calls) == theirs, name


def test_qwen_tool_record_puts_the_definitions_in_the_system_turn():
    """Hand-checked against Qwen 2.5's format: the default system, then '# Tools' and each definition as one
    JSON line inside <tools>, all before the first user turn; the call as a <tool_call> JSON block in the
    assistant turn, the result in a user turn's <tool_response>."""
    qwen = tokenizer("qwen2")
    text = qwen.decode(encode_pair(tool_pairs()[0], tool_renderer("qwen2/qwen"), NO_CUT)["prompt_ids"])
    weather = {"type": "function", "function": json.loads(tool_pairs()[0].tools)[0]}  # Qwen wraps a bare one
    system = text[:text.index("<|im_start|>user\n")]
    assert system.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                             "assistant.\n\n# Tools\n\n")
    assert "<tools>\n" + json.dumps(weather, ensure_ascii=False) + "\n</tools>" in system
    assert system.endswith("</tool_call><|im_end|>\n")
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temperature": 22') in text


# -- truncation: tests/fixtures/lf_parity/frozen_truncated.json (`freeze`, LF's venv): the plain records cut
# by LF's pairwise processor (its infer_seqlen) at several cutoff_len, for a few names.
FROZEN_TRUNCATED = json.loads((PARITY / "frozen_truncated.json").read_text())


def test_the_frozen_truncated_ids_are_llama_factorys_and_cut():
    assert FROZEN_TRUNCATED["llamafactory"] == "0.9.5"
    cutoffs = {int(key.rsplit("=", 1)[1]) for key in FROZEN_TRUNCATED["ids"]}
    assert len(cutoffs) >= 3
    whole = FROZEN["ids"]["qwen2/qwen"]["records"]
    cut = FROZEN_TRUNCATED["ids"]["qwen2/qwen/cutoff_len=24"]["records"]
    assert all(len(c["prompt"]) + len(c["chosen"]) <= 24 for c in cut)
    # LF keeps the prompt's START: a cut prompt is a prefix of the whole one (here every prompt is cut)
    assert all(c["prompt"] == w["prompt"][:len(c["prompt"])] and len(c["prompt"]) < len(w["prompt"])
               for c, w in zip(cut, whole, strict=True))


@pytest.mark.parametrize("key", sorted(k for k, v in FROZEN_TRUNCATED["ids"].items() if "records" in v))
def test_truncated_ids_equal_llama_factorys(key):
    """A built-in template truncates by LLaMA-Factory's rule: the prompt, chosen and rejected ids LF's pairwise
    processor keeps at that cutoff_len."""
    family, name, case = key.split("/")
    cutoff = int(case.removeprefix("cutoff_len="))
    encoder = ChatRenderer(tokenizer(family), name, {})
    for index, (pair, lf) in enumerate(zip(pairs(), FROZEN_TRUNCATED["ids"][key]["records"], strict=True)):
        ours = encode_pair(pair, encoder, cutoff)
        assert ours["prompt_ids"] == lf["prompt"], (key, index, "prompt")
        assert ours["chosen_ids"] == lf["chosen"], (key, index, "chosen")
        assert ours["rejected_ids"] == lf["rejected"], (key, index, "rejected")


def test_a_named_token_the_tokenizer_lacks_is_a_one_line_refusal():
    """chatglm3's slots write [gMASK]; llama-bpe has no such token and no unknown token, so LLaMA-Factory's id
    for it is None. prefalign refuses the record at render, naming the template and the token; where the
    tokenizer has an unknown token (llama-spm), LF writes that token's id and so does prefalign."""
    from prefalign.errors import PairError

    with pytest.raises(PairError) as caught:
        encode_pair(pairs()[0], ChatRenderer(tokenizer("llama-bpe"), "chatglm3", {}), NO_CUT)
    assert caught.value.stage == "render" and "'[gMASK]'" in str(caught.value) and "\n" not in str(caught.value)
    spm = tokenizer("llama-spm")
    encoded = encode_pair(pairs()[0], ChatRenderer(spm, "chatglm3", {}), NO_CUT)
    assert encoded["prompt_ids"][:1] == [spm.unk_token_id]
