"""The tiny demo model: a small Llama supervised-fine-tuned on the demo data, and a BPE tokenizer trained locally.

The quickstart (`examples/quickstart.yaml`) and the tests need a causal LM that exists offline and
trains in seconds on a CPU, so none is downloaded: `ensure_demo_model` builds one the first time
(deterministically, from a seed and the demo data) and reuses it afterwards.

DPO aligns a supervised-fine-tuned model, so the demo model is one: `build_tiny_model` initialises
it at random (the tests use that one as is), then `sft_warmup` trains it, in plain PyTorch, on the
chosen *and* the rejected replies of `demo_train.json` (never on the held-out `demo_eval.json`).
It then answers in the demo's style, politely or rudely, and DPO shifts it towards polite.

The tokenizer is byte-level BPE, so it encodes any text and decodes it back unchanged. Its
special tokens follow Qwen2-Instruct: `<|im_start|>`/`<|im_end|>` mark ChatML turns, eos is
`<|im_end|>` (generation stops at the end of the assistant's turn) and pad is `<|endoftext|>`
(never the eos, so masking padding never masks a real end of turn); there is no bos.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prefalign.errors import PrefalignError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS_TOKEN = IM_END
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

# A cap: BPE stops merging when no pair occurs twice, which the demo corpus reaches at ~1,630
# tokens; the model's vocabulary is the tokenizer's actual size.
DEFAULT_VOCAB_SIZE = 2048
DEFAULT_MAX_POSITIONS = 512

# The demo model's size (`build_tiny_model` arguments) as `ensure_demo_model` builds it.
DEMO_MODEL_KWARGS = {"hidden_size": 64, "num_layers": 2, "heads": 4}
# Its supervised warm-up (`sft_warmup`): 30 epochs of 50 steps take ~30 s on one CPU core and bring
# the training replies' NLL from 7.4 to ~0.16 nats/token; greedy replies are then fluent in the
# demo's style (fewer epochs leave them broken, more only memorise).
DEFAULT_SFT_EPOCHS = 30
DEFAULT_SFT_LR = 2e-3
DEFAULT_SFT_BATCH_SIZE = 16
# One thread: the weights then do not depend on the machine's core count, and a model this small
# trains fastest on one (two threads were up to 50x slower on a 2-core machine with another job).
DEFAULT_SFT_THREADS = 1
# Written next to the weights: how the demo model was built (a folder without it predates the warm-up).
BUILD_INFO_FILE = "prefalign_demo.json"

# The demo data lives in the source tree (examples/data), next to the package's src/ folder; an
# installed (non-editable) package finds it from the current directory, where the quickstart runs.
DEMO_DATA_DIR = Path(__file__).resolve().parents[2] / "examples" / "data"
# A tokenizer's vocabulary is language, not preferences: like a pretrained one, the demo tokenizer
# has seen the held-out prompts' words, so they do not fall apart into single letters.
DEMO_FILES = ("demo_train.json", "demo_eval.json")

# The demo tokenizer's own chat template: ChatML, the generation prompt only when asked for (as a
# real model's template behaves).
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Text the tokenizer always sees, often enough that each role name becomes one token.
_MARKUP_TEXTS = ("system\n", "user\n", "assistant\n") * 50


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    chat_template: str = DEMO_CHAT_TEMPLATE,
    model_max_length: int = DEFAULT_MAX_POSITIONS,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a `PreTrainedTokenizerFast`.

    The ids of `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are 0, 1, 2; the 256 byte symbols
    follow, then merges up to `vocab_size` (fewer if the corpus runs out of pairs seen twice).
    Training is deterministic: the same texts give the same tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: a word at the start of a message is not given a space it lacked.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [*_MARKUP_TEXTS, *texts]
    backend.train_from_iterator(corpus, trainer=trainer, length=len(corpus))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=model_max_length,
        padding_side="right",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def demo_texts(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Every text field (system, instruction, input, chosen, rejected) of the demo data files."""
    data_dir = _resolve_data_dir(data_dir)
    texts = []
    for name in DEMO_FILES:
        path = data_dir / name
        if not path.is_file():
            raise PrefalignError(
                f"The demo data {path} is missing; the demo model's tokenizer is trained on it. Run from a "
                "prefalign source checkout, regenerate it with `python scripts/make_demo_data.py`, or pass `texts`."
            )
        records = json.loads(path.read_text(encoding="utf-8"))
        fields = ("system", "instruction", "input", "chosen", "rejected")
        texts += [record[f] for record in records for f in fields if record.get(f)]
    return texts


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        data_dir = DEMO_DATA_DIR if DEMO_DATA_DIR.is_dir() else Path.cwd() / "examples" / "data"
    return Path(data_dir)


