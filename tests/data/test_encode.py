"""Rendering, tokenization, truncation and batching of preference pairs."""


import pytest
import torch
from helpers import EXAMPLES, ROOT

from prefalign.contracts import PreferencePair, RecordSource
from prefalign.data.chat import ChatRenderer
from prefalign.contracts import IGNORE_INDEX
from prefalign.data.collate import PairCollator
from prefalign.data.encode import encode_pair, encode_pairs, truncate_pair
from prefalign.errors import ConfigError

SOURCE = RecordSource("mem.json", 0)


def make_pair(**kw):
    prompt = kw.pop("prompt", [{"role": "system", "content": "Be kind."},
                               {"role": "user", "content": "What is the capital of France?"}])
    return PreferencePair(prompt, kw.pop("chosen", "Sure! It is Paris."), kw.pop("rejected", "No idea."), SOURCE)


def _chat_ids(tokenizer, messages, return_dict=True, **kw):
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=return_dict, **kw)
    return list(out["input_ids"]) if return_dict else list(out)


@pytest.mark.parametrize("return_dict", [True, False], ids=["return_dict", "ids"])
def test_encoding_equals_the_tokenizers_own_chat_template(tiny_tokenizer, return_dict):
    """Whatever form apply_chat_template returns, its ids are prompt_ids + each response's ids."""
    pair = make_pair()
    renderer = ChatRenderer(tiny_tokenizer, None)
    enc = encode_pair(pair, renderer, cutoff_len=1024)
    jinja = None
    prompt_ids = _chat_ids(tiny_tokenizer, pair.prompt, return_dict, add_generation_prompt=True, chat_template=jinja)
    assert enc["prompt_ids"] == prompt_ids
    for side in ("chosen", "rejected"):
        full = _chat_ids(tiny_tokenizer, pair.prompt + [{"role": "assistant", "content": getattr(pair, side)}],
                         return_dict, chat_template=jinja)
        response = enc[f"{side}_ids"]
        assert full[: len(prompt_ids) + len(response)] == prompt_ids + response
        # the response ends with the end-of-turn token, and only what follows it is left out
        eot = tiny_tokenizer.convert_tokens_to_ids(renderer.end_of_turn)
        assert response[-1] == eot
        assert eot not in full[len(prompt_ids) + len(response):]


def test_multi_turn_history_is_in_the_prompt(tiny_tokenizer):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "What color is grass?"}]
    enc = encode_pair(make_pair(prompt=prompt), ChatRenderer(tiny_tokenizer, None), 1024)
    text = tiny_tokenizer.decode(enc["prompt_ids"])
    assert "Hello!" in text and text.rstrip().endswith("assistant")


def test_only_the_last_turn_is_trained_and_scored_as_llama_factorys_dpo_does(tiny_tokenizer):
    """LF 0.9.5's pairwise processor encodes a multi-turn record as one turn: the history is prompt
    (label -100), only the last reply is the preference. That is what `mask_history` asks of sft, and
    why LF refuses the key outside sft. Expected labels: apply_chat_template's ids of the whole
    conversation after those of the history with the generation prompt, up to the end-of-turn token."""
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there friend!"},
               {"role": "user", "content": "What color is grass?"}]
    renderer = ChatRenderer(tiny_tokenizer, None)
    enc = encode_pair(make_pair(prompt=history, chosen="Green.", rejected="Blue."), renderer, 1024)
    batch = PairCollator(pad_token_id=0)([{**enc, "index": 0}])
    prompt = _chat_ids(tiny_tokenizer, history, add_generation_prompt=True)
    eot = tiny_tokenizer.convert_tokens_to_ids(renderer.end_of_turn)
    for row, reply in ((0, "Green."), (1, "Blue.")):
        full = _chat_ids(tiny_tokenizer, history + [{"role": "assistant", "content": reply}])
        expected = full[len(prompt): full.index(eot, len(prompt)) + 1]
        labels = [t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX]
        assert labels == expected
        assert "Hello there friend" not in tiny_tokenizer.decode(labels)


