"""Tokenize rendered pairs, truncate them to `cutoff_len`, and cache the encoded dataset.

Truncation is per pair (chosen and rejected keep the same prompt tokens), with P = prompt tokens,
R = the longer response's tokens, C = cutoff_len; P + R <= C cuts nothing. The rule follows the
template's rule set (`truncation_rule`, the one place that picks it):

- `template: NAME` (LLaMA-Factory's slots): LLaMA-Factory's own (`infer_seqlen` in its
  processor_utils.py, as its pairwise processor applies it), so the pair is LF's tokens cut where LF
  cuts them: the responses keep R' = R if 2R < C, else C - P if 2P < C, else int(C * R / (P + R))
  (never more than R); the prompt keeps its first min(P, C - R') tokens (its START: a cut prompt loses
  its end, the assistant header included, as in LLaMA-Factory); each response its first R'.
- the tokenizer's own template (`template` unset): prefalign's, which keeps the boundary: the
  prompt keeps max(C - R, min(P, C // 2)) tokens, cutting its head (the tail, with the assistant
  header, stays; a leading BOS token stays too); each response keeps at most C - (kept prompt)
  tokens, cutting its tail. So responses are kept whole whenever they fit next to half the budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from prefalign.contracts import PreferencePair, RecordSource
from prefalign.data.chat import ChatRenderer
from prefalign.errors import PairError
from prefalign.integrity import damaged_files, folder_checksums, replace_folder, write_json_atomic

logger = logging.getLogger(__name__)

_ENCODING_VERSION = "6"  # bump when the encoding rule changes, to invalidate caches
MANIFEST = "prefalign_manifest.json"  # written last: the counts and a SHA-256 of every file of the cache entry


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


def truncation_rule(renderer: ChatRenderer) -> str:
    """`llamafactory` for a built-in (LLaMA-Factory) template, `keep_boundary` for the tokenizer's own."""
    return "llamafactory" if renderer.lf_encoder is not None else "keep_boundary"


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], cutoff_len: int,
                  bos_token_id: int | None = None, rule: str = "keep_boundary"
                  ) -> tuple[list[int], list[int], list[int]]:
    """Apply the module's truncation `rule`; returns new (prompt, chosen, rejected) id lists."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= cutoff_len:
        return prompt, chosen, rejected
    if rule == "llamafactory":
        if 2 * longest < cutoff_len:
            keep_response = longest
        elif 2 * len(prompt) < cutoff_len:
            keep_response = min(longest, cutoff_len - len(prompt))
        else:
            keep_response = min(longest, int(cutoff_len * (longest / (len(prompt) + longest))))
        keep_prompt = min(len(prompt), max(cutoff_len - keep_response, 0))
        return prompt[:keep_prompt], chosen[:keep_response], rejected[:keep_response]
    keep_prompt = min(len(prompt), max(cutoff_len - longest, min(len(prompt), cutoff_len // 2)))
    if keep_prompt < len(prompt):
        keeps_bos = bos_token_id is not None and prompt and prompt[0] == bos_token_id and keep_prompt > 1
        prompt = [prompt[0]] + prompt[len(prompt) - keep_prompt + 1:] if keeps_bos else prompt[len(prompt) - keep_prompt:]
    budget = cutoff_len - len(prompt)
    return prompt, chosen[:budget], rejected[:budget]


_DROPPED = ("{what} encodes to no tokens but whitespace and special tokens: the tokenizer drops this text (is it "
            "the tokenizer the model was trained with, loaded as its own class? a word-level vocabulary read by a "
            "BPE class loses every word)")


def _blank(tokenizer, ids: list[int]) -> bool:
    return not tokenizer.decode(ids, skip_special_tokens=True).strip()


def encode_pair(pair: PreferencePair, renderer: ChatRenderer, cutoff_len: int) -> dict:
    """One `PreferencePair` -> {"prompt_ids", "chosen_ids", "rejected_ids", and flags for the counts};
    a `PairError` naming the stage when it cannot be encoded."""
    tokenizer = renderer.tokenizer
    refusal = renderer.media_refusal(pair)  # e.g. images under a tokenizer's own template, before it renders
    if refusal is not None:
        raise refusal
    if renderer.lf_encoder is not None:  # a LLaMA-Factory template: its ids, slot by slot
        prompt_ids, *responses = renderer.encode_lf(pair)
        folded = appended = False
    else:
        prompt_ids, responses, folded, appended = _encode_rendered(pair, renderer)
    if _blank(tokenizer, prompt_ids):  # the formats refuse an empty prompt, so the tokenizer dropped its text
        raise PairError("tokenize", str(pair.source), "prompt", _DROPPED.format(what="the prompt"))
    for field, response in zip(("chosen", "rejected"), responses):
        if _blank(tokenizer, response):  # the formats refuse an empty reply, so its text was dropped
            raise PairError("tokenize", str(pair.source), field, _DROPPED.format(what="the reply"))
    prompt, chosen, rejected = truncate_pair(prompt_ids, *responses, cutoff_len, tokenizer.bos_token_id,
                                             truncation_rule(renderer))
    if not chosen:  # LLaMA-Factory's rule, a prompt far longer than cutoff_len: LF would train no reply token
        raise PairError("tokenize", str(pair.source), "prompt",
                        f"the prompt's {len(prompt_ids)} tokens leave no reply token within cutoff_len {cutoff_len} "
                        f"under LLaMA-Factory's truncation (it keeps the prompt's start); raise cutoff_len or "
                        "shorten the prompt")
    if (pair.images or pair.videos) and len(prompt) < len(prompt_ids):
        _check_images_kept(pair, renderer, prompt, prompt_ids, cutoff_len)
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "truncated_prompt": len(prompt) < len(prompt_ids),
        "truncated_response": len(chosen) < len(responses[0]) or len(rejected) < len(responses[1]),
        "folded_system": folded,
        "appended": appended,
    }


def _check_images_kept(pair: PreferencePair, renderer: ChatRenderer, kept: list[int], prompt_ids: list[int],
                       cutoff_len: int) -> None:
    """Truncation never cuts into an image: a pair whose image tokens do not all survive the prompt's cut is
    refused (a counted skip under on_bad_record: skip)."""
    markers = renderer.vision.marker_ids(renderer.tokenizer)
    image_tokens = sum(token in markers for token in prompt_ids)
    if sum(token in markers for token in kept) < image_tokens:
        media = " and ".join(f"{n} {what}(s)" for n, what in ((len(pair.images), "image"), (len(pair.videos), "video"))
                             if n)
        raise PairError("tokenize", str(pair.source), "videos" if pair.videos and not pair.images else "images",
                        f"the prompt's {media} take {image_tokens} tokens and do not fit within "
                        f"cutoff_len {cutoff_len} beside the reply (truncation never cuts an image); raise cutoff_len "
                        f"or lower {'image_max_pixels' if pair.images else 'video_max_pixels or video_maxlen'}")


def _encode_rendered(pair: PreferencePair, renderer: ChatRenderer) -> tuple[list[int], list[list[int]], bool, bool]:
    """The tokenizer's own template: render as text, tokenize, and split where the prompt's tokens end."""
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
        responses.append(full[len(prompt_ids):])
    return prompt_ids, responses, rendered.folded_system, rendered.appended


def reject_entry(error: PairError, pair: PreferencePair) -> dict:
    """A `rejected_records.jsonl` line for a pair that failed after parsing."""
    source = pair.source
    return {"dataset": source.dataset, "file": source.file, "index": source.index, "line": source.line,
            "stage": error.stage, "field": error.field, "reason": error.reason,
            "record": {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "tools": pair.tools,
                       **{f"{f}_calls": getattr(pair, f"{f}_calls") for f in ("chosen", "rejected")
                          if getattr(pair, f"{f}_calls")}}}


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
        fields = [pair.prompt, pair.chosen, pair.rejected, pair.tools, pair.template_kwargs]
        if pair.desirable is not None:  # a KTO example (a pair's fingerprint is unchanged)
            fields.append(pair.desirable)
        if pair.images or pair.videos:  # the media by content (a text pair's fingerprint is unchanged)
            fields.append([hashlib.sha256(item).hexdigest() for item in (*pair.images, b"|", *pair.videos)])
        if pair.chosen_calls or pair.rejected_calls:  # a reply that calls tools
            fields += [pair.chosen_calls, pair.rejected_calls]
        digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()[:16]


_FLAGS = ("truncated_prompt", "truncated_response", "folded_system", "appended")


def encode_pairs(pairs: list[PreferencePair], renderer: ChatRenderer, cutoff_len: int, *,
                 num_proc: int | None = None, batch_size: int = 1000, cache_dir: str | Path | None = None,
                 overwrite_cache: bool = False, on_bad_record: str = "error"):
    """Encode pairs into a `datasets.Dataset` of encoded pairs (contracts.py), cached on disk; returns it
    and its EncodeStats as a dict, with `rejects` (rejected_records.jsonl entries) under on_bad_record: skip.

    The cache key covers the pairs' content, the tokenizer, the template and its arguments and
    `cutoff_len`, so a second run with the same inputs does not re-tokenize. Every file of an entry
    is checked against the SHA-256 recorded when it was written: a damaged entry is reported and
    rebuilt, and `overwrite_cache` rebuilds and replaces it.
    """
    import datasets

    key = hashlib.sha256(
        "|".join([_ENCODING_VERSION, _pairs_fingerprint(pairs), tokenizer_fingerprint(renderer.tokenizer),
                  renderer.identity, str(cutoff_len)]).encode()
    ).hexdigest()[:20]
    path = Path(cache_dir or default_cache_dir()) / "encoded" / key
    if path.exists() and not overwrite_cache:
        cached = _read_cache(path)
        if cached is not None:
            rejects = cached[1]["rejects"]
            if rejects and on_bad_record == "error":
                first = rejects[0]
                raise PairError(first["stage"], f"{first['file']} record {first['index']}", first["field"], first["reason"])
            return cached

    unpaired = bool(pairs) and pairs[0].desirable is not None  # KTO examples carry their label through
    media = any(p.images or p.videos for p in pairs)  # the encoded pairs keep their image bytes (the collator's)
    table = datasets.Dataset.from_list([
        {"prompt": json.dumps(p.prompt), "chosen": p.chosen, "rejected": p.rejected, "tools": p.tools,
         "kwargs": json.dumps(p.template_kwargs), "source": json.dumps(asdict(p.source)), "index": i,
          "calls": json.dumps([p.chosen_calls, p.rejected_calls]),
         **({"desirable": bool(p.desirable)} if unpaired else {}),
         **({"images": list(p.images), "videos": list(p.videos)} if media else {})}
        for i, p in enumerate(pairs)
    ], **({"features": _media_features(unpaired)} if media else {}))

    def encode_batch(batch):
        out = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", *_FLAGS, "reject")}
        no_media = [()] * len(batch["prompt"])
        for prompt, chosen, rejected, tools, kwargs, source, calls, images, videos in zip(
                batch["prompt"], batch["chosen"], batch["rejected"], batch["tools"], batch["kwargs"], batch["source"],
                batch["calls"], batch.get("images", no_media), batch.get("videos", no_media)):
            chosen_calls, rejected_calls = json.loads(calls)
            pair = PreferencePair(json.loads(prompt), chosen, rejected, RecordSource(**json.loads(source)), tools,
                                  json.loads(kwargs), chosen_calls=chosen_calls, rejected_calls=rejected_calls,
                                  images=tuple(images), videos=tuple(videos))
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
        remove_columns=["prompt", "chosen", "rejected", "tools", "kwargs", "source", "calls"], desc="Encoding pairs",
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
    _write_cache(encoded, stats, path)
    cached = _read_cache(path)  # memory-mapped from disk, as a cached entry is
    return cached if cached is not None else (encoded, stats)


def _media_features(unpaired: bool):
    """The table's columns when pairs carry media: the bytes of each image and video as binary values."""
    import datasets

    features = {"prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
                "rejected": datasets.Value("string"), "tools": datasets.Value("string"),
                "kwargs": datasets.Value("string"), "source": datasets.Value("string"),
                "index": datasets.Value("int64"), "calls": datasets.Value("string")}
    if unpaired:
        features["desirable"] = datasets.Value("bool")
    features["images"] = datasets.Sequence(datasets.Value("binary"))
    features["videos"] = datasets.Sequence(datasets.Value("binary"))
    return datasets.Features(features)


