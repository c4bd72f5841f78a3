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
