"""The optimizers of LLaMA-Factory's keys, each against its package's own step on the same gradients."""

import pytest
import torch
from helpers import config_for, first_batch

from prefalign.config import build_config
from prefalign.errors import ConfigError
from prefalign.train.workflow import build_trainer

GALORE = dict(finetuning_type="full", use_galore=True, galore_target="q_proj,v_proj", galore_rank=4,
              galore_update_interval=50, galore_scale=0.5, galore_proj_type="std", optim="adamw_torch",
              learning_rate=1e-2, weight_decay=0.1, max_steps=1)


def test_galore_step_equals_galore_torchs_own_step_on_the_same_gradients(tiny_model_dir, tmp_path):
    """use_galore: the optimizer is galore-torch's GaLoreAdamW; the q/v projection weights (the targets, 2-D)
    get the rank-4 projection with weight decay, every other parameter plain AdamW (biases and norms without
    decay, LLaMA-Factory's groups). One step from the same gradients gives the weights GaLoreAdamW built by
    hand on those groups gives."""
    galore_torch = pytest.importorskip("galore_torch")

    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, **GALORE))
    model = trainer.model
    hand = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    loss = trainer.batch_loss(model, first_batch(trainer))[0]
    loss.backward()
    for name, param in model.named_parameters():
        hand[name].grad = param.grad.clone()
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is galore_torch.GaLoreAdamW
    optimizer.step()

    projected = [n for n in hand if (".q_proj." in n or ".v_proj." in n) and n.endswith("weight")]
    undecayed = [n for n in hand if n not in projected and ("norm" in n or n.endswith("bias"))]
    decayed = [n for n in hand if n not in projected and n not in undecayed]
    assert len(projected) == 4 and decayed  # 2 layers x (q, v); the embeddings and the other linear weights
    reference = galore_torch.GaLoreAdamW([
        {"params": [hand[n] for n in undecayed], "weight_decay": 0.0},
        {"params": [hand[n] for n in decayed], "weight_decay": 0.1},
        {"params": [hand[n] for n in projected], "weight_decay": 0.1, "rank": 4, "update_proj_gap": 50,
         "scale": 0.5, "proj_type": "std"},
    ], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    reference.step()
    for name, param in model.named_parameters():
        assert torch.allclose(param, hand[name], atol=1e-7, rtol=0), name
    # the step is GaLore's, not AdamW's: a plain AdamW step from the same gradient moves q elsewhere
    q = "model.layers.0.self_attn.q_proj.weight"
    before = trainer.reference.model.get_parameter(q).detach()  # the frozen copy: the weights before the step
    plain = before.clone().requires_grad_(True)
    plain.grad = hand[q].grad.clone()
    torch.optim.AdamW([plain], lr=1e-2, weight_decay=0.1, eps=1e-8).step()
    assert (model.get_parameter(q) - before).abs().max() > 1e-4
    assert (model.get_parameter(q) - plain).abs().max() > 1e-3


def test_layerwise_galore_step_equals_galore_torch_stepped_per_parameter(tiny_model_dir, tmp_path):
    """galore_layerwise: the Trainer's optimizer is transformers' LayerWiseDummyOptimizer (its step a no-op) and
    the backward itself steps each parameter with its own GaLoreAdamW (LF's groups: q/v weights projected with
    decay, the rest decayed or not), zeroing its gradient. The hand step: a copy of the model takes the same
    loss's gradients without hooks, then one GaLoreAdamW per parameter with its group's settings steps it."""
    galore_torch = pytest.importorskip("galore_torch")
    import copy

    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, **GALORE, galore_layerwise=True))
    model = trainer.model
    twin = copy.deepcopy(model)
    batch = first_batch(trainer)
    trainer.batch_loss(twin, batch)[0].backward()
    optimizer = trainer.create_optimizer()  # before the backward: the steps run in its hooks
    assert type(optimizer) is LayerWiseDummyOptimizer
    trainer.batch_loss(model, batch)[0].backward()
    assert all(p.grad is None for p in model.parameters())  # each hook zeroed its gradient

    decay = set(trainer.get_decay_parameter_names(twin))
    projection = {"rank": 4, "update_proj_gap": 50, "scale": 0.5, "proj_type": "std"}
    for name, param in twin.named_parameters():
        if (".q_proj." in name or ".v_proj." in name) and name.endswith("weight"):
            group = {"weight_decay": 0.1, **projection}
        else:
            group = {"weight_decay": 0.1 if name in decay else 0.0}
        galore_torch.GaLoreAdamW([{"params": [param], **group}], lr=1e-2, betas=(0.9, 0.999), eps=1e-8).step()
    for (name, param), (_, other) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.allclose(param, other, atol=1e-7, rtol=0), name
    # the projected q took GaLore's step, not AdamW's
    q = "model.layers.0.self_attn.q_proj.weight"
    before = trainer.reference.model.get_parameter(q).detach()
    assert (model.get_parameter(q) - before).abs().max() > 1e-4


