"""Helpers shared by the tests that train the tiny model (fixtures live in conftest.py)."""

from pathlib import Path

from prefalign.config import build_config

EXAMPLES = Path(__file__).parents[1] / "examples"


def config_for(model_dir, out, **overrides):
    """A small, fast LoRA DPO config on the demo data; `overrides` are config keys."""
    values = {
        "model_name_or_path": str(model_dir), "stage": "dpo", "finetuning_type": "lora",
        "dataset": "demo_train", "dataset_dir": str(EXAMPLES / "data"), "max_samples": 16,
        "cutoff_len": 96, "output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 3,
        "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "overwrite_output_dir": True, "seed": 0, "disable_tqdm": True,
    }
    values.update(overrides)
    return build_config(values)


def first_batch(trainer):
    """The first training batch, on the trainer's device."""
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
