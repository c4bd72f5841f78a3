"""Reference log-probs computed once, before training, and cached on disk (`precompute_ref_log_probs`).

One no-grad pass of the reference over the train (and eval) pairs replaces a reference forward
at every training step; afterwards the reference model is freed (frozen copy, separate model) or
was never copied (full / freeze tuning read the initial policy, see reference.py). Training looks
each batch's values up by the pairs' `index` column, so shuffling, length grouping and batch
size do not matter.

Cache: `<cache>/reference/<key>/part-*.safetensors`, `<cache>` being `$PREFALIGN_CACHE` or
`~/.cache/prefalign` (as for encoded data). The key is a SHA-256 over
  - the reference's identity: its strategy (reference.py), `model_name_or_path`,
    `adapter_name_or_path`, `ref_model`, `ref_model_adapters`, the model config, the compute
    dtype, and a fingerprint of the reference's weights (`weights_fingerprint`: per tensor its
    name, shape, dtype, float64 sum and 4,096 evenly strided values; it reads the weights in
    memory, so it also holds for hub models and merged adapters, and any fine-tuning changes it);
  - the data: a hash of the encoded split's content (`prompt_ids`, `chosen_ids`,
    `rejected_ids`, `index`), plus `template` and `cutoff_len`;
  - whether per-token values are stored (LD-DPO needs them), and `CACHE_VERSION`.
A second run, or a resumed one, with the same key reads the cache and runs no reference forward.
Delete the folder to force a recomputation.

Several processes: each computes the pairs still missing whose rank among them is its
`process_index` modulo `num_processes`, writes them to its own part file (written under a
temporary name, then renamed, so a reader never sees half a file), waits for the others
(`torch.distributed` barrier, or polling the folder when no process group exists), then every
process reads all parts, merged by `index`. A crashed run keeps the parts it finished.

Integrity: each part records a SHA-256 of its tensors in its safetensors metadata. A part that
cannot be read or does not match (truncated, bit-flipped, zeroed) is reported in one line and
deleted, and its pairs are computed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

import torch

from prefalign.contracts import PairLogps, batch_to
from prefalign.data.collate import PrefixSharedCollator, pair_length
from prefalign.distributed import barrier
from prefalign.errors import PrefalignError
from prefalign.integrity import tensors_sha256
from prefalign.reference import Reference

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when what is stored, or how it is computed, changes
SAMPLES_PER_TENSOR = 4096
_SUMMED = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")
_PER_TOKEN = ("chosen_token_logps", "rejected_token_logps")


# -- the key -------------------------------------------------------------------------------------
def weights_fingerprint(named_tensors) -> str:
    """A hash of tensors' names, shapes, dtypes, float64 sums and 4,096 strided values each."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        tensor = tensor.detach()
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].float().cpu().numpy().tobytes()
        total = float(tensor.sum(dtype=torch.float64)) if flat.numel() else 0.0
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total!r}|".encode())
        digest.update(sample)
    return digest.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """A hash of an encoded split's content: every pair's token ids and index, in order, and the bytes of
    every image and video of pairs that have them."""
    import numpy as np
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    digest = hashlib.sha256(str(table.num_rows).encode())
    for name in ("index", "prompt_ids", "chosen_ids", "rejected_ids"):
        column = table.column(name)
        if name == "index":
            parts = [column.to_numpy()]
        else:
            parts = [pc.list_value_length(column).to_numpy(), pc.list_flatten(column).to_numpy()]
        for part in parts:
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    if "images" in table.column_names:  # the same ids with other images (videos) are other log-probs
        for images in table.column("images").to_pylist():
            digest.update(b"images")
            for data in images or ():
                digest.update(hashlib.sha256(data).digest())
    if "videos" in table.column_names:  # by row, for the rows that have any (image-only keys stay as they were)
        for row, videos in enumerate(table.column("videos").to_pylist()):
            for data in videos or ():
                digest.update(f"videos {row}".encode() + hashlib.sha256(data).digest())
    return digest.hexdigest()


