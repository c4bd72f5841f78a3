"""Which checkpoint a run may resume from, and the marker that makes a checkpoint count.

A folder of weights (a `checkpoint-N`, or the output dir itself after the final save) counts
only once `prefalign_complete.json` is in it: written last, it lists every file with its size,
the run's *resume settings* (everything that determines the weights: model, data fingerprint,
template, cutoff, losses and their settings, optimizer, schedule, batch geometry, seed) and the
whole-run totals so far (summed step losses, runtime). A save cut short leaves no marker, or
files whose sizes differ, and the folder is skipped.

Resume rules (`find_previous` before the data is loaded, `check_settings` after):
  - `resume_from_checkpoint: PATH` must be a complete checkpoint;
  - otherwise an output dir holding a finished run (a marker in the dir itself) is finished:
    rerun with the same settings it does nothing; with other settings it is an error;
  - otherwise the newest complete `checkpoint-N` is resumed, the newer incomplete ones are named;
  - resuming with any resume setting changed is an error naming the changed keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from prefalign.errors import ConfigError, PrefalignError
from prefalign.integrity import write_json_atomic

logger = logging.getLogger(__name__)

MARKER = "prefalign_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_FIX = "set overwrite_output_dir: true to start over, or choose another output_dir"

# The keys whose values determine the trained weights, by where they live.
_PREFALIGN_KEYS = (
    "model_name_or_path", "adapter_name_or_path", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout",
    "lora_target", "additional_target", "use_rslora", "use_dora", "loraplus_lr_ratio", "loraplus_lr_embedding",
    "oft_rank", "oft_block_size", "oft_target", "module_dropout", "create_new_adapter", "freeze_trainable_layers",
    "freeze_trainable_modules", "freeze_extra_modules", "ref_model", "ref_model_adapters", "template", "cutoff_len",
    "pref_loss", "pref_loss_weights", "pref_beta", "pref_ftx", "pref_bco_weight", "dpo_label_smoothing",
    "simpo_gamma", "discopop_tau", "ld_alpha", "use_weighting", "f_divergence_type", "f_alpha_divergence_coef",
    "stage", "kto_chosen_weight", "kto_rejected_weight", "rope_scaling", "model_max_length", "pure_bf16",
    "pissa_init", "pissa_iter",
    "moe_aux_loss_coef", "use_galore", "galore_target", "galore_rank", "galore_update_interval", "galore_scale",
    "galore_proj_type", "use_apollo", "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale",
    "apollo_proj", "apollo_proj_type", "apollo_scale_type", "apollo_scale_front", "use_muon", "use_adam_mini",
    "use_badam", "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval", "badam_update_ratio",
    "badam_mask_mode", "galore_layerwise", "apollo_layerwise",
    "early_stopping_steps",
)
_TRAINING_KEYS = (
    "learning_rate", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "max_steps", "num_train_epochs",
    "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "train_sampling_strategy",
    "seed", "data_seed", "bf16", "fp16",
)


def resume_settings(config, train_dataset) -> dict:
    """The resolved settings that determine the weights, as JSON-able values."""
    from prefalign.reference_cache import dataset_fingerprint

    settings = {key: config.raw.get(key) for key in _PREFALIGN_KEYS}
    for key in _TRAINING_KEYS:
        value = getattr(config.training, key, None)
        settings[key] = getattr(value, "value", value)
    # on CPUs the training arguments learn the world size only when the Trainer starts
    settings["world_size"] = int(os.environ.get("WORLD_SIZE", settings["world_size"] or 1))
    settings["train_data"] = dataset_fingerprint(train_dataset)[:16]
    return json.loads(json.dumps(settings, default=str))


def changed_keys(old: dict, new: dict) -> list[str]:
    """`key (old -> new)` for every resume setting that differs. A setting a marker does not record (one
    added to prefalign since it was written, e.g. oft_block_size) had its default in that run."""
    defaults = _default_settings()
    old = {**{k: v for k, v in defaults.items() if k in new}, **old}
    return [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _default_settings() -> dict:
    """The prefalign resume settings at their defaults, JSON-normalised as `resume_settings` records them."""
    import dataclasses

    from prefalign.config.args import DataArguments, FinetuningArguments, ModelArguments

    values = {}
    for group in (ModelArguments(), DataArguments(), FinetuningArguments()):
        values.update(dataclasses.asdict(group))
    return json.loads(json.dumps({k: values.get(k) for k in _PREFALIGN_KEYS}, default=str))


# -- the marker ------------------------------------------------------------------------------------
@dataclass
class Totals:
    """Whole-run sums carried across resumes, so final metrics cover the whole run."""

    loss_sum: float = 0.0  # sum over optimizer steps of the step's mean loss
    runtime_s: float = 0.0


@dataclass
class Marker:
    step: int
    settings: dict
    files: dict[str, int]
    totals: Totals = field(default_factory=Totals)

    def problem(self, folder: Path) -> str | None:
        """Why the files of `folder` do not match this marker, or None."""
        for name, size in self.files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
        return None


def mark_complete(folder: str | Path, *, step: int, settings: dict, totals: Totals, files: list[str] | None = None
                  ) -> None:
    """Write the marker last: `files` (default: every file under `folder`) with their sizes."""
    folder = Path(folder)
    names = files if files is not None else [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
                                             if p.is_file() and p.name != MARKER]
    write_json_atomic(folder / MARKER, {
        "step": step, "settings": settings, "files": {n: (folder / n).stat().st_size for n in names},
        "totals": {"loss_sum": totals.loss_sum, "runtime_s": totals.runtime_s},
    })


def read_marker(folder: str | Path) -> Marker | None:
    try:
        raw = json.loads((Path(folder) / MARKER).read_text())
        return Marker(int(raw["step"]), dict(raw["settings"]), dict(raw["files"]), Totals(**raw.get("totals", {})))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def incomplete_reason(folder: Path) -> str | None:
    """None for a complete checkpoint; else why it is not."""
    marker = read_marker(folder)
    if marker is None:
        return f"no {MARKER} (its save was cut short, or an older prefalign wrote it)"
    return marker.problem(folder)


def clear_for_save(folder: str | Path) -> None:
    """Before writing a checkpoint into `folder`: remove what is there, so no old marker vouches for new files."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)


