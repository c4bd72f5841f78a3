"""Helpers shared by the tests that train the tiny model (fixtures live in conftest.py)."""

from pathlib import Path

from prefalign.config import build_config

ROOT = Path(__file__).resolve().parents[1]  # the repository
EXAMPLES = ROOT / "examples"
FIXTURES = ROOT / "tests" / "fixtures" / "data"


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


def make_random_adapter(model_dir, path, *, seed=1, target_modules="all-linear", b_std=None) -> str:
    """Save a LoRA adapter with random, non-zero A and B (as if trained), so base + adapter != base.

    `b_std` redraws lora_B from N(0, b_std) for a larger effect than peft's random init.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=target_modules,
                                             init_lora_weights=False))
    if b_std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, b_std)
    model.save_pretrained(path)
    return str(path)
