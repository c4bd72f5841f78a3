"""The demo model, tokenizer and preference data: deterministic, loadable, cached, short, learnable."""

import filecmp
import importlib.util
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign import demo
from prefalign.demo import (
    BUILD_INFO_FILE,
    build_tiny_model,
    demo_records,
    demo_texts,
    ensure_demo_model,
    sft_examples,
    sft_reply_nll,
    sft_warmup,
    train_tokenizer,
)
from prefalign.errors import PrefalignError

ROOT = Path(__file__).resolve().parents[1]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _prompt_messages(record):
    user = record["instruction"] + ("\n" + record["input"] if record["input"] else "")
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [{"role": "user", "content": user}]


def _load(demo_data_dir, split):
    return json.loads((demo_data_dir / f"demo_{split}.json").read_text())


# -- the model and tokenizer -------------------------------------------------------------------


def test_build_is_deterministic(tiny_model_dir, tmp_path, demo_data_dir):
    again = build_tiny_model(tmp_path / "again", texts=demo_texts(demo_data_dir), hidden_size=32, num_layers=2, heads=4)
    names = sorted(p.name for p in Path(tiny_model_dir).iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert names == sorted(p.name for p in Path(again).iterdir())
    _match, mismatch, errors = filecmp.cmpfiles(tiny_model_dir, again, names, shallow=False)
    assert not mismatch and not errors


def test_seed_changes_the_weights_and_not_the_callers_rng(tmp_path, demo_data_dir):
    texts = demo_texts(demo_data_dir)[:200]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(tmp_path / "a", texts=texts, hidden_size=16, num_layers=1, heads=2, seed=0)
    assert torch.equal(torch.rand(3), expected)
    b = build_tiny_model(tmp_path / "b", texts=texts, hidden_size=16, num_layers=1, heads=2, seed=1)
    assert filecmp.cmp(Path(a) / "tokenizer.json", Path(b) / "tokenizer.json", shallow=False)
    assert not filecmp.cmp(Path(a) / "model.safetensors", Path(b) / "model.safetensors", shallow=False)


def test_loads_with_auto_classes(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 2)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert model.config.eos_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id == model.config.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("Sure! The capital of France is Paris.", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


def test_chat_template_renders_chatml(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    tokens = tiny_tokenizer.convert_ids_to_tokens(ids)
    # markup and role names are single tokens, and nothing is added around the rendered text
    assert tokens[:3] == ["<|im_start|>", "system", "Ċ"]
    assert tokens[-3:] == ["<|im_start|>", "assistant", "Ċ"]
    assert tiny_tokenizer("Hi").input_ids == tiny_tokenizer("Hi", add_special_tokens=False).input_ids
    assert tiny_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]


def test_tokenizer_round_trips_text(tiny_tokenizer, demo_data_dir):
    texts = demo_texts(demo_data_dir) + ["naïve café — ünïcödé, emoji 🙂, tabs\tand\nnewlines  ", "  leading spaces"]
    for text in texts:
        assert tiny_tokenizer.decode(tiny_tokenizer(text).input_ids) == text


def test_tokenizer_training_is_deterministic(demo_data_dir):
    texts = demo_texts(demo_data_dir)
    first, second = train_tokenizer(texts, vocab_size=512), train_tokenizer(texts, vocab_size=512)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == 512


# -- ensure_demo_model: built once, never half-written -----------------------------------------


def test_ensure_demo_model_builds_once_then_reuses(tmp_path, monkeypatch):
    path = tmp_path / "models" / "demo"
    assert ensure_demo_model(path, hidden_size=16, num_layers=1, heads=2, sft_epochs=1) == str(path)
    config, weights = path / "config.json", path / "model.safetensors"
    stamps = (config.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    info = json.loads((path / BUILD_INFO_FILE).read_text())
    assert info["sft_epochs"] == 1 and info["sft_data"] == "demo_train.json" and info["hidden_size"] == 16

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached demo model was rebuilt")

    monkeypatch.setattr(demo, "build_tiny_model", no_rebuild)
    monkeypatch.setattr(demo, "sft_warmup", no_rebuild)
    # the cache is keyed on the folder alone: other arguments do not rebuild it either
    assert ensure_demo_model(path, hidden_size=16, num_layers=1, heads=2, sft_epochs=1) == str(path)
    assert ensure_demo_model(path) == str(path)
    assert (config.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamps
    # only the model and its lock file are left next to it, no staging folder
    assert sorted(p.name for p in path.parent.iterdir()) == [".demo.lock", "demo"]
    AutoModelForCausalLM.from_pretrained(path)


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    builds = []

    def slow_build(path, **kwargs):
        builds.append(path)
        time.sleep(0.2)
        Path(path, "config.json").write_text("{}")
        return str(path)

    monkeypatch.setattr(demo, "build_tiny_model", slow_build)
    path = tmp_path / "demo"
    threads = [threading.Thread(target=ensure_demo_model, args=(path,), kwargs={"sft_epochs": 0}) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert (path / "config.json").is_file()


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing_build(path, **kwargs):
        Path(path, "half-written.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "build_tiny_model", failing_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo_model(tmp_path / "demo")
    assert [p.name for p in tmp_path.iterdir()] == [".demo.lock"]


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    path = tmp_path / "demo"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(PrefalignError, match="exists but holds no model"):
        ensure_demo_model(path)
    assert (path / "notes.txt").read_text() == "mine"


def test_a_cached_model_without_the_warm_up_is_reused_with_a_warning(tmp_path, caplog):
    path = tmp_path / "demo"
    build_tiny_model(path, texts=demo_texts()[:200], hidden_size=16, num_layers=1, heads=2)  # as older versions did
    with caplog.at_level("WARNING", logger="prefalign.demo"):
        assert ensure_demo_model(path) == str(path)
    assert "without the supervised warm-up" in caplog.text and not (path / BUILD_INFO_FILE).exists()


# -- the supervised warm-up --------------------------------------------------------------------


def test_sft_examples_render_the_prompt_and_both_replies(tiny_tokenizer, demo_data_dir):
    records = _load(demo_data_dir, "train")
    record = next(r for r in records if r.get("system") and r["input"])
    examples = sft_examples(tiny_tokenizer, [record])
    assert len(examples) == 2 and examples[0][0] == examples[1][0]
    prompt = tiny_tokenizer.decode(examples[0][0])
    assert prompt == (
        f"<|im_start|>system\n{record['system']}<|im_end|>\n"
        f"<|im_start|>user\n{record['instruction']}\n{record['input']}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert [tiny_tokenizer.decode(reply) for _, reply in examples] == [
        record["chosen"] + "<|im_end|>", record["rejected"] + "<|im_end|>",
    ]
    # the same prompt ids as the tests' DPO encoding (and the training pipeline's rendering)
    assert [e for pair in [_encode(tiny_tokenizer, record)] for e in pair] == examples
    bare = next(r for r in records if not r.get("system") and not r["input"])
    assert tiny_tokenizer.decode(sft_examples(tiny_tokenizer, [bare])[0][0]) == (
        f"<|im_start|>user\n{bare['instruction']}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sft_warmup_lowers_the_reply_nll(tiny_model_dir, demo_data_dir):
    """Eight short epochs on 64 training records: their replies' NLL drops well below the random model's
    (~ln(vocab) = 7.4 nats/token); the caller's random stream and thread count are left as they were."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    records = _load(demo_data_dir, "train")[:64]
    before = sft_reply_nll(model, tokenizer, records)
    threads = torch.get_num_threads()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert sft_warmup(model, records, 8, 3e-3, 0, tokenizer=tokenizer) is model
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads
    after = sft_reply_nll(model, tokenizer, records)
    assert before > 7.0 and after < before - 2.0, (before, after)


def test_sft_warmup_of_a_folder_saves_it_in_place(tmp_path, demo_data_dir):
    path = build_tiny_model(tmp_path / "m", texts=demo_texts(demo_data_dir), hidden_size=16, num_layers=1, heads=2)
    random_weights = (Path(path) / "model.safetensors").read_bytes()
    records = _load(demo_data_dir, "train")[:16]
    assert sft_warmup(path, records, epochs=1, lr=1e-3, seed=0) == path
    assert (Path(path) / "model.safetensors").read_bytes() != random_weights
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.generation_config.eos_token_id == AutoTokenizer.from_pretrained(path).eos_token_id
    with pytest.raises(PrefalignError, match="tokenizer"):
        sft_warmup(model, records, epochs=1)


def test_the_warmed_up_build_is_deterministic(tmp_path):
    """Two builds (random init + warm-up) give byte-identical files: the warm-up runs on one thread,
    whatever the caller's setting, so its rounding does not depend on the thread count."""
    kwargs = {"hidden_size": 16, "num_layers": 1, "heads": 2, "sft_epochs": 2}
    threads = torch.get_num_threads()
    a = Path(ensure_demo_model(tmp_path / "a", **kwargs))
    torch.set_num_threads(max(2, threads))
    try:
        b = Path(ensure_demo_model(tmp_path / "b", **kwargs))
    finally:
        torch.set_num_threads(threads)
    cold = Path(ensure_demo_model(tmp_path / "cold", **{**kwargs, "sft_epochs": 0}))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "model.safetensors" in names
    _match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors
    assert not filecmp.cmp(a / "model.safetensors", cold / "model.safetensors", shallow=False)
    assert filecmp.cmp(a / "tokenizer.json", cold / "tokenizer.json", shallow=False)


def test_the_warm_up_never_reads_the_eval_file(tmp_path, demo_data_dir, monkeypatch):
    """With the tokenizer's texts given, the build reads demo_train.json and nothing else: a data folder
    whose demo_eval.json is garbage gives the same weights as the shipped one, and no file named
    demo_eval.json is opened."""
    poisoned = tmp_path / "data"
    poisoned.mkdir()
    (poisoned / "demo_train.json").write_bytes((demo_data_dir / "demo_train.json").read_bytes())
    (poisoned / "demo_eval.json").write_text("not json: reading this file is a bug")
    texts = demo_texts(demo_data_dir)
    opened = []
    real_open, real_read_text = open, Path.read_text

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_read_text(self, *args, **kwargs):
        opened.append(str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy_open)
    monkeypatch.setattr(Path, "read_text", spy_read_text)
    kwargs = {"texts": texts, "hidden_size": 16, "num_layers": 1, "heads": 2, "sft_epochs": 1}
    a = Path(ensure_demo_model(tmp_path / "a", data_dir=poisoned, **kwargs))
    assert any(name.endswith("demo_train.json") for name in opened)
    assert not any(name.endswith("demo_eval.json") for name in opened), opened
    monkeypatch.undo()
    b = Path(ensure_demo_model(tmp_path / "b", data_dir=demo_data_dir, **kwargs))
    assert filecmp.cmp(a / "model.safetensors", b / "model.safetensors", shallow=False)
    assert demo_records("train", poisoned) == _load(demo_data_dir, "train")


@pytest.mark.slow
@pytest.mark.extended  # trains the demo model to its answers
def test_the_demo_model_answers_in_the_demo_style(tmp_path, demo_data_dir):
    """The model the quickstart builds (default size and warm-up) has learnt its training replies and
    answers held-out questions greedily with a complete reply that opens like a polite or a rude one."""
    path = ensure_demo_model(tmp_path / "demo")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sft_reply_nll(model, tokenizer, _load(demo_data_dir, "train")[:100]) < 0.5
    train = _load(demo_data_dir, "train")
    opener = lambda text: text.split("!")[0].split(".")[0]
    openers = {opener(r[side]) for r in train for side in ("chosen", "rejected")}
    for question in ("What is the capital of France?", "What color is a banana?", "Tell me what a bridge is."):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**ids, do_sample=False, max_new_tokens=40)[0, ids["input_ids"].shape[1] :]
        reply = tokenizer.decode(out, skip_special_tokens=True)
        assert out[-1].item() == tokenizer.eos_token_id and opener(reply) in openers, (question, reply)


# -- the demo data -----------------------------------------------------------------------------


def test_dataset_info_registers_both_splits(demo_data_dir):
    info = json.loads((demo_data_dir / "dataset_info.json").read_text())
    for name in ("demo_train", "demo_eval"):
        entry = info[name]
        assert entry["ranking"] is True
        assert entry["columns"] == {
            "prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected", "system": "system",
        }
        assert (demo_data_dir / entry["file_name"]).is_file()


def test_demo_data_shape(demo_data_dir):
    train, eval_ = _load(demo_data_dir, "train"), _load(demo_data_dir, "eval")
    assert (len(train), len(eval_)) == (400, 100)
    assert sum((demo_data_dir / f).stat().st_size for f in os.listdir(demo_data_dir)) < 300_000
    for record in train + eval_:
        assert {"instruction", "input", "chosen", "rejected"} <= set(record) <= {
            "instruction", "input", "chosen", "rejected", "system",
        }
        assert record["chosen"] != record["rejected"]
        assert max(len(record["chosen"].split()), len(record["rejected"].split())) <= 20
    assert any("system" in r for r in train) and any(r["input"] for r in train)
    prompts = lambda records: {(r.get("system"), r["instruction"], r["input"]) for r in records}
    assert len(prompts(train)) == len(train)
    # held out: no eval prompt, nor its question alone, occurs in the training data
    train_questions = {r["input"] or r["instruction"] for r in train}
    assert not prompts(train) & prompts(eval_)
    assert not {r["input"] or r["instruction"] for r in eval_} & train_questions


def test_demo_data_is_what_the_generator_writes(demo_data_dir):
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.render_files(400, 100, 1234).items():
        assert (demo_data_dir / name).read_text() == text, f"{name} is stale: run scripts/make_demo_data.py"


def test_demo_sequences_fit_in_64_tokens(demo_data_dir):
    """With the demo model's own tokenizer (default vocabulary), prompt + reply + end of turn < 64 tokens."""
    tokenizer = train_tokenizer(demo_texts(demo_data_dir))
    for split in ("train", "eval"):
        for record in _load(demo_data_dir, split):
            prompt = tokenizer.apply_chat_template(_prompt_messages(record), tokenize=False, add_generation_prompt=True)
            for side in ("chosen", "rejected"):
                ids = tokenizer(prompt + record[side] + tokenizer.eos_token, add_special_tokens=False).input_ids
                assert len(ids) < 64, (split, record)


# -- the preference is learnable ---------------------------------------------------------------


def _encode(tokenizer, record):
    prompt = tokenizer.apply_chat_template(_prompt_messages(record), tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    replies = [tokenizer(record[s] + tokenizer.eos_token, add_special_tokens=False).input_ids for s in ("chosen", "rejected")]
    return [(prompt_ids, reply) for reply in replies]


def _reply_logps(model, sequences):
    """Summed log-probabilities of each reply given its prompt, shape (len(sequences),)."""
    length = max(len(p) + len(r) for p, r in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    reply = torch.zeros(len(sequences), length)
    for i, (p, r) in enumerate(sequences):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        reply[i, len(p) : len(p) + len(r)] = 1
    logps = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
    token_logps = logps.gather(2, ids[:, 1:, None]).squeeze(2)
    return (token_logps * reply[:, 1:]).sum(-1)


def _margins(policy, reference, pairs, beta):
    """DPO implicit reward margins beta * (log pi/ref (chosen) - log pi/ref (rejected)), shape (len(pairs),)."""
    sequences = [p[0] for p in pairs] + [p[1] for p in pairs]
    with torch.no_grad():
        ref = reference(sequences)
    logratio = policy(sequences) - ref
    return beta * (logratio[: len(pairs)] - logratio[len(pairs) :])


def _held_out_accuracy_after_dpo(model_dir, demo_data_dir, *, swap_labels=False, steps=40):
    """Train the model with a plain DPO loop (sigmoid loss, beta 0.1, batch 8, AdamW 5e-4), return held-out reward accuracy."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    train = [_encode(tokenizer, r) for r in _load(demo_data_dir, "train")]
    if swap_labels:
        train = [(rejected, chosen) for chosen, rejected in train]
    held_out = [_encode(tokenizer, r) for r in _load(demo_data_dir, "eval")]
    logps = lambda model: lambda seqs: _reply_logps(model, seqs)
    beta, rng = 0.1, random.Random(0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-4)
    for _ in range(steps):
        margins = _margins(logps(policy), logps(reference), rng.sample(train, 8), beta)
        loss = -F.logsigmoid(margins).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    with torch.no_grad():
        margins = _margins(logps(policy), logps(reference), held_out, beta)
    return (margins > 0).float().mean().item()


@pytest.mark.slow
def test_dpo_learns_the_demo_preference_and_generalises(tiny_model_dir, demo_data_dir):
    """40 DPO steps on the hidden-32 model reach >= 0.8 reward accuracy on the held-out prompts (the
    bar the quickstart is held to); trained on swapped labels, the same loop learns the opposite, so
    the accuracy comes from the labels and not from e.g. reply length."""
    assert _held_out_accuracy_after_dpo(tiny_model_dir, demo_data_dir) >= 0.8
    assert _held_out_accuracy_after_dpo(tiny_model_dir, demo_data_dir, swap_labels=True) <= 0.2