def test_layerwise_galore_trains_with_the_trainers_scheduler(tiny_model_dir, tmp_path):
    """Through Trainer.train: transformers' get_scheduler gives each parameter its scheduler (warm-up then linear
    decay of lr 1e-2 over 3 steps: 1e-2, 2/3·1e-2, 1/3·1e-2 logged) and the weights move."""
    pytest.importorskip("galore_torch")
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, **{**GALORE, "max_steps": 3}, galore_layerwise=True))
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert lrs == pytest.approx([1e-2, 2e-2 / 3, 1e-2 / 3]), lrs
    assert all(not torch.equal(p, start[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("extra, words", [
    ({"finetuning_type": "lora"}, "use_galore with finetuning_type: lora: GaLore projects the gradients of full"),
    ({"finetuning_type": "full", "optim": "sgd"}, "use_galore with optim: sgd: prefalign's GaLore is GaLoreAdamW"),
    ({"finetuning_type": "full", "galore_layerwise": True, "gradient_accumulation_steps": 2},
     "galore_layerwise with gradient_accumulation_steps: 2: each parameter steps as soon as its gradient is ready"),
])
def test_galore_refusals(extra, words):
    with pytest.raises(ConfigError) as info:
        build_config({"model_name_or_path": "m", "dataset": "d", "use_galore": True, **extra})
    assert any(line.startswith(words) for line in info.value.problems), info.value.problems


def _stepped(tiny_model_dir, tmp_path, **keys):
    """Build the trainer, take one backward on its first batch and one optimizer step; returns (the trainer, the
    optimizer, {name: a copy of the parameter before the step holding the same gradient})."""
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, **keys))
    model = trainer.model
    hand = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    trainer.batch_loss(model, first_batch(trainer))[0].backward()
    for name, param in model.named_parameters():
        hand[name].grad = param.grad.clone()
    optimizer = trainer.create_optimizer()
    optimizer.step()
    return trainer, optimizer, hand


def _off_adamws_step(trainer, hand, q="model.layers.0.self_attn.q_proj.weight") -> float:
    """How far the step put q from where a plain AdamW step (lr 1e-2, decay 0.1) from the same gradient puts it
    (the frozen reference holds q before the step)."""
    plain = trainer.reference.model.get_parameter(q).detach().clone().requires_grad_(True)
    plain.grad = hand[q].grad.clone()
    torch.optim.AdamW([plain], lr=1e-2, weight_decay=0.1, eps=1e-8).step()
    return (trainer.model.get_parameter(q) - plain).abs().max().item()


def test_apollo_step_equals_apollo_torchs_own_step_on_the_same_gradients(tiny_model_dir, tmp_path):
    """use_apollo: apollo-torch's APOLLOAdamW on GaLore's three groups (LF's), the projection keys in the third.
    Its random projection is seeded by the parameter's position over all groups, so the hand-built optimizer
    lists the parameters in the same order."""
    apollo_torch = pytest.importorskip("apollo_torch")
    keys = dict(finetuning_type="full", use_apollo=True, apollo_target="q_proj,v_proj", apollo_rank=4,
                apollo_update_interval=50, apollo_scale=8.0, apollo_proj="random", apollo_proj_type="std",
                apollo_scale_type="tensor", optim="adamw_torch", learning_rate=1e-2, weight_decay=0.1, max_steps=1)
    trainer, optimizer, hand = _stepped(tiny_model_dir, tmp_path, **keys)
    assert type(optimizer) is apollo_torch.APOLLOAdamW
    projected = [n for n in hand if (".q_proj." in n or ".v_proj." in n) and n.endswith("weight")]
    undecayed = [n for n in hand if n not in projected and ("norm" in n or n.endswith("bias"))]
    decayed = [n for n in hand if n not in projected and n not in undecayed]
    assert len(projected) == 4
    reference = apollo_torch.APOLLOAdamW([
        {"params": [hand[n] for n in undecayed], "weight_decay": 0.0},
        {"params": [hand[n] for n in decayed], "weight_decay": 0.1},
        {"params": [hand[n] for n in projected], "weight_decay": 0.1, "rank": 4, "proj": "random",
         "proj_type": "std", "update_proj_gap": 50, "scale": 8.0, "scale_type": "tensor", "scale_front": False},
    ], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    reference.step()
    for name, param in trainer.model.named_parameters():
        assert torch.allclose(param, hand[name], atol=1e-7, rtol=0), name
    assert _off_adamws_step(trainer, hand) > 1e-3  # APOLLO's step on q is not AdamW's


def test_muon_step_equals_torchs_muon_and_adamw_on_the_same_gradients(tiny_model_dir, tmp_path):
    """use_muon: LF's rule, Muon for the trainable 2-D weights not named embed / lm_head, AdamW for the rest
    (norms; the tiny model ties no head), both at learning_rate with weight_decay on every parameter. The hand
    step: torch.optim.Muon with AdamW-matched RMS (0.2·sqrt(max(rows, cols)), LF's adjust_lr_for_muon) and
    torch.optim.AdamW. A checkpoint's state dict loads back into a fresh optimizer."""
    keys = dict(finetuning_type="full", use_muon=True, learning_rate=1e-2, weight_decay=0.1, max_steps=1,
                adam_beta1=0.8, adam_epsilon=1e-6)
    trainer, optimizer, hand = _stepped(tiny_model_dir, tmp_path, **keys)
    muon_names = [n for n, p in hand.items() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    adamw_names = [n for n in hand if n not in muon_names]
    assert "model.layers.0.self_attn.q_proj.weight" in muon_names and "model.embed_tokens.weight" in adamw_names
    torch.optim.Muon([hand[n] for n in muon_names], lr=1e-2, weight_decay=0.1, momentum=0.95, nesterov=True,
                     ns_steps=5, adjust_lr_fn="match_rms_adamw").step()
    torch.optim.AdamW([hand[n] for n in adamw_names], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.999),
                      eps=1e-6).step()
    for name, param in trainer.model.named_parameters():
        assert torch.allclose(param, hand[name], atol=1e-6, rtol=0), name
    # the 2-D step has Muon's scale: 0.2 sqrt(max(rows, cols)) x lr x an orthogonal matrix (RMS 1/sqrt(max))
    # plus the decay: its RMS is about 0.2 x lr; AdamW's first step moves each weight by lr
    q = "model.layers.0.self_attn.q_proj.weight"
    before = trainer.reference.model.get_parameter(q).detach()
    step_rms = (trainer.model.get_parameter(q) - before * (1 - 1e-2 * 0.1)).pow(2).mean().sqrt()
    assert 0.15e-2 < step_rms < 0.25e-2, step_rms
    # the scheduler's learning rate reaches both optimizers, and the state round-trips
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    assert [g["lr"] for part in optimizer.parts for g in part.param_groups] == [0.5, 0.5]
    state = optimizer.state_dict()
    trainer.optimizer = None
    again = trainer.create_optimizer()
    again.load_state_dict(state)
    buffer = again.parts[0].state[trainer.model.get_parameter(q)]["momentum_buffer"]
    assert torch.equal(buffer, optimizer.parts[0].state[trainer.model.get_parameter(q)]["momentum_buffer"])
    assert again.parts[1].param_groups[0]["lr"] == 0.5


def test_adam_mini_step_equals_adam_minis_own_step_on_the_same_gradients(tiny_model_dir, tmp_path):
    """use_adam_mini: adam-mini's Adam_mini over the named parameters, with the config's hidden size and head
    counts (LF's call); the same call by hand on copies of the parameters steps to the same weights, and
    differently from AdamW (one second moment per block)."""
    adam_mini = pytest.importorskip("adam_mini")
    keys = dict(finetuning_type="full", use_adam_mini=True, learning_rate=1e-2, weight_decay=0.1, max_steps=1)
    trainer, optimizer, hand = _stepped(tiny_model_dir, tmp_path, **keys)
    assert type(optimizer) is adam_mini.Adam_mini
    config = trainer.model.config
    adam_mini.Adam_mini(named_parameters=list(hand.items()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=0.1, model_sharding=False, dim=config.hidden_size,
                        n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
                        verbose=False).step()
    for name, param in trainer.model.named_parameters():
        assert torch.allclose(param, hand[name], atol=1e-7, rtol=0), name
    assert _off_adamws_step(trainer, hand) > 1e-4  # one second moment per block is not AdamW's


def test_layerwise_apollo_step_equals_apollo_torch_stepped_per_parameter(tiny_model_dir, tmp_path):
    """apollo_layerwise alone (no GaLore): LayerWiseDummyOptimizer for the Trainer, and the backward steps each
    parameter with its own APOLLOAdamW (LF's groups: q/v weights with the random rank-4 projection and decay, the
    rest decayed or not) and zeroes its gradient. The hand step: a copy takes the same loss's gradients without
    hooks, then one APOLLOAdamW per parameter with its group's settings steps it (each optimizer holds one
    parameter, so each projection is seeded 0, as in LF's per-parameter build)."""
    apollo_torch = pytest.importorskip("apollo_torch")
    import copy

    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    projection = {"rank": 4, "proj": "random", "proj_type": "std", "update_proj_gap": 50, "scale": 8.0,
                  "scale_type": "tensor", "scale_front": False}
    keys = dict(finetuning_type="full", use_apollo=True, apollo_layerwise=True, apollo_target="q_proj,v_proj",
                apollo_rank=4, apollo_update_interval=50, apollo_scale=8.0, apollo_proj="random",
                apollo_proj_type="std", apollo_scale_type="tensor", optim="adamw_torch", learning_rate=1e-2,
                weight_decay=0.1, max_steps=1)
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, **keys))
    model = trainer.model
    twin = copy.deepcopy(model)
    batch = first_batch(trainer)
    trainer.batch_loss(twin, batch)[0].backward()
    optimizer = trainer.create_optimizer()  # before the backward: the steps run in its hooks
    assert type(optimizer) is LayerWiseDummyOptimizer
    assert {type(o) for o in optimizer.optimizer_dict.values()} == {apollo_torch.APOLLOAdamW}
    trainer.batch_loss(model, batch)[0].backward()
    assert all(p.grad is None for p in model.parameters())  # each hook zeroed its gradient

    q = "model.layers.0.self_attn.q_proj.weight"
    plain = twin.get_parameter(q).detach().clone().requires_grad_(True)
    plain.grad = twin.get_parameter(q).grad.clone()
    torch.optim.AdamW([plain], lr=1e-2, weight_decay=0.1, eps=1e-8).step()
    decay = set(trainer.get_decay_parameter_names(twin))
    projected = 0
    for name, param in twin.named_parameters():
        if (".q_proj." in name or ".v_proj." in name) and name.endswith("weight"):
            group, projected = {"weight_decay": 0.1, **projection}, projected + 1
        else:
            group = {"weight_decay": 0.1 if name in decay else 0.0}
        apollo_torch.APOLLOAdamW([{"params": [param], **group}], lr=1e-2, betas=(0.9, 0.999), eps=1e-8).step()
    assert projected == 4  # 2 layers x (q, v)
    for (name, param), (_, other) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.allclose(param, other, atol=1e-7, rtol=0), name
    # the projected q took APOLLO's step, not AdamW's
    before = trainer.reference.model.get_parameter(q).detach()
    assert (model.get_parameter(q) - before).abs().max() > 1e-4
    assert (model.get_parameter(q) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("extra, words", [
    ({"use_apollo": True, "finetuning_type": "lora"}, "use_apollo with finetuning_type: lora: APOLLO projects"),
    ({"use_apollo": True, "finetuning_type": "full", "apollo_proj": "qr"}, "apollo_proj: 'qr'"),
    ({"use_apollo": True, "use_muon": True, "finetuning_type": "full"}, "use_apollo and use_muon both given"),
    ({"use_muon": True, "loraplus_lr_ratio": 16}, "loraplus_lr_ratio and use_muon both given"),
    ({"use_muon": True, "deepspeed": {"zero_optimization": {"stage": 2}}}, "use_muon with deepspeed: prefalign does not run Muon under DeepSpeed yet"),
    ({"use_apollo": True, "finetuning_type": "full", "optim": "sgd"}, "use_apollo with optim: sgd: prefalign's "
                                                                      "APOLLO is APOLLOAdamW"),
    ({"use_apollo": True, "finetuning_type": "full", "apollo_layerwise": True, "gradient_accumulation_steps": 4},
     "apollo_layerwise with gradient_accumulation_steps: 4"),
])
def test_optimizer_refusals(extra, words):
    with pytest.raises(ConfigError) as info:
        build_config({"model_name_or_path": "m", "dataset": "d", **extra})
    assert any(line.startswith(words) for line in info.value.problems), info.value.problems


def test_badam_layer_steps_equal_badams_own_block_optimizer_on_the_same_gradients(tiny_model_dir, tmp_path):
    """use_badam (layer mode, LF's build): BlockOptimizer over the Trainer's AdamW on the two decay groups, one
    decoder layer trained at a time. Four steps with badam_switch_interval 2, ascending from block 0: BAdam
    switches when (steps taken + 1) % interval == 0, so after step 1 and then every 2 steps: step 1 moves only
    layer 0, steps 2-3 only layer 1, step 4 layer 0 again; embeddings and the final norm never move. A
    BlockOptimizer built by hand on a copy, fed the same gradients, ends at the same weights."""
    badam = pytest.importorskip("badam")
    import copy

    keys = dict(finetuning_type="full", use_badam=True, badam_mode="layer", badam_switch_interval=2,
                badam_start_block=0, badam_switch_mode="ascending", optim="adamw_torch", learning_rate=1e-2,
                weight_decay=0.1, max_steps=4)
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, **keys))
    model = trainer.model
    twin = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is badam.BlockOptimizer
    decay = trainer.get_decay_parameter_names(twin)
    named = list(twin.named_parameters())
    hand = badam.BlockOptimizer(
        base_optimizer=torch.optim.AdamW([{"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
                                          {"params": [p for n, p in named if n in decay], "weight_decay": 0.1}],
                                         lr=1e-2, betas=(0.9, 0.999), eps=1e-8),
        named_parameters_list=named, switch_block_every=2, start_block=0, switch_mode="ascending", verbose=0)
    batch = first_batch(trainer)
    moved = []
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.batch_loss(model, batch)[0].backward()
        for (name, param), (_, other) in zip(model.named_parameters(), twin.named_parameters()):
            other.grad = None if param.grad is None else param.grad.clone()
        optimizer.step()
        hand.step()
        model.zero_grad(set_to_none=True)
        moved.append({n.split(".")[2] if n.startswith("model.layers.") else n
                      for n, p in model.named_parameters() if not torch.equal(p, before[n])})
    assert moved == [{"0"}, {"1"}, {"1"}, {"0"}], moved
    for (name, param), (_, other) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.allclose(param, other, atol=1e-7, rtol=0), name
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(model.get_parameter(name), start[name]), name


@pytest.mark.parametrize("extra, words", [
    ({"finetuning_type": "lora"}, "use_badam with finetuning_type: lora: BAdam trains blocks of the full"),
    ({"finetuning_type": "full", "deepspeed": {"zero_optimization": {"stage": 3}}},
     "use_badam with deepspeed: prefalign does not run BAdam under DeepSpeed yet"),
    ({"finetuning_type": "full", "badam_mode": "rows"}, "badam_mode: 'rows'"),
    ({"finetuning_type": "full", "badam_switch_interval": 0}, "badam_switch_interval: 0 must be at least 1"),
])
def test_badam_refusals(extra, words):
    with pytest.raises(ConfigError) as info:
        build_config({"model_name_or_path": "m", "dataset": "d", "use_badam": True, **extra})
    assert any(line.startswith(words) for line in info.value.problems), info.value.problems


def test_badam_ratio_step_updates_the_masked_share_by_adams_first_step(tiny_model_dir, tmp_path):
    """use_badam, badam_mode ratio (BlockOptimizerRatio, LF's build): the gradient hook keeps badam_update_ratio of
    each weight's entries (adjacent mask from offset 0: flat entries 0..n/2-1 with ratio 0.5), and the sparse AdamW
    step moves those by Adam's first step with eps added before the bias correction (as torch's SparseAdam):
    lr·sqrt(1-β2)/(1-β1) · (1-β1)g / (sqrt(1-β2)|g| + eps) = lr·g/(|g| + eps/sqrt(1-β2)); no weight decay (BAdam's
    sparse step applies none); the other entries do not move; the embeddings (which the tiny model ties to its head) stay frozen."""
    pytest.importorskip("badam")
    keys = dict(finetuning_type="full", use_badam=True, badam_mode="ratio", badam_update_ratio=0.5,
                badam_mask_mode="adjacent", learning_rate=1e-2, weight_decay=0.1, max_steps=1)
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, **keys))
    model = trainer.model
    q = "model.layers.0.self_attn.q_proj.weight"
    before = model.get_parameter(q).detach().clone()
    optimizer = trainer.create_optimizer()  # before the backward: its hooks sparsify the gradients
    trainer.batch_loss(model, first_batch(trainer))[0].backward()
    grad = model.get_parameter(q).grad.to_dense().flatten()
    optimizer.step()
    half = before.numel() // 2
    step = (before.flatten() - model.get_parameter(q).detach().flatten())
    assert torch.equal(step[half:], torch.zeros_like(step[half:]))
    expected = 1e-2 * grad[:half] / (grad[:half].abs() + 1e-8 / 0.001 ** 0.5)
    assert torch.allclose(step[:half], expected, atol=1e-6, rtol=0)
    assert (step[:half] != 0).float().mean() > 0.9
    assert model.get_parameter("model.embed_tokens.weight").grad is None