def test_no_template_is_a_config_error(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        ChatRenderer(tok, None)


def test_truncation_keeps_responses_and_the_prompt_tail():
    """C=10, P=8, R=4: responses fit beside max(10-4, min(8, 5)) = 6 prompt tokens, the last 6."""
    prompt, chosen, rejected = list(range(100, 108)), [1, 2, 3, 4], [5, 6]
    p, c, r = truncate_pair(prompt, chosen, rejected, 10)
    assert p == prompt[-6:] and c == chosen and r == rejected


def test_truncation_of_long_responses_keeps_half_the_budget_for_the_prompt():
    """C=10, P=8, R=20: the prompt keeps min(8, 10//2) = 5 tail tokens, responses 5 head tokens."""
    prompt, chosen, rejected = list(range(100, 108)), list(range(20)), [7, 8]
    p, c, r = truncate_pair(prompt, chosen, rejected, 10)
    assert p == prompt[-5:] and c == chosen[:5] and r == [7, 8]


@pytest.mark.parametrize("prompt_len, longest, cutoff, kept", [
    (8, 4, 10, (6, 4)),     # 2R < C: responses whole, the prompt keeps C - R = 6 (its first 6)
    (4, 12, 10, (4, 6)),    # 2P < C: the prompt whole, responses keep C - P = 6
    (12, 8, 10, (6, 4)),    # both long: responses keep int(10 * 8 / 20) = 4, the prompt 10 - 4 = 6
    (40, 5, 8, None),       # int(8 * 5 / 45) = 0: no reply token left (encode_pair refuses such a pair)
])
def test_llamafactory_truncation_keeps_the_prompt_start(prompt_len, longest, cutoff, kept):
    """LLaMA-Factory's infer_seqlen (processor_utils.py), by hand for its three cases."""
    prompt, chosen, rejected = list(range(100, 100 + prompt_len)), list(range(longest)), [7, 8]
    p, c, r = truncate_pair(prompt, chosen, rejected, cutoff, bos_token_id=100, rule="llamafactory")
    if kept is None:
        assert c == [] and r == []
        return
    assert p == prompt[:kept[0]] and c == chosen[:kept[1]] and r == rejected[:kept[1]]


def test_a_builtin_template_refuses_a_pair_llamafactorys_truncation_leaves_no_reply(tiny_tokenizer):
    """cutoff_len 8, a prompt of far more than 8 tokens and replies of at least 4: LF's rule keeps
    int(8 * R / (P + R)) = 0 reply tokens; prefalign refuses the pair (LF would train none of it)."""
    from prefalign.errors import PairError

    pair = make_pair(prompt=[{"role": "user", "content": "word " * 200}], chosen="a b c d e f", rejected="g h i j k l")
    with pytest.raises(PairError, match="no reply token within cutoff_len 8"):
        encode_pair(pair, ChatRenderer(tiny_tokenizer, "empty"), 8)


def test_truncation_keeps_bos():
    p, _, _ = truncate_pair([0, 11, 12, 13, 14, 15], [1, 2, 3], [4], 6, bos_token_id=0)
    assert p == [0, 14, 15]


def test_encoded_cache_is_reused(tiny_tokenizer, tmp_path):
    renderer = ChatRenderer(tiny_tokenizer, None)
    pairs = [make_pair(chosen=f"Sure! Answer {i}.") for i in range(5)]
    first, stats = encode_pairs(pairs, renderer, 64, cache_dir=tmp_path)
    cached = list((tmp_path / "encoded").iterdir())
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second, stats2 = encode_pairs(pairs, renderer, 64, cache_dir=tmp_path)
    assert cached[0].stat().st_mtime_ns == mtime and stats == stats2
    assert first["chosen_ids"] == second["chosen_ids"]
    encode_pairs(pairs, renderer, 32, cache_dir=tmp_path)  # another cutoff: another cache entry
    assert len(list((tmp_path / "encoded").iterdir())) == 2


def test_collator_puts_chosen_then_rejected_and_masks_the_prompt():
    features = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9], "index": 3},
                {"prompt_ids": [5], "chosen_ids": [7], "rejected_ids": [9, 9, 9], "index": 4}]
    batch = PairCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 7, 0, 0], [5, 6, 9, 0], [5, 9, 9, 9]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, 7, 8], [x, 7, x, x], [x, x, 9, x], [x, 9, 9, 9]]
    assert batch["attention_mask"].sum(1).tolist() == [4, 2, 3, 4]
    assert torch.equal(batch["index"], torch.tensor([3, 4]))


@pytest.mark.parametrize("template, markup", [
    ("llama3", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]), ("mistral", [])])
def test_no_double_bos(tiny_tokenizer, template, markup):
    """Templates that write BOS themselves get exactly one: slots are encoded without special tokens."""
    tiny_tokenizer.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": markup})
    enc = encode_pair(make_pair(), ChatRenderer(tiny_tokenizer, template), 1024)
    bos = tiny_tokenizer.bos_token_id
    assert enc["prompt_ids"][0] == bos and enc["prompt_ids"].count(bos) == 1
    assert bos not in enc["chosen_ids"] + enc["rejected_ids"]


