"""pure_bf16 (LLaMA-Factory): bf16 weights, gradients and optimizer state, no mixed precision, on the CPU."""

import pytest
import torch
from helpers import PLAIN, config_for, first_batch, textbook_dpo_loss

from prefalign.config import build_config
from prefalign.errors import ConfigError
from prefalign.train.workflow import build_trainer

STEP = dict(max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=0.0, train_sampling_strategy="sequential", pref_beta=0.1, lora_target="q_proj,v_proj")


def test_pure_bf16_trains_bf16_weights_without_mixed_precision(tiny_model_dir, tmp_path):
    """Full tuning: every parameter is bf16 and stays bf16; the Trainer runs no autocast (bf16 off). One
    SGD step equals the same step by torch alone on the model loaded in bf16, with a frozen bf16 copy as
    the reference: p - lr · grad, all in bf16 (within a few bf16 roundings: prefalign's log-prob kernel
    accumulates in fp32, the textbook path rounds the bf16 logits first)."""
    from transformers import AutoModelForCausalLM

    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "run", pure_bf16=True, finetuning_type="full",
                                       **STEP, **PLAIN))  # the rows textbook_dpo_loss reads
    assert trainer.args.bf16 is False and trainer.args.fp16 is False
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    batch = {k: v for k, v in first_batch(trainer).items() if isinstance(v, torch.Tensor)}
    trainer.train()
    trained = dict(trainer.model.named_parameters())
    assert {p.dtype for p in trained.values()} == {torch.bfloat16}

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    model.train()
    textbook_dpo_loss(model, batch, beta=0.1, reference_model=reference).backward()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {n: (p - 0.5 * p.grad).detach() for n, p in model.named_parameters()}
    assert expected.keys() == trained.keys()
    total_moved = total_error = 0.0
    for name, value in expected.items():
        assert value.dtype == torch.bfloat16
        total_moved += (value.float() - start[name].float()).norm().item()
        total_error += (trained[name].detach().float() - value.float()).norm().item()
    assert total_moved > 0.1 and total_error <= 0.05 * total_moved, (total_moved, total_error)


def test_pure_bf16_lora_keeps_pefts_fp32_adapter_on_the_bf16_base(tiny_model_dir, tmp_path):
    """As LLaMA-Factory: peft makes the adapter fp32 (autocast_adapter_dtype); the base stays bf16."""
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, pure_bf16=True, **STEP))
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_bf16_true_keeps_fp32_trainable_weights(tiny_model_dir, tmp_path):
    """The contrast: mixed precision (bf16: true) loads bf16 but trains fp32 copies of the trainable parameters."""
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, bf16=True, finetuning_type="full", **STEP))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("extra, words", [
    ({"fp16": True}, "pure_bf16 and fp16 both given: pure_bf16 trains in bf16; remove fp16"),
    ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "pure_bf16 with deepspeed ZeRO-3: not supported"),
])
def test_pure_bf16_refuses_what_llamafactory_refuses(extra, words):
    with pytest.raises(ConfigError) as info:
        build_config({"model_name_or_path": "m", "dataset": "d", "pure_bf16": True, **extra})
    assert any(line.startswith(words) for line in info.value.problems), info.value.problems