# -- choosing the checkpoint -----------------------------------------------------------------------
def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders, newest (highest N) first."""
    out = Path(output_dir)
    found = [p for p in out.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if out.is_dir() else []
    return sorted(found, key=lambda p: -int(_CHECKPOINT.match(p.name).group(1)))


def newest_complete(output_dir: str | Path) -> Path | None:
    return next((p for p in checkpoint_folders(output_dir) if incomplete_reason(p) is None), None)


@dataclass
class Previous:
    """What an output dir holds from earlier: a checkpoint to resume, or a finished run."""

    folder: Path
    marker: Marker
    finished: bool


def _refuse_unsaved_optimizer(config, folder: Path) -> None:
    """Optimizers whose state a checkpoint misses: BAdam's BlockOptimizer keeps its active block and step count
    outside its state dict (a resumed run would restart the block order and load one block's AdamW state into
    another's); layer-wise GaLore / APOLLO keep theirs in per-parameter optimizers the Trainer never saves."""
    ft = config.finetuning
    for key, lost in (("use_badam", "BAdam's block position"),
                      ("galore_layerwise", "the per-parameter GaLore state"),
                      ("apollo_layerwise", "the per-parameter APOLLO state")):
        if getattr(ft, key) and (key == "use_badam" or getattr(ft, "use_" + key.split("_")[0])):
            raise ConfigError(f"{key}: {folder} would be resumed, but {lost} is not checkpointed; {_FIX}")


def find_previous(config, ignore: tuple[str, ...] = ()) -> Previous | None:
    """The checkpoint (or finished run) this run continues, or None to start fresh; raises when that is unsafe.

    `ignore`: names in the output dir that are not a run's outputs (the run lock).
    """
    args = config.training
    if args.resume_from_checkpoint:
        folder = Path(args.resume_from_checkpoint)
        if not folder.is_dir():
            raise ConfigError(f"resume_from_checkpoint: no such directory {str(folder)!r}")
        reason = incomplete_reason(folder)
        if reason is not None:
            newest = newest_complete(folder.parent)
            hint = f"; the newest complete one is {newest}" if newest else ""
            raise ConfigError(f"resume_from_checkpoint: {folder} is not a complete checkpoint ({reason}){hint}")
        _refuse_unsaved_optimizer(config, folder)
        return Previous(folder, read_marker(folder), finished=False)
    out = Path(args.output_dir)
    held = [p for p in out.iterdir() if p.name not in ignore] if out.is_dir() else []
    if not held or config.finetuning.overwrite_output_dir:
        return None
    finished = read_marker(out)
    if finished is not None and finished.problem(out) is None:
        return Previous(out, finished, finished=True)
    skipped = []
    for folder in checkpoint_folders(out):
        reason = incomplete_reason(folder)
        if reason is None:
            if skipped:
                logger.warning("Skipping incomplete checkpoints: %s", "; ".join(skipped))
            _refuse_unsaved_optimizer(config, folder)
            logger.info("Resuming from %s (set overwrite_output_dir: true to start over)", folder)
            return Previous(folder, read_marker(folder), finished=False)
        skipped.append(f"{folder.name} ({reason})")
    if skipped:
        raise ConfigError(f"output_dir: {out} holds no complete checkpoint to resume from ({'; '.join(skipped)}); "
                          f"{_FIX}")
    raise ConfigError(f"output_dir: {out} already holds files and no checkpoint to resume from; {_FIX}")


def check_settings(previous: Previous, settings: dict) -> None:
    """Refuse to continue a run whose weights were trained with other settings."""
    if not previous.marker.settings:
        raise PrefalignError(f"{previous.folder} records no resume settings (saved outside `prefalign train`), so "
                             f"whether it matches this run is unknown: {_FIX}")
    changed = changed_keys(previous.marker.settings, settings)
    if not changed:
        return
    what = "a finished run" if previous.finished else f"{previous.folder.name}, a checkpoint of a run"
    raise PrefalignError(f"output_dir: {previous.folder.parent if not previous.finished else previous.folder} holds "
                         f"{what} with other settings: {', '.join(changed)}; its weights were not trained with "
                         f"these, so it cannot be continued: {_FIX}")
