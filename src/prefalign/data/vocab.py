"""The one place that decides how a run changes the vocabulary, as LLaMA-Factory 0.9.5 does.

The tokenizer (`extend_tokenizer`, asked by every command right after loading it) gets, in LF's order:
`add_tokens` (ordinary), `add_special_tokens` or the keys of `new_special_tokens_config` (special;
model/patcher.py patch_tokenizer), then the built-in template's fix (data/template.py
fix_special_tokens: `replace_eos` makes the first stop word the EOS, a missing EOS becomes
`<|endoftext|>`, a missing pad the EOS, the other stop words special tokens). The answer is a
`VocabChange`, which every model loader (policy, separate reference, eval, chat, export) gives to
`resize_embeddings`, so all of them see the same embeddings:

- LF resizes only with `resize_vocab` (which `add_tokens` / `add_special_tokens` turn on when they
  add a token; a template's added token does not), and only when the tokenizer outgrew the
  embeddings; rows are then padded to a multiple of 64 (model_utils/embedding.py). A token beyond
  the embeddings without `resize_vocab` is a one-line error naming the key (LF would crash);
- every new row (the padding rows too) is initialised as `init_special_tokens` says: `noise_init`
  (mean of the old rows + N(0, 1/sqrt(d)) noise), `desc_init` (mean of the embeddings of the
  token's description; the mean of all old rows if it has no old token), `desc_init_w_noise`
  (that + the same noise; rows without a description: noise_init); the input rows first, then an
  untied output layer's. LF draws the noise
  from torch's global generator; prefalign from its own, seeded with the run's `seed`, so the
  policy and a separately loaded reference (and a rerun) get the same rows;
- LoRA / OFT: with `resize_vocab`, the embedding and head modules are trained and saved in full
  (`modules_to_save`) unless `additional_target` is set (model/adapter.py);
- under DeepSpeed ZeRO-3 the resize is the same: transformers' resize_token_embeddings gathers the
  partitioned rows itself, and every process writes the same seeded new rows.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import torch

from prefalign.distributed import full_shape
from prefalign.errors import ConfigError

PAD_TO_MULTIPLE_OF = 64  # LF's resize_token_embeddings(..., pad_to_multiple_of=64)


@dataclass(frozen=True)
class VocabChange:
    """What a run does to the vocabulary. `size`: the extended tokenizer's length; `added`: the tokens it
    added, in order; `descriptions`: (for desc_init) each new special token's description as token ids."""

    size: int
    added: tuple[str, ...] = ()
    resize: bool = False
    init: str = "noise_init"
    descriptions: tuple[tuple[int, ...], ...] | None = None
    seed: int = 42

    @property
    def identity(self) -> str:
        """What changes the embeddings (for the reference cache's key)."""
        return json.dumps([self.size, list(self.added), self.resize, self.init, self.descriptions, self.seed])


def special_token_descriptions(path: str) -> dict[str, str]:
    """`new_special_tokens_config`: a YAML mapping of token -> description, as LF reads it."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            table = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"new_special_tokens_config: cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"new_special_tokens_config: {path} must be a YAML mapping of token: description")
    return {str(token): str(text) for token, text in table.items()}


def extend_tokenizer(tokenizer, model_args, data_args=None, *, seed: int = 42) -> VocabChange:
    """Add, in place, the tokens LF adds to `tokenizer` (see the module docstring); what changed."""
    before = set(tokenizer.get_vocab())
    resize = bool(getattr(model_args, "resize_vocab", False))
    if model_args.add_tokens:
        resize |= tokenizer.add_tokens(list(model_args.add_tokens), special_tokens=False) > 0
    descriptions = None
    special = model_args.add_special_tokens
    if model_args.new_special_tokens_config:  # takes precedence over add_special_tokens, as in LF
        descriptions = special_token_descriptions(model_args.new_special_tokens_config)
        special = list(descriptions)
    if special:
        resize |= tokenizer.add_tokens(list(special), special_tokens=True) > 0
    template = _builtin_template(data_args)
    if template is not None:
        fix_special_tokens(tokenizer, template)
    elif tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = tokenizer.get_vocab()
    added = tuple(sorted((t for t in vocab if t not in before), key=vocab.get))
    init = model_args.init_special_tokens
    ids = None
    if descriptions and init != "noise_init":
        ids = tuple(tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in descriptions.values())
    else:
        init = "noise_init"  # LF: the desc_init methods without descriptions fall back to noise_init
    return VocabChange(len(tokenizer), added, resize, init, ids, seed)


def _builtin_template(data_args):
    from prefalign.data.templates import resolve_template

    name = getattr(data_args, "template", None)
    builtin = resolve_template(name).builtin if name else None
    return builtin.lf if builtin is not None else None


def fix_special_tokens(tokenizer, template) -> None:
    """LF's Template.fix_special_tokens, in place on `tokenizer` (an LFTemplate's stop words and replace_eos)."""
    words = list(template.stop_words)
    if template.replace_eos and words:
        _set_eos(tokenizer, words.pop(0))
    if tokenizer.eos_token_id is None:
        _set_eos(tokenizer, "<|endoftext|>")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if words:
        try:
            tokenizer.add_special_tokens({"additional_special_tokens": words}, replace_additional_special_tokens=False)
        except TypeError:  # transformers 5 has no such argument (LF falls back the same way)
            tokenizer.add_special_tokens({"additional_special_tokens": words})


def _set_eos(tokenizer, token: str) -> None:
    if tokenizer.eos_token != token:
        tokenizer.add_special_tokens({"eos_token": token})


def fixed_copy(tokenizer, template):
    """`tokenizer` after LF's template fix: itself where the fix changes nothing, else a fixed copy."""
    words = list(template.stop_words)
    if template.replace_eos and words and tokenizer.eos_token != words.pop(0):
        changes = True
    else:
        added = set(getattr(tokenizer, "added_tokens_encoder", {}))
        changes = tokenizer.eos_token_id is None or tokenizer.pad_token_id is None or any(w not in added for w in words)
    if not changes:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    fix_special_tokens(tokenizer, template)
    return tokenizer