def reference_identity(sources: dict, reference: Reference, dtype: torch.dtype) -> dict:
    """What makes the reference's log-probs what they are (the first half of the cache key).

    `sources`: the config values naming the models and adapters (model_name_or_path,
    adapter_name_or_path, ref_model, ref_model_adapters) and the vocabulary change (data/vocab.py).
    """
    model = reference.model
    lm_config = getattr(model, "config", None)
    config_dict = lm_config.to_dict() if lm_config is not None else {}
    config_json = json.dumps({k: v for k, v in config_dict.items() if not k.startswith("_")},
                             sort_keys=True, default=str)
    return {
        "strategy": reference.name,
        **{key: sources.get(key) for key in ("model_name_or_path", "adapter_name_or_path", "ref_model",
                                             "ref_model_adapters", "vocabulary")},
        "model_config": hashlib.sha256(config_json.encode()).hexdigest(),
        "dtype": str(dtype),
        "weights": weights_fingerprint(reference.named_weights()),
    }


def cache_key(identity: dict, data_fingerprint: str, *, template, cutoff_len: int, token_level: bool) -> str:
    payload = {"version": CACHE_VERSION, "reference": identity, "data": data_fingerprint,
               "template": template, "cutoff_len": cutoff_len, "token_level": token_level}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


# -- computing and storing parts ---------------------------------------------------------------------
def _lengths(dataset, prefix_sharing: bool) -> list[int]:
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    p, c, r = (pc.list_value_length(table.column(n)).to_pylist() for n in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return [pair_length(a, b, d, prefix_sharing=prefix_sharing) for a, b, d in zip(p, c, r)]


@torch.no_grad()
def compute_part(reference: Reference, dataset, positions: list[int], collator, *, batch_size: int,
                 device, num_batches: int = 0) -> dict[str, torch.Tensor]:
    """Reference log-probs of the pairs at `positions` of `dataset` (CPU tensors, keyed by `index`).

    Pairs are batched longest first (the order does not matter, values are stored by index), so
    batches carry little padding and an out-of-memory shows up in the first batch. `num_batches`:
    run at least that many forwards (the extra ones on the first pair, discarded), so that every
    process of a ZeRO-3 run, whose forwards gather weights together, runs as many as the others.
    """
    lengths = _lengths(dataset, isinstance(collator, PrefixSharedCollator))
    order = sorted(positions, key=lambda i: -lengths[i])
    columns: dict[str, list[torch.Tensor]] = {"index": [], **{k: [] for k in _SUMMED},
                                              **({k: [] for k in _PER_TOKEN} if reference.token_level else {})}
    starts = list(range(0, len(order), batch_size))
    for _ in range(num_batches - len(starts)):
        reference.logps({k: v.to(device) for k, v in collator(dataset.select([0]).to_list()).items()})
    for start in starts:
        features = dataset.select(order[start:start + batch_size]).to_list()
        batch = batch_to(collator(features), device)
        out = reference.logps(batch)
        columns["index"].append(batch["index"].cpu())
        for key in _SUMMED:
            columns[key].append(getattr(out, key).float().cpu())
        if reference.token_level:  # flat, pair after pair: each pair's tokens in order
            for side in ("chosen", "rejected"):
                values = out.extras[f"{side}_token_logps"][out.extras[f"{side}_mask"]]
                columns[f"{side}_token_logps"].append(values.float().cpu())
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in columns.items()}


def write_part(directory: Path, tensors: dict[str, torch.Tensor], *, process_index: int = 0) -> Path:
    """Save one part file atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{process_index:05d}-{uuid.uuid4().hex[:8]}.safetensors"
    tmp = directory / f".{name}.tmp{os.getpid()}"
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"version": CACHE_VERSION, "sha256": tensors_sha256(tensors)})
    os.replace(tmp, directory / name)
    return directory / name


def _read_part(path: Path) -> dict[str, torch.Tensor] | None:
    """A part's tensors if they match the checksum written with them; else delete it (recomputed) and None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get("sha256")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        reason = None if tensors_sha256(tensors) == expected else "its values do not match their checksum"
    except FileNotFoundError:  # deleted by another process that found it damaged
        return None
    except Exception as exc:  # safetensors reports a cut or garbled file with its own error types
        reason = f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if reason is None:
        return tensors
    logger.warning("Reference cache part %s is damaged (%s); its pairs are computed again", path, reason)
    path.unlink(missing_ok=True)
    return None