def test_a_role_the_template_cannot_render_is_a_data_error(tiny_tokenizer):
    from prefalign.errors import PairError

    pair = make_pair(prompt=[{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}])
    # a built-in template's tool format that writes one call per turn (LLaMA-Factory's glm4) refuses two
    calls = [{"type": "function", "function": {"name": name, "arguments": {}}} for name in ("a", "b")]
    with pytest.raises(PairError, match=r"mem.json record 0, field prompt: template: chatml: tool_format glm4 writes "
                                        r"one tool call per assistant turn"):
        encode_pair(make_pair(prompt=[{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "", "tool_calls": calls},
                                      {"role": "tool", "content": "42"}]),
                    ChatRenderer(tiny_tokenizer, "chatml", tool_format="glm4"), 1024)
    tiny_tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                                    "{{ raise_exception('no tool role here') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(PairError, match=r"field prompt: the tokenizer's own chat template cannot render.*no tool role") as error:
        encode_pair(pair, ChatRenderer(tiny_tokenizer, None), 1024)
    assert error.value.stage == "render"


EXAMPLE_CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_prefalign_data_runs_on_every_example_config(path, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from prefalign.cli import main

    monkeypatch.chdir(ROOT)
    code = main(["data", str(path), f"model_name_or_path={tiny_model_dir}", "build_demo_model=false",
                 f"output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "demo_train: " in out and "[prompt: masked, not trained," in out and "[chosen: trained," in out
    assert "chosen tokens: min" in out


def test_a_template_llama_factory_adds_tokens_for_encodes_with_them(tiny_tokenizer):
    """LLaMA-Factory adds llama3's stop words the tiny tokenizer lacks (<|eot_id|> as the EOS, then <|eom_id|>):
    the responses end with the first new id, len(tokenizer); the tokenizer given is left as it was (a run's is
    extended when loaded, data/vocab.py). Markup that is not a stop word (zephyr's <|user|>) is encoded as
    text, as LF does."""
    size = len(tiny_tokenizer)
    enc = encode_pair(make_pair(), ChatRenderer(tiny_tokenizer, "llama3"), 1024)
    assert enc["chosen_ids"][-1] == size and enc["rejected_ids"][-1] == size
    assert len(tiny_tokenizer) == size and "<|eot_id|>" not in tiny_tokenizer.get_vocab()
    enc = encode_pair(make_pair(), ChatRenderer(tiny_tokenizer, "zephyr"), 1024)
    assert tiny_tokenizer.decode(enc["prompt_ids"]).endswith("<|assistant|>\n")


def test_preprocessing_batch_size_does_not_change_the_encoding(tiny_tokenizer, tmp_path):
    renderer = ChatRenderer(tiny_tokenizer, None)
    pairs = [make_pair(chosen=f"Sure! Answer {i}.") for i in range(5)]
    whole, _ = encode_pairs(pairs, renderer, 64, cache_dir=tmp_path / "a")
    batched, _ = encode_pairs(pairs, renderer, 64, batch_size=2, cache_dir=tmp_path / "b")
    assert whole["chosen_ids"] == batched["chosen_ids"] and whole["prompt_ids"] == batched["prompt_ids"]


def _tokenizer_without_unknowns():
    """A character-level BPE over ASCII letters with no unknown token: any other character is dropped,
    as a tokenizer read by the wrong class (or without byte fallback) drops text it does not cover."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, " ": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz?.!")}}
    backend = Tokenizer(models.BPE(vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")


@pytest.mark.parametrize("field", ["prompt", "chosen"])
def test_text_the_tokenizer_drops_is_a_data_error_not_an_empty_pair(field):
    """A pair whose prompt, or reply, encodes to nothing (the reply: to its end-of-turn token alone) would
    train on nothing scored; it is refused, naming the record and the field."""
    from prefalign.errors import PairError

    tokenizer = _tokenizer_without_unknowns()
    renderer = ChatRenderer(tokenizer, "empty")
    assert encode_pair(make_pair(prompt=[{"role": "user", "content": "where is paris?"}], chosen="in france.",
                                 rejected="no idea."), renderer, 64)["chosen_ids"][:-1] != []
    dropped = {"prompt": [{"role": "user", "content": "где Париж"}], "chosen": "во Франции"}
    kwargs = {"prompt": [{"role": "user", "content": "where is paris?"}], "chosen": "in france.", **{field: dropped[field]}}
    with pytest.raises(PairError, match=rf"mem.json record 0, field {field}: .*encodes to no tokens.*drops this text"):
        encode_pair(make_pair(rejected="no idea.", **kwargs), renderer, 64)
