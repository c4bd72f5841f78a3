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


@pytest.mark.parametrize("extra, words", [
    ({"finetuning_type": "lora"}, "use_galore with finetuning_type: lora: GaLore projects the gradients of full"),
    ({"finetuning_type": "full", "optim": "sgd"}, "use_galore with optim: sgd: prefalign's GaLore is GaLoreAdamW"),
    ({"finetuning_type": "full", "galore_layerwise": True}, "galore_layerwise: layer-wise GaLore is a LLaMA-Factory "
                                                            "feature prefalign does not support yet"),
])
def test_galore_refusals(extra, words):
    with pytest.raises(ConfigError) as info:
        build_config({"model_name_or_path": "m", "dataset": "d", "use_galore": True, **extra})
    assert any(line.startswith(words) for line in info.value.problems), info.value.problems
