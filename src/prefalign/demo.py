"""The tiny demo model: a randomly initialised Llama and a BPE tokenizer trained locally.

The quickstart (`examples/quickstart.yaml`) and the tests need a causal LM that exists offline and
trains in seconds on a CPU, so none is downloaded: `ensure_demo_model` builds one the first time
(deterministically, from a seed and the demo data) and reuses it afterwards.

The tokenizer is byte-level BPE, so it encodes any text and decodes it back unchanged. Its
special tokens follow Qwen2-Instruct: `<|im_start|>`/`<|im_end|>` mark ChatML turns, eos is
`<|im_end|>` (generation stops at the end of the assistant's turn) and pad is `<|endoftext|>`
(never the eos, so masking padding never masks a real end of turn); there is no bos.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prefalign.data.templates import CHATML
from prefalign.errors import PrefalignError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS_TOKEN = IM_END
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

# A cap: BPE stops merging when no pair occurs twice, which the demo corpus reaches at ~1,630
# tokens; the model's vocabulary is the tokenizer's actual size.
DEFAULT_VOCAB_SIZE = 2048
DEFAULT_MAX_POSITIONS = 512

# The demo data lives in the source tree (examples/data), next to the package's src/ folder; an
# installed (non-editable) package finds it from the current directory, where the quickstart runs.
DEMO_DATA_DIR = Path(__file__).resolve().parents[2] / "examples" / "data"
# A tokenizer's vocabulary is language, not preferences: like a pretrained one, the demo tokenizer
# has seen the held-out prompts' words, so they do not fall apart into single letters.
DEMO_FILES = ("demo_train.json", "demo_eval.json")

# Text the tokenizer always sees, often enough that each role name becomes one token.
_MARKUP_TEXTS = ("system\n", "user\n", "assistant\n") * 50


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    chat_template: str = CHATML.jinja,
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
    if data_dir is None:
        data_dir = DEMO_DATA_DIR if DEMO_DATA_DIR.is_dir() else Path.cwd() / "examples" / "data"
    data_dir = Path(data_dir)
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


def ensure_demo_model(path: str | os.PathLike, **build_kwargs) -> str:
    """Return `path`, first building the demo model there if `<path>/config.json` is missing.

    The model is built in a temporary sibling folder and renamed into place, so a reader never
    sees a half-written model; a lock file next to `path` makes concurrent callers (e.g. the
    processes of a distributed run) build it once.
    """
    path = Path(path)
    if (path / "config.json").is_file():
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
            build_tiny_model(staging, **build_kwargs)
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
    "DEMO_DATA_DIR",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "build_tiny_model",
    "demo_texts",
    "ensure_demo_model",
    "train_tokenizer",
]