@dataclasses.dataclass
class ReferenceTable:
    """Precomputed reference values of one split, looked up by pair index."""

    position: torch.Tensor  # (max index + 1,) long: row of each index, -1 where missing
    values: dict[str, torch.Tensor]  # _SUMMED: (n,); _PER_TOKEN: flat, with `<side>_offsets` (n,)

    @property
    def indices(self) -> set[int]:
        return set((self.position >= 0).nonzero().squeeze(-1).tolist())

    @classmethod
    def load(cls, directory: Path) -> ReferenceTable | None:
        """Merge every part in `directory` (an index found in two parts is read from the first)."""
        parts = sorted(directory.glob("part-*.safetensors")) if directory.is_dir() else []
        loaded = [part for part in map(_read_part, parts) if part is not None]
        if not loaded:
            return None
        size = max(int(p["index"].max()) + 1 if p["index"].numel() else 0 for p in loaded)
        present = torch.zeros(size, dtype=torch.bool)
        kept: dict[str, list[torch.Tensor]] = {}
        for part in loaded:
            keep = ~present[part["index"]]
            present[part["index"][keep]] = True
            for key, value in part.items():
                if key in _PER_TOKEN:
                    side = key.split("_")[0]
                    value = value[torch.repeat_interleave(keep, part[f"{side}_tokens"].long())]
                else:
                    value = value[keep]
                kept.setdefault(key, []).append(value)
        values = {k: torch.cat(v) for k, v in kept.items()}
        position = torch.full((size,), -1, dtype=torch.long)
        position[values.pop("index")] = torch.arange(int(present.sum()))
        for side in ("chosen", "rejected"):
            if f"{side}_token_logps" in values:
                counts = values[f"{side}_tokens"].long()
                values[f"{side}_offsets"] = counts.cumsum(0) - counts
        return cls(position, values)

    def lookup(self, index: torch.Tensor, *, token_level: bool, split: str) -> PairLogps:
        """PairLogps of the pairs `index` (B,), on `index`'s device."""
        cpu_index = index.cpu()
        rows = self.position[cpu_index.clamp(max=len(self.position) - 1)]
        missing = (cpu_index >= len(self.position)) | (rows < 0)
        if missing.any():
            raise PrefalignError(
                f"reference log-probs: pair index {int(cpu_index[missing][0])} of the {split} data has no precomputed "
                "value; precompute_ref_log_probs covers the train and eval data prepared when training starts. "
                "To score other data, set precompute_ref_log_probs: false"
            )
        out = {k: self.values[k][rows].to(index.device) for k in _SUMMED}
        extras = {}
        if token_level:
            if "chosen_token_logps" not in self.values:
                raise PrefalignError("reference log-probs: the cache holds no per-token values (needed by ld_alpha)")
            # one width for both sides, as pair_logps gives them
            width = int(max(self.values["chosen_tokens"][rows].max(), self.values["rejected_tokens"][rows].max()))
            cols = torch.arange(width)
            for side in ("chosen", "rejected"):
                counts = self.values[f"{side}_tokens"][rows].long()
                valid = cols[None, :] < counts[:, None]
                flat = self.values[f"{side}_token_logps"]
                at = (self.values[f"{side}_offsets"][rows][:, None] + cols[None, :]).clamp(max=max(len(flat) - 1, 0))
                dense = flat[at] * valid if len(flat) else torch.zeros(valid.shape)
                extras[f"{side}_token_logps"] = dense.to(index.device)
                extras[f"{side}_mask"] = valid.to(index.device)
        return PairLogps(extras=extras, **out)