# -- the model side -------------------------------------------------------------------------------------


def embedding_module_names(model) -> list[str]:
    """The names (last part) of the input and output embedding modules: LF's modules_to_save after a resize."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if any(module is m for m in wanted)})


def resize_embeddings(model, change: VocabChange | None) -> int:
    """Resize `model`'s embeddings for `change` as LF does (see the module docstring); the new row count (0: none).

    Input embedding weight (V, d) becomes (V', d) with V' = len(tokenizer) rounded up to 64; so does an
    untied output layer's."""
    if change is None:
        return 0
    weight = model.get_input_embeddings().weight
    current = full_shape(weight)[0]
    if change.size <= current:
        return 0
    if not change.resize:
        raise ConfigError(
            f"the tokenizer now has {change.size} tokens ({', '.join(change.added) or 'added ones'} added), more than "
            f"the model's {current} embedding rows; set resize_vocab: true to resize the embeddings (LLaMA-Factory "
            "needs it too), or use the tokenizer the model was trained with")
    if getattr(model, "quantization_method", None) or getattr(model, "is_quantized", False):
        raise ConfigError("resize_vocab: the embedding layers of a quantized model cannot be resized; "
                          "remove quantization_bit or the added tokens")
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        raise ConfigError("resize_vocab: this model's output layer is not a Linear layer, so it cannot be resized")
    # Under ZeRO-3, transformers gathers the partitioned old rows and puts whole, unpartitioned weights in their
    # place, the same in every process (DeepSpeed partitions them when the Trainer builds its engine): the new
    # rows are written below as in one process. The layers transformers builds draw their (overwritten) initial
    # rows from torch's global generator, and more of them under ZeRO-3 (an untied-looking head is rebuilt too):
    # drawn from a fork, so what draws next (a LoRA adapter's initial A) is what it is without the resize.
    with torch.random.fork_rng(devices=[]):
        model.resize_token_embeddings(change.size, pad_to_multiple_of=PAD_TO_MULTIPLE_OF, mean_resizing=False)
    embed_input = model.get_input_embeddings()
    new = full_shape(embed_input.weight)[0] - current
    generator = torch.Generator().manual_seed(change.seed)
    tied = getattr(model.config, "tie_word_embeddings", False) or \
        model.get_output_embeddings().weight is embed_input.weight
    with torch.no_grad():
        descriptions = _description_means(embed_input.weight, change, new)
        init_new_rows(embed_input.weight.data, new, change.init, descriptions, generator)
        if not tied:
            init_new_rows(model.get_output_embeddings().weight.data, new, change.init, descriptions, generator)
    model.config.vocab_size = current + new
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().vocab_size = current + new
    return new


def _description_means(weight: torch.Tensor, change: VocabChange, new: int) -> list[torch.Tensor | None] | None:
    """Per description, the mean input embedding of its old tokens (None: it has none); LF counts as old the
    ids below len(tokenizer) - new rows."""
    if change.descriptions is None:
        return None
    limit = change.size - new
    out = []
    for ids in change.descriptions:
        valid = [i for i in ids if i < limit]
        out.append(weight[torch.tensor(valid)].mean(dim=0) if valid else None)
    return out


def init_new_rows(weight: torch.Tensor, new: int, init: str, descriptions, generator: torch.Generator) -> None:
    """Initialise the last `new` rows of `weight` (V, d) in place, as LF's _initialize_embeddings."""
    dim = weight.shape[1]
    std = 1.0 / math.sqrt(dim)
    old_mean = weight[:-new].mean(dim=0, keepdim=True)
    noise = torch.empty(new, dim, dtype=torch.float32).normal_(0.0, std, generator=generator)
    weight[-new:] = (old_mean.float() + noise).to(weight.dtype)
    if init == "noise_init" or descriptions is None:
        return
    # LF writes only the first len(descriptions) new rows and leaves the others as transformers initialised
    # them (from the global generator); here they keep the seeded noise_init, so every load agrees.
    for i, mean in enumerate(descriptions):
        base = old_mean[0] if mean is None else mean
        if init == "desc_init_w_noise":
            base = base.float() + torch.empty(dim, dtype=torch.float32).normal_(0.0, std, generator=generator)
        weight[-new + i] = base.to(weight.dtype)
