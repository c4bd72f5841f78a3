"""Tokenize rendered pairs, truncate them to `cutoff_len`, and cache the encoded dataset.

Truncation rule (per pair, so chosen and rejected keep the same prompt tokens), with
P = prompt tokens, R = the longer response's tokens, C = cutoff_len:
  1. P + R <= C: nothing is cut.
  2. Otherwise the prompt keeps max(C - R, min(P, C // 2)) tokens, cutting its head (the tail,
     with the assistant header that marks the boundary, stays; a leading BOS token stays too);
  3. each response keeps at most C - (kept prompt) tokens, cutting its tail.
So responses are kept whole whenever they fit next to half the budget of prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from prefalign.contracts import PreferencePair, RecordSource
from prefalign.data.chat import ChatRenderer
from prefalign.errors import DataError

logger = logging.getLogger(__name__)

_ENCODING_VERSION = "1"  # bump when the encoding rule changes, to invalidate caches


@dataclass
class EncodeStats:
    pairs: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFALIGN_CACHE", Path.home() / ".cache" / "prefalign"))


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], cutoff_len: int,
                  bos_token_id: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """Apply the module's truncation rule; returns new (prompt, chosen, rejected) id lists."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= cutoff_len:
        return prompt, chosen, rejected
    keep_prompt = min(len(prompt), max(cutoff_len - longest, min(len(prompt), cutoff_len // 2)))
    if keep_prompt < len(prompt):
        keeps_bos = bos_token_id is not None and prompt and prompt[0] == bos_token_id and keep_prompt > 1
        prompt = [prompt[0]] + prompt[len(prompt) - keep_prompt + 1:] if keeps_bos else prompt[len(prompt) - keep_prompt:]
    budget = cutoff_len - len(prompt)
    return prompt, chosen[:budget], rejected[:budget]


def encode_pair(pair: PreferencePair, renderer: ChatRenderer, cutoff_len: int) -> dict:
    """One `PreferencePair` -> {"prompt_ids", "chosen_ids", "rejected_ids", "truncated"}."""
    tokenizer = renderer.tokenizer
    prompt_text, chosen_text, rejected_text = renderer.split(pair)
    prompt_ids = _tokenize(tokenizer, prompt_text)
    responses = []
    for field, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        full = _tokenize(tokenizer, prompt_text + text)
        if full[: len(prompt_ids)] != prompt_ids:
            raise DataError(
                f"{pair.source}, field {field}: the tokenized prompt is not a prefix of the tokenized "
                f"prompt + reply with {renderer.name} (a token merges across the boundary); "
                "use a template that ends the assistant header with a special token or a newline"
            )
        response = full[len(prompt_ids):]
        if not response:
            raise DataError(f"{pair.source}, field {field}: the reply encodes to no tokens")
        responses.append(response)
    prompt, chosen, rejected = truncate_pair(prompt_ids, *responses, cutoff_len, tokenizer.bos_token_id)
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "truncated_prompt": len(prompt) < len(prompt_ids),
        "truncated_response": len(chosen) < len(responses[0]) or len(rejected) < len(responses[1]),
    }


def _tokenize(tokenizer, text: str) -> list[int]:
    # The template writes every special token itself (BOS included), as apply_chat_template does.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes its token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        backend.to_str() if backend is not None else repr(tokenizer.get_vocab()),
        str(getattr(tokenizer, "chat_template", "")),
        repr(sorted(tokenizer.special_tokens_map.items())),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _pairs_fingerprint(pairs: list[PreferencePair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.prompt, pair.chosen, pair.rejected, pair.tools]).encode())
    return digest.hexdigest()[:16]


def encode_pairs(pairs: list[PreferencePair], renderer: ChatRenderer, cutoff_len: int, *,
                 num_proc: int | None = None, batch_size: int = 1000, cache_dir: str | Path | None = None,
                 overwrite_cache: bool = False):
    """Encode pairs into a `datasets.Dataset` of encoded pairs (contracts.py), cached on disk.

    The cache key covers the pairs' content, the tokenizer, the template and `cutoff_len`, so a
    second run with the same inputs does not re-tokenize.
    """
    import datasets

    key = hashlib.sha256(
        "|".join([_ENCODING_VERSION, _pairs_fingerprint(pairs), tokenizer_fingerprint(renderer.tokenizer),
                  str(renderer.template), str(cutoff_len)]).encode()
    ).hexdigest()[:20]
    path = Path(cache_dir or default_cache_dir()) / "encoded" / key
    if path.exists() and not overwrite_cache:
        logger.info("Using encoded data from %s", path)
        encoded = datasets.load_from_disk(str(path))
        return encoded, json.loads((path / "prefalign_stats.json").read_text())

    table = datasets.Dataset.from_list([
        {"prompt": json.dumps(p.prompt), "chosen": p.chosen, "rejected": p.rejected, "tools": p.tools,
         "source": json.dumps(asdict(p.source)), "index": i}
        for i, p in enumerate(pairs)
    ])

    def encode_batch(batch):
        out = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "truncated_prompt", "truncated_response")}
        for prompt, chosen, rejected, tools, source in zip(batch["prompt"], batch["chosen"], batch["rejected"],
                                                           batch["tools"], batch["source"]):
            pair = PreferencePair(json.loads(prompt), chosen, rejected, RecordSource(**json.loads(source)), tools)
            for k, v in encode_pair(pair, renderer, cutoff_len).items():
                out[k].append(v)
        return out

    encoded = table.map(
        encode_batch, batched=True, batch_size=batch_size, num_proc=num_proc if num_proc and num_proc > 1 and len(pairs) > 256 else None,
        remove_columns=["prompt", "chosen", "rejected", "tools", "source"], desc="Encoding pairs",
    )
    stats = asdict(EncodeStats(
        pairs=len(encoded),
        truncated_prompts=int(sum(encoded["truncated_prompt"])),
        truncated_responses=int(sum(encoded["truncated_response"])),
    ))
    encoded = encoded.remove_columns(["truncated_prompt", "truncated_response"])
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    encoded.save_to_disk(str(tmp))
    (tmp / "prefalign_stats.json").write_text(json.dumps(stats))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path)), stats
