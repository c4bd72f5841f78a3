"""The adapters LLaMA-Factory users turn on, against the library that defines them: OFT (peft's
OFTConfig, one training step checked against peft + torch alone) and LoRA+ (peft's parameter groups)."""

import pytest
import torch
from helpers import config_for, first_batch, textbook_dpo_loss

from prefalign.config import build_config
from prefalign.errors import ConfigError
from prefalign.train.workflow import build_trainer

OFT = dict(finetuning_type="oft", oft_rank=0, oft_block_size=8, oft_target="q_proj,v_proj", module_dropout=0.0)
STEP = dict(max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=0.0, train_sampling_strategy="sequential", pref_beta=0.1)


def test_oft_step_equals_peft_and_torch_alone(tiny_model_dir, tmp_path):
    """One SGD step of prefalign's OFT DPO run gives the OFT parameters that peft's own OFT model gets
    from the same batch: sigmoid DPO loss -log σ(β((πc - rc) - (πr - rr))), the reference being the same
    model with its adapter disabled, one plain SGD update p -= lr · grad."""
    from peft import OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "run", **OFT, **STEP))
    batch = {k: v for k, v in first_batch(trainer).items() if isinstance(v, torch.Tensor)}
    trainer.train()
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(".oft_" in n for n in trained)

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), OFTConfig(
        task_type="CAUSAL_LM", r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"], module_dropout=0.0))
    model.train()
    textbook_dpo_loss(model, batch, beta=0.1).backward()
    expected = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            expected[name] = (param - 0.5 * param.grad).detach()
    assert expected.keys() == trained.keys()
    moved = max((expected[n] - p).abs().max().item() for n, p in model.named_parameters() if p.requires_grad)
    assert moved > 1e-4  # the step moves the rotations far more than the tolerance
    for name in expected:
        assert torch.allclose(trained[name], expected[name], atol=1e-6, rtol=0), name


def test_oft_keys_mean_what_peft_and_llamafactory_say(tiny_model_dir, tmp_path):
    """oft_rank / oft_block_size / oft_target / module_dropout reach peft's OFTConfig; the reference is the
    adapter switched off; exactly one of oft_rank and oft_block_size is given."""
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, finetuning_type="oft", oft_block_size=16,
                                       module_dropout=0.1, max_steps=1))
    config = trainer.model.peft_config["default"]
    assert type(config).__name__ == "OFTConfig"
    assert (config.r, config.oft_block_size, config.module_dropout) == (0, 16, 0.1)
    assert "lm_head" not in str(config.target_modules)  # `all`: every linear layer but the head
    assert trainer.reference.name == "adapter-disabled"
    with pytest.raises(ConfigError, match="give exactly one of them"):
        build_config({"model_name_or_path": "m", "dataset": "d", "finetuning_type": "oft", "oft_rank": 4})
    with pytest.raises(ConfigError, match="quantization_bit with finetuning_type: oft: prefalign trains adapters on "
                                          "quantized weights with LoRA only"):
        build_config({"model_name_or_path": "m", "dataset": "d", "finetuning_type": "oft", "quantization_bit": 4})


def test_loraplus_groups_are_peft_s_definition(tiny_model_dir, tmp_path):
    """LoRA+ (Hayou et al. 2024): every A matrix at learning_rate, every B matrix at learning_rate x ratio,
    a LoRA embedding layer's matrices at loraplus_lr_embedding; weight decay as configured."""
    lr, ratio, embedding_lr = 1e-3, 16.0, 5e-5
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, lora_target="q_proj,v_proj,embed_tokens",
                                       learning_rate=lr, loraplus_lr_ratio=ratio, loraplus_lr_embedding=embedding_lr,
                                       weight_decay=0.01, max_steps=1))
    optimizer = trainer.create_optimizer()
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert sorted(rate) == sorted(names)  # every trainable parameter in exactly one group
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)
    expected = {}
    for key, name in names.items():
        if "lora_embedding_" in name:
            expected[key] = embedding_lr
        elif "lora_B" in name:
            expected[key] = lr * ratio
        else:
            assert "lora_A" in name, name
            expected[key] = lr
    assert rate == expected
    assert {embedding_lr, lr * ratio, lr} == set(expected.values())
    assert {g["weight_decay"] for g in optimizer.param_groups if g["params"]} == {0.01}


def test_loraplus_is_lora_only():
    with pytest.raises(ConfigError, match="loraplus_lr_ratio is LoRA\\+ and needs finetuning_type: lora"):
        build_config({"model_name_or_path": "m", "dataset": "d", "finetuning_type": "full", "loraplus_lr_ratio": 16})


def test_a_checkpoint_from_before_the_adapter_keys_resumes_when_they_are_at_their_defaults():
    """A marker written before oft_* / loraplus_* were resume settings lacks them: that run had their defaults."""
    from prefalign.train.checkpoints import changed_keys

    new = {"lora_rank": 8, "oft_block_size": 32, "oft_rank": 0, "oft_target": ["all"], "loraplus_lr_ratio": None}
    old = {"lora_rank": 8}
    assert changed_keys(old, new) == []
    assert changed_keys(old, {**new, "oft_block_size": 16}) == ["oft_block_size (32 -> 16)"]
    assert changed_keys({**old, "oft_block_size": 32}, {**new, "lora_rank": 4}) == ["lora_rank (8 -> 4)"]