def demo_records(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The records of `demo_<split>.json` (`split` is "train" or "eval"), as loaded from JSON."""
    path = _resolve_data_dir(data_dir) / f"demo_{split}.json"
    if not path.is_file():
        raise PrefalignError(
            f"The demo data {path} is missing; the demo model is warmed up on it. Run from a prefalign "
            "source checkout, or regenerate it with `python scripts/make_demo_data.py`."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def build_tiny_model(
    path: str | os.PathLike,
    *,
    texts: Iterable[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    intermediate_size: int | None = None,
    max_position_embeddings: int = DEFAULT_MAX_POSITIONS,
) -> str:
    """Build a randomly initialised `LlamaForCausalLM` and its tokenizer into `path`; return `path`.

    The tokenizer is trained on `texts` (default: `demo_texts()`). The same arguments
    give byte-identical files, so a test can build the model twice and compare. `path` is written
    in place; use `ensure_demo_model` where another process may read it meanwhile.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(
        demo_texts() if texts is None else texts, vocab_size=vocab_size, model_max_length=max_position_embeddings
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # fork_rng: building a model must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def sft_examples(tokenizer, records: Iterable[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) for both the chosen and the rejected reply of each preference record.

    The prompt is the record rendered with the tokenizer's chat template up to the assistant's turn
    (system message if present; user = instruction, plus "\n" + input when input is non-empty); the
    reply is the reply text followed by the end of turn (the eos, `<|im_end|>`).
    """
    examples = []
    for record in records:
        user = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
            {"role": "user", "content": user}
        ]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        for side in ("chosen", "rejected"):
            reply_ids = tokenizer(record[side] + tokenizer.eos_token, add_special_tokens=False).input_ids
            examples.append((prompt_ids, reply_ids))
    return examples


def _sft_batch(examples: list[tuple[list[int], list[int]]], pad_token_id: int):
    """Right-padded input ids, attention mask and labels (-100 except on the reply tokens)."""
    import torch

    length = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for i, (prompt, reply) in enumerate(examples):
        n = len(prompt) + len(reply)
        input_ids[i, :n] = torch.tensor(prompt + reply)
        attention_mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(reply)
    return input_ids, attention_mask, labels


def _sft_loss(model, input_ids, attention_mask, labels):
    """Mean cross-entropy of the reply tokens, the vocabulary projection computed only where it is needed."""
    import torch

    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def sft_reply_nll(model, tokenizer, records: Iterable[dict], batch_size: int = 64) -> float:
    """Mean negative log-likelihood per reply token (chosen and rejected, end of turn included)."""
    import torch

    examples = sft_examples(tokenizer, records)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            input_ids, attention_mask, labels = _sft_batch(examples[start : start + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += nll.item()
            count += int((targets != -100).sum())
    model.train(was_training)
    return total / count


def sft_warmup(
    path_or_model,
    records: Iterable[dict],
    epochs: int = DEFAULT_SFT_EPOCHS,
    lr: float = DEFAULT_SFT_LR,
    seed: int = 0,
    *,
    tokenizer=None,
    batch_size: int = DEFAULT_SFT_BATCH_SIZE,
    num_threads: int | None = DEFAULT_SFT_THREADS,
):
    """Supervised warm-up: train a causal LM on the replies of preference `records`, in plain PyTorch.

    Both the chosen and the rejected reply of each record are trained on (so the model answers
    politely or rudely about equally often, and DPO has a preference to shift), with the loss on
    the reply tokens only, end of turn included: AdamW, linear warm-up then cosine decay, `epochs`
    passes over the shuffled examples in batches of `batch_size`.

    `path_or_model` is a model folder (its model is trained and saved back in place, its tokenizer
    is used; returns the path) or a `PreTrainedModel` (trained in place with `tokenizer`; returns
    it). Deterministic: the seed fixes the order, and the run is pinned to `num_threads` CPU
    threads (default 1; None keeps the caller's setting) because a matrix product's rounding can
    depend on how many threads share it. The caller's random stream and thread count are unchanged.
    """
    import math

    import torch

    path = None
    if isinstance(path_or_model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path_or_model)
        tokenizer = AutoTokenizer.from_pretrained(path) if tokenizer is None else tokenizer
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = path_or_model
        if tokenizer is None:
            raise PrefalignError("sft_warmup: pass `tokenizer` along with a model object.")

    examples = sft_examples(tokenizer, records)
    if not examples:
        raise PrefalignError("sft_warmup: no records to train on.")
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    warmup_steps = max(1, total_steps // 20)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order_rng = torch.Generator().manual_seed(seed)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            for _ in range(epochs):
                order = torch.randperm(len(examples), generator=order_rng).tolist()
                for start in range(0, len(order), batch_size):
                    batch = [examples[i] for i in order[start : start + batch_size]]
                    loss = _sft_loss(model, *_sft_batch(batch, tokenizer.pad_token_id))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
        finally:
            torch.set_num_threads(threads)
    model.eval()
    if path is None:
        return model
    model.save_pretrained(path)
    return str(path)


def ensure_demo_model(
    path: str | os.PathLike,
    *,
    sft_epochs: int = DEFAULT_SFT_EPOCHS,
    sft_lr: float = DEFAULT_SFT_LR,
    data_dir: str | os.PathLike | None = None,
    **build_kwargs,
) -> str:
    """Return `path`, first building the demo model there if `<path>/config.json` is missing.

    The demo model is a supervised-fine-tuned one, as DPO expects: `build_tiny_model` (with
    `DEMO_MODEL_KWARGS`, overridden by `build_kwargs`) and then `sft_warmup` for `sft_epochs` epochs
    (0: none, the model stays random) on the chosen and rejected replies of `demo_train.json` in
    `data_dir` (default: the shipped demo data); the held-out `demo_eval.json` is never trained on
    (the tokenizer, like a pretrained one, does see its words: `texts` defaults to `demo_texts`).
    The arguments are recorded in `<path>/prefalign_demo.json`; a cached model without that file
    predates the warm-up and is reused with a warning.

    The model is built in a temporary sibling folder and renamed into place, so a reader never
    sees a half-written model; a lock file next to `path` makes concurrent callers (e.g. the
    processes of a distributed run) build it once.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        _warn_if_not_warmed_up(path)
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.parent / f".{path.name}.lock"):
        if (path / "config.json").is_file():  # built by another process while we waited
            return str(path)
        if path.exists():
            if not path.is_dir() or any(path.iterdir()):
                raise PrefalignError(
                    f"{path} exists but holds no model (no config.json), so the demo model cannot be "
                    "built there. Delete it or point `model_name_or_path` elsewhere."
                )
            path.rmdir()
        staging = path.parent / f".{path.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            kwargs = {**DEMO_MODEL_KWARGS, **build_kwargs}
            if kwargs.get("texts") is None:
                kwargs["texts"] = demo_texts(data_dir)
            build_tiny_model(staging, **kwargs)
            if sft_epochs > 0:
                sft_warmup(staging, demo_records("train", data_dir), sft_epochs, sft_lr, kwargs.get("seed", 0))
            info = {k: v for k, v in kwargs.items() if k != "texts"}
            info.update(sft_epochs=sft_epochs, sft_lr=sft_lr, sft_data="demo_train.json" if sft_epochs > 0 else None)
            (staging / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            os.replace(staging, path)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if (path / "config.json").is_file():  # another builder without the lock won the rename
                return str(path)
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return str(path)


def check_demo_model_path(path: str | os.PathLike) -> None:
    """Refuse to build a second demo model beside one whose name is close to `path`'s: that is a typo."""
    from prefalign.config.paths import closest_sibling

    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return
    close = closest_sibling(path, holding=BUILD_INFO_FILE)
    if close is not None:
        raise PrefalignError(
            f"model_name_or_path: {str(path)!r} does not exist, and build_demo_model: true would build a second "
            f"demo model beside {str(close)!r}; did you mean {str(close)!r}? (to build a new one, pick a name not "
            "close to an existing model's)")


def _warn_if_not_warmed_up(path: Path) -> None:
    """A demo model cached by a prefalign without the supervised warm-up is reused, with a warning."""
    if not (path / BUILD_INFO_FILE).is_file():
        logger.warning(
            "%s holds a demo model built without the supervised warm-up (no %s): DPO will align a "
            "randomly initialised model. Delete the folder to rebuild it.", path, BUILD_INFO_FILE
        )


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `lock_path` (POSIX); elsewhere a no-op, the rename still keeps readers safe."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


__all__ = [
    "BUILD_INFO_FILE",
    "DEMO_DATA_DIR",
    "DEMO_MODEL_KWARGS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "build_tiny_model",
    "check_demo_model_path",
    "demo_records",
    "demo_texts",
    "ensure_demo_model",
    "sft_examples",
    "sft_reply_nll",
    "sft_warmup",
    "train_tokenizer",
]
