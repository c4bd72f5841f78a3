"""Which padding-free layout is fastest on this machine: forward + backward of one batch of
real-shaped pairs (benchmarks/bench_dpo.py's length generator) through a random Llama, per layout.

    python benchmarks/bench_layouts.py                      # 12 x 512 body, 8 pairs, 2 repeats
    python benchmarks/bench_layouts.py --layers 4 --hidden 256 --pairs 4
    python benchmarks/bench_layouts.py --padding --pairs 512   # padding share by batch size, no model

Layouts (all score the same pairs; the log-probs agree, tests/test_packing.py):
  padded           chosen and rejected rows, padded to the longest (PairCollator), sdpa + padding mask
  bucketed         the same rows sorted by length and padded in groups of 2 (what length grouping reaches)
  packed-dense     one packed row, transformers' padding-free path: restarting position_ids, from which
                   it builds a block-diagonal mask for one sdpa call over the whole row
  packed-spans     one packed row, prefalign's packed attention: sdpa once per sequence (PackedCollator)
  packed-spans-prefix  the same with prefix sharing (the prompt once per pair)
Only the decoder runs (the head's cost does not depend on the layout: it runs on reply tokens only).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_dpo import real_shaped_lengths  # noqa: E402


def features(n: int, cutoff: int, seed: int = 0) -> list[dict]:
    """`n` pairs of real-shaped lengths: prompt, chosen, rejected ids (prompt + longer reply <= cutoff)."""
    rng = random.Random(seed)
    out = []
    for i, total in enumerate(real_shaped_lengths(rng, n)):
        c, r = (max(4, round(total * rng.uniform(0.15, 0.4))) for _ in range(2))
        p = max(8, total - (c + r) // 2)
        p = min(p, cutoff - max(c, r)) if p + max(c, r) > cutoff else p
        if p < cutoff // 2:  # prefalign's rule: the prompt keeps at least half, replies are cut
            p, c, r = cutoff // 2, min(c, cutoff - cutoff // 2), min(r, cutoff - cutoff // 2)
        ids = lambda k: [rng.randrange(10, 1000) for _ in range(k)]  # noqa: E731
        out.append({"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r), "index": i})
    return out


def padding_table(feats: list[dict], cutoff: int, batch_sizes=(2, 4, 8)) -> None:
    """The share of computed positions that are padding, per layout and pairs per micro-batch, over
    consecutive micro-batches of `feats` (what the training logs report as throughput/padding_fraction)."""
    from prefalign.data.collate import PairCollator, PrefixSharedCollator
    from prefalign.data.packing import PackedCollator
    from prefalign.modeling.throughput import batch_counts

    collators = {
        "padded (PairCollator)": PairCollator(0),
        "prefix sharing": PrefixSharedCollator(0),
        "packing, one row per micro-batch (packing_length 0, the default)": PackedCollator(0),
        "packing + prefix sharing, one row": PackedCollator(0, prefix_sharing=True),
    }
    for budget in (cutoff, 4 * cutoff):
        collators[f"packing, rows of at most {budget} tokens"] = PackedCollator(0, packing_length=budget)
        collators[f"packing + prefix sharing, rows of at most {budget}"] = PackedCollator(
            0, prefix_sharing=True, packing_length=budget)
    print(f"| layout ({len(feats)} pairs) | " + " | ".join(f"{b} pairs" for b in batch_sizes) + " |")
    print("|---|" + "---:|" * len(batch_sizes))
    for name, collate in collators.items():
        cells = []
        for size in batch_sizes:
            tokens = positions = 0.0
            for start in range(0, len(feats) - size + 1, size):
                counts = batch_counts(collate(feats[start:start + size]))
                tokens, positions = tokens + counts["tokens"], positions + counts["positions"]
            cells.append(f"{100 * (1 - tokens / positions):.1f} %")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def time_once(decoder, parts: list[dict]) -> float:
    decoder.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for inputs in parts:
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
        hidden.float().square().mean().backward()
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--padding", action="store_true", help="only the padding share by batch size (no model)")
    args = p.parse_args(argv)
    if args.padding:
        return padding_table(features(args.pairs, args.cutoff_len), args.cutoff_len)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefalign.data.collate import PairCollator
    from prefalign.data.packing import PackedCollator
    from prefalign.modeling.packed_attention import packed_model_inputs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden),
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=4 * args.cutoff_len)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    decoder = model.get_decoder()
    feats = features(args.pairs, args.cutoff_len)

    padded = PairCollator(0)(feats)
    rows = sorted(range(padded["input_ids"].shape[0]), key=lambda i: int(padded["attention_mask"][i].sum()))
    packed = PackedCollator(0)(feats)
    layouts = {
        "padded": [{"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}],
        "bucketed": [],
        "packed-dense": [{"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}],
    }
    for group in (rows[i:i + 2] for i in range(0, len(rows), 2)):
        width = int(padded["attention_mask"][group].sum(1).max())
        layouts["bucketed"].append({"input_ids": padded["input_ids"][group, :width],
                                    "attention_mask": padded["attention_mask"][group, :width]})
    spans = {}
    for name, prefix in (("packed-spans", False), ("packed-spans-prefix", True)):
        batch = PackedCollator(0, prefix_sharing=prefix)(feats)
        mask, extra = packed_model_inputs(model, batch)  # switches the model to the packed attention
        spans[name] = [{"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                        "attention_mask": mask, **extra}]
    tokens = int(padded["attention_mask"].sum())
    print(f"{args.pairs} pairs, {tokens} tokens (chosen + rejected rows), padded rows {tuple(padded['input_ids'].shape)}, "
          f"{args.layers} layers x {args.hidden}, {torch.get_num_threads()} threads")
    # Round-robin, best of `repeats` after a warm-up: on a shared machine the minimum is the least
    # contended measurement, and interleaving gives every layout the same share of quiet moments.
    # (packed-dense runs transformers' own sdpa: the packed attention falls back to it without spans.)
    everything = {**layouts, **spans}
    results = dict.fromkeys(everything, float("inf"))
    for repeat in range(args.repeats + 1):
        for name, parts in everything.items():
            seconds = time_once(decoder, parts)
            if repeat:
                results[name] = min(results[name], seconds)
    for name, parts in everything.items():
        computed = sum(inputs["input_ids"].numel() for inputs in parts)
        print(f"  {name:<20} {results[name]:7.2f} s  ({computed} positions computed)", flush=True)
    base = results["padded"]
    print("  speed-up over padded: " + ", ".join(f"{k} {base / v:.2f}x" for k, v in results.items()))


if __name__ == "__main__":
    main()