def _write_cache(encoded, stats: dict, path: Path) -> None:
    """Save under a private name, checksum every file, then swap the folder into place (see integrity.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    encoded.save_to_disk(str(staging))
    write_json_atomic(staging / MANIFEST, {"stats": stats, "files": folder_checksums(staging)})
    replace_folder(staging, path)


def _read_cache(path: Path, *, attempts: int = 3):
    """(dataset, stats) from a verified cache entry, or None (with one line saying why) to rebuild it.

    A file vanishing while it is read means another process is swapping the entry (integrity.replace_folder):
    the read is tried again.
    """
    import datasets

    for attempt in range(attempts):
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            damaged = damaged_files(path, manifest["files"])
            if damaged and not (path / MANIFEST).is_file():  # the entry was moved aside meanwhile
                raise FileNotFoundError(2, "moved aside while read", str(path))
            if not damaged:
                logger.info("Using encoded data from %s", path)
                return datasets.load_from_disk(str(path)), manifest["stats"]
            reason = f"{damaged[0]} does not match its checksum"
        except FileNotFoundError as exc:
            if attempt + 1 < attempts:
                time.sleep(0.2)
                continue
            reason = f"incomplete ({exc.filename or exc} is missing)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no manifest'})"
        break
    logger.warning("Encoded-data cache %s is damaged or incomplete (%s); re-encoding it", path, reason)
    return None
