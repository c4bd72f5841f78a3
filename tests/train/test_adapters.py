"""The adapters LLaMA-Factory users turn on, against the library that defines them: OFT (peft's
OFTConfig, one training step checked against peft + torch alone) and LoRA+ (peft's parameter groups)."""

import json

import pytest
import torch
from helpers import PLAIN, config_for, first_batch, textbook_dpo_loss

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

    # the plain layout: the rows textbook_dpo_loss reads
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "run", **OFT, **STEP, **PLAIN))
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


PISSA = dict(pissa_init=True, lora_target="q_proj,v_proj", lora_rank=4)


def _pissa_reference_run(model_dir, pissa_iter):
    """peft's own PiSSA on the same base, in prefalign's order: seed, load, get_peft_model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(0)
    init = "pissa" if pissa_iter == -1 else f"pissa_niter_{pissa_iter}"
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init))


@pytest.mark.parametrize("pissa_iter", [-1, 4])
def test_pissa_init_and_step_equal_pefts_own(tiny_model_dir, tmp_path, pissa_iter):
    """After init, every parameter (the adapter and the residual base) is peft's own PiSSA init of the same
    base; one SGD step of sigmoid DPO against ref_model (the original model) equals that step by peft + torch."""
    from transformers import AutoModelForCausalLM

    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "run", **PISSA, pissa_iter=pissa_iter,
                                       ref_model=tiny_model_dir, **{**STEP, "learning_rate": 0.05}, **PLAIN))
    model = _pissa_reference_run(tiny_model_dir, pissa_iter)
    mine = dict(trainer.model.named_parameters())
    theirs = dict(model.named_parameters())
    assert mine.keys() == theirs.keys()
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    residual = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert (theirs[residual] - base["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-3  # PiSSA moved it
    for name in theirs:
        assert torch.allclose(mine[name], theirs[name], atol=1e-6, rtol=0), name
    assert {p.dtype for p in mine.values()} == {torch.float32}

    batch = {k: v for k, v in first_batch(trainer).items() if isinstance(v, torch.Tensor)}
    trainer.train()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.train()
    textbook_dpo_loss(model, batch, beta=0.1, reference_model=reference).backward()
    moved = 0.0
    for name, param in model.named_parameters():
        if param.requires_grad:
            expected = param - 0.05 * param.grad
            moved = max(moved, (expected - param).abs().max().item())
            assert torch.allclose(mine[name], expected, atol=1e-6, rtol=0), name
    assert moved > 1e-4


def test_pissa_convert_is_a_lora_of_the_original_base(tiny_model_dir, tmp_path):
    """pissa_convert: output_dir/pissa_converted (rank 2r) on the untouched base gives the trained policy's
    logits (residual base + trained PiSSA adapter); pissa_init holds the initial adapter as a plain LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prefalign.train.workflow import save_final_model

    out = tmp_path / "run"
    trainer = build_trainer(config_for(tiny_model_dir, out, **PISSA, pissa_iter=-1, pissa_convert=True,
                                       pref_loss="simpo", max_steps=2, learning_rate=0.05, **PLAIN))
    assert json.loads((out / "pissa_init" / "adapter_config.json").read_text())["init_lora_weights"] is True
    batch = first_batch(trainer)
    trainer.train()
    save_final_model(trainer, out, pissa_convert=True)
    converted = json.loads((out / "pissa_converted" / "adapter_config.json").read_text())
    assert (converted["r"], converted["lora_alpha"], converted["init_lora_weights"]) == (8, 16, True)
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          str(out / "pissa_converted")).eval()
        again = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with plain.disable_adapter():
            untouched = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (trained - untouched).abs().max() > 1e-3  # training changed the policy
    assert torch.allclose(again, trained, atol=1e-4, rtol=0)


def test_pissa_reference_is_the_starting_model_not_the_residual(tiny_model_dir, tmp_path):
    """PiSSA with sigmoid DPO and no ref_model: the reference is the residual base + a frozen copy of the initial
    PiSSA adapter, so its log-probs are the original model's (before PiSSA; per token within 1e-5),
    the step-0 loss is ln 2 (policy and reference compute the same weights), and a training step moves the
    policy but not the reference. The adapter-off model (the residual) is far from the original."""
    import math

    from transformers import AutoModelForCausalLM

    from helpers import sequence_logps

    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "run", **PISSA, pissa_iter=-1,
                                       **{**STEP, "learning_rate": 0.05}, **PLAIN))
    assert trainer.reference.name == "sft-adapter"
    batch = first_batch(trainer)
    original = sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), batch)
    reference = trainer.reference.logps(batch)
    tokens = torch.cat([reference.chosen_tokens, reference.rejected_tokens])
    # per token: a sum near -140 is itself only good to float32's resolution there, 1.5e-5
    assert torch.allclose(torch.cat([reference.chosen, reference.rejected]) / tokens, original / tokens,
                          atol=1e-5, rtol=0)
    with torch.no_grad(), trainer.model.disable_adapter():
        residual = sequence_logps(trainer.model.eval(), batch)
    assert (residual - original).abs().max() > 1e-2  # the old "adapter off" reference was not the starting model
    with torch.no_grad():
        _, out, _ = trainer.batch_loss(trainer.model.train(), batch)
    assert torch.allclose(out.losses, torch.full_like(out.losses, math.log(2)), atol=1e-6, rtol=0)

    trainer.train()
    after = trainer.reference.logps(batch)
    assert torch.allclose(torch.cat([after.chosen, after.rejected]) / tokens, original / tokens, atol=1e-5, rtol=0)
    with torch.no_grad():
        policy = sequence_logps(trainer.model.eval(), batch)
    assert (policy - original).abs().max() > 1e-4  # trained
    assert [n for n, p in trainer.model.named_parameters() if p.requires_grad and ".reference." in n] == []


@pytest.mark.parametrize("extra, words", [
    ({"finetuning_type": "full", "pref_loss": "simpo"}, "pissa_init is a LoRA initialisation and needs "
                                                        "finetuning_type: lora, not full"),
    ({"pissa_iter": 0, "pref_loss": "simpo"}, "pissa_iter: 0 must be at least 1"),
    ({"pref_loss": "simpo", "quantization_bit": 4}, "pissa_init with quantization_bit: PiSSA rewrites the base"),
])
def test_pissa_refusals(extra, words):
    with pytest.raises(ConfigError) as info:
        build_config({"model_name_or_path": "m", "dataset": "d", "pissa_init": True, **extra})
    assert any(line.startswith(words) for line in info.value.problems), info.value.problems
    with pytest.raises(ConfigError, match="pissa_convert converts a PiSSA adapter and needs pissa_init: true"):
        build_config({"model_name_or_path": "m", "dataset": "d", "pissa_convert": True})