class PrecomputedReference(Reference):
    """Reference log-probs read from precomputed tables, one per split, by the batch's `index`."""

    def __init__(self, tables: dict[str, ReferenceTable], strategy: str, stats: dict, **kwargs):
        super().__init__(**kwargs)
        self.tables = tables
        self.name = f"precomputed ({strategy})"
        self.stats = stats  # per split: {"computed": n, "reused": n, "path": str}

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], split: str = "train", image_features: dict | None = None
              ) -> PairLogps:
        if split not in self.tables:
            raise PrefalignError(f"reference log-probs: no precomputed values for the {split} data")
        if "index" not in batch:
            raise PrefalignError("reference log-probs: a precomputed reference needs the batch's `index` (the collator adds it)")
        return self.tables[split].lookup(batch["index"], token_level=self.token_level, split=split)


# -- the whole step --------------------------------------------------------------------------------
def _wait_for_parts(directory: Path, wanted: set[int], num_processes: int, timeout_s: float) -> ReferenceTable:
    """After this process wrote its part: wait until all parts are there, then read them."""
    if num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    deadline = time.monotonic() + timeout_s
    while True:
        table = ReferenceTable.load(directory)
        missing = wanted - (table.indices if table is not None else set())
        if not missing:
            return table
        if num_processes <= 1 or time.monotonic() > deadline:
            raise PrefalignError(
                f"reference log-probs: {len(missing)} pairs are still missing in {directory} (e.g. index "
                f"{min(missing)}); another process may have failed. Run again to compute the rest"
            )
        time.sleep(2.0)


def precompute_split(reference: Reference, dataset, directory: Path, collator, *, batch_size: int, device,
                     process_index: int = 0, num_processes: int = 1, timeout_s: float = 24 * 3600.0
                     ) -> tuple[ReferenceTable, dict]:
    """Fill `directory` with the reference values of every pair of `dataset`; return them and counts."""
    indices = dataset["index"]
    wanted = set(indices)
    table = ReferenceTable.load(directory)
    barrier()  # every process has read the same parts before any writes one: they agree on what is missing
    have = table.indices if table is not None else set()
    missing = [pos for pos, i in enumerate(indices) if i not in have]
    mine = missing[process_index::num_processes]
    if missing:
        most = -(-len(missing) // num_processes)  # the largest share
        logger.info("Computing reference log-probs of %d pairs into %s", len(mine), directory)
        part = compute_part(reference, dataset, mine, collator, batch_size=batch_size, device=device,
                            num_batches=-(-most // batch_size))
        if mine:
            write_part(directory, part, process_index=process_index)
        table = _wait_for_parts(directory, wanted, num_processes, timeout_s)
    stats = {"computed": len(mine), "reused": len(indices) - len(missing), "path": str(directory)}
    return table, stats


def default_reference_cache_dir() -> Path:
    from prefalign.data.encode import default_cache_dir

    return Path(default_cache_dir()) / "reference"


def precompute_reference(reference: Reference, splits: dict[str, object], collator, *, sources: dict,
                         template: str | None, cutoff_len: int, device, batch_size: int,
                         dtype: torch.dtype = torch.float32, process_index: int = 0, num_processes: int = 1,
                         cache_dir: str | Path | None = None) -> PrecomputedReference:
    """Run (or read from the cache) `reference` over every split, then release the reference model.

    `splits` maps a split name ("train", "eval") to its encoded dataset (None: skipped); `sources`
    (see `reference_identity`), `template` and `cutoff_len` are the config values in the cache key.
    """
    root = Path(cache_dir) if cache_dir else default_reference_cache_dir()
    identity = reference_identity(sources, reference, dtype)
    reference.to(device)
    if reference.model is not None:  # the policy itself for the adapter / initial-policy strategies
        reference.model.to(device)
    tables, stats = {}, {}
    for split, dataset in splits.items():
        if dataset is None:
            continue
        key = cache_key(identity, dataset_fingerprint(dataset), template=template, cutoff_len=cutoff_len,
                        token_level=reference.token_level)
        tables[split], stats[split] = precompute_split(
            reference, dataset, root / key, collator, batch_size=batch_size, device=device,
            process_index=process_index, num_processes=num_processes)
        logger.info("Reference log-probs (%s): %d computed, %d read from %s", split, stats[split]["computed"],
                    stats[split]["reused"], stats[split]["path"])
    strategy = reference.name
    reference.release()
    return PrecomputedReference(tables, strategy, stats, chunk_size=reference.chunk_size,
                                token_level=reference.token_level)
