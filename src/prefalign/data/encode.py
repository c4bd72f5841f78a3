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
from prefalign.errors import PairError

logger = logging.getLogger(__name__)

_ENCODING_VERSION = "2"  # bump when the encoding rule changes, to invalidate caches


@dataclass
class EncodeStats:
    """Counts of one encoded split; `skipped` pairs failed rendering or tokenization (on_bad_record: skip)."""

    pairs: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    folded_system_turns: int = 0
    appended_replies: int = 0
    skipped: int = 0


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
    """One `PreferencePair` -> {"prompt_ids", "chosen_ids", "rejected_ids", and flags for the counts};
    a `PairError` naming the stage when it cannot be encoded."""
    tokenizer = renderer.tokenizer
    rendered = renderer.split(pair)
    prompt_ids = _tokenize(tokenizer, rendered.prompt)
    responses = []
    for field, text in (("chosen", rendered.chosen), ("rejected", rendered.rejected)):
        full = _tokenize(tokenizer, rendered.prompt + text)
        if full[: len(prompt_ids)] != prompt_ids:
            raise PairError(
                "tokenize", str(pair.source), field,
                f"the tokenized prompt is not a prefix of the tokenized prompt + reply with {renderer.name} (a token "
                "merges across the boundary); use a template that ends the assistant header with a special token "
                "or a newline")
        response = full[len(prompt_ids):]
        if not response:
            raise PairError("tokenize", str(pair.source), field, "the reply encodes to no tokens")
        responses.append(response)
    prompt, chosen, rejected = truncate_pair(prompt_ids, *responses, cutoff_len, tokenizer.bos_token_id)
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "truncated_prompt": len(prompt) < len(prompt_ids),
        "truncated_response": len(chosen) < len(responses[0]) or len(rejected) < len(responses[1]),
        "folded_system": rendered.folded_system,
        "appended": rendered.appended,
    }


def reject_entry(error: PairError, pair: PreferencePair) -> dict:
    """A `rejected_records.jsonl` line for a pair that failed after parsing."""
    source = pair.source
    return {"dataset": source.dataset, "file": source.file, "index": source.index, "line": source.line,
            "stage": error.stage, "field": error.field, "reason": error.reason,
            "record": {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "tools": pair.tools}}


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
        digest.update(json.dumps([pair.prompt, pair.chosen, pair.rejected, pair.tools, pair.template_kwargs],
                                 sort_keys=True).encode())
    return digest.hexdigest()[:16]


_FLAGS = ("truncated_prompt", "truncated_response", "folded_system", "appended")


def encode_pairs(pairs: list[PreferencePair], renderer: ChatRenderer, cutoff_len: int, *,
                 num_proc: int | None = None, batch_size: int = 1000, cache_dir: str | Path | None = None,
                 overwrite_cache: bool = False, on_bad_record: str = "error"):
    """Encode pairs into a `datasets.Dataset` of encoded pairs (contracts.py), cached on disk; returns it
    and its EncodeStats as a dict, with `rejects` (rejected_records.jsonl entries) under on_bad_record: skip.

    The cache key covers the pairs' content, the tokenizer, the template and its arguments and
    `cutoff_len`, so a second run with the same inputs does not re-tokenize.
    """
    import datasets

    key = hashlib.sha256(
        "|".join([_ENCODING_VERSION, _pairs_fingerprint(pairs), tokenizer_fingerprint(renderer.tokenizer),
                  renderer.identity, str(cutoff_len)]).encode()
    ).hexdigest()[:20]
    path = Path(cache_dir or default_cache_dir()) / "encoded" / key
    if path.exists() and not overwrite_cache:
        stats = json.loads((path / "prefalign_stats.json").read_text())
        if stats["rejects"] and on_bad_record == "error":
            first = stats["rejects"][0]
            raise PairError(first["stage"], f"{first['file']} record {first['index']}", first["field"], first["reason"])
        logger.info("Using encoded data from %s", path)
        return datasets.load_from_disk(str(path)), stats

    table = datasets.Dataset.from_list([
        {"prompt": json.dumps(p.prompt), "chosen": p.chosen, "rejected": p.rejected, "tools": p.tools,
         "kwargs": json.dumps(p.template_kwargs), "source": json.dumps(asdict(p.source)), "index": i}
        for i, p in enumerate(pairs)
    ])

    def encode_batch(batch):
        out = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", *_FLAGS, "reject")}
        for prompt, chosen, rejected, tools, kwargs, source in zip(
                batch["prompt"], batch["chosen"], batch["rejected"], batch["tools"], batch["kwargs"], batch["source"]):
            pair = PreferencePair(json.loads(prompt), chosen, rejected, RecordSource(**json.loads(source)), tools,
                                  json.loads(kwargs))
            try:
                encoded, reject = encode_pair(pair, renderer, cutoff_len), ""
            except PairError as error:
                if on_bad_record == "error":
                    raise
                encoded = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], **dict.fromkeys(_FLAGS, False)}
                reject = json.dumps(reject_entry(error, pair), ensure_ascii=False, default=str)
            for k, v in encoded.items():
                out[k].append(v)
            out["reject"].append(reject)
        return out

    encoded = table.map(
        encode_batch, batched=True, batch_size=batch_size, num_proc=num_proc if num_proc and num_proc > 1 and len(pairs) > 256 else None,
        remove_columns=["prompt", "chosen", "rejected", "tools", "kwargs", "source"], desc="Encoding pairs",
    )
    rejects = [json.loads(r) for r in encoded["reject"] if r]
    if rejects:
        encoded = encoded.filter(lambda reject: not reject, input_columns="reject")
    stats = asdict(EncodeStats(
        pairs=len(encoded),
        truncated_prompts=int(sum(encoded["truncated_prompt"])),
        truncated_responses=int(sum(encoded["truncated_response"])),
        folded_system_turns=int(sum(encoded["folded_system"])),
        appended_replies=int(sum(encoded["appended"])),
        skipped=len(rejects),
    ))
    stats["rejects"] = rejects
    encoded = encoded.remove_columns([*_FLAGS, "reject"])
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    encoded.save_to_disk(str(tmp))
    (tmp / "prefalign_stats.json").write_text(json.dumps(stats, ensure_ascii=False))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path)), stats
