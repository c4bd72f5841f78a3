"""modeling/fused_mlp: the gated MLP's `silu(gate) * up` as one node that keeps two tensors, not three.

Outputs and gradients are compared with the same model run by transformers' own eager MLP forward
(bitwise: the fused node runs the same operators on the same values), and the memory it frees is
counted with autograd's saved-tensor hooks, not timed."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from prefalign.modeling import fused_mlp

LAYERS, HIDDEN, INTERMEDIATE, VOCAB = 2, 32, 88, 50


def tiny(family="llama", act="silu", seed=0):
    torch.manual_seed(seed)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    config = config_class(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, hidden_act=act)
    return model_class(config).float()


def lora(model):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    for name, p in model.named_parameters():  # a nonzero B, so the adapter changes the forward
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def run(model, ids, weights):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_outputs_and_gradients_are_the_eager_ones_bitwise(family, tuning):
    eager = tiny(family)
    if tuning == "lora":
        eager = lora(eager)
    fused = copy.deepcopy(eager)
    assert fused_mlp.install(fused) == LAYERS
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 11, VOCAB, generator=torch.Generator().manual_seed(2))
    logits_e, grads_e = run(eager, ids, weights)
    logits_f, grads_f = run(fused, ids, weights)
    assert torch.equal(logits_e, logits_f)
    assert grads_e.keys() == grads_f.keys() and grads_e
    for name in grads_e:
        assert torch.equal(grads_e[name], grads_f[name]), name
    if tuning == "lora":
        assert all("lora" in n for n in grads_f)


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one forward."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(seen.values())


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_one_intermediate_tensor_per_layer_and_position_is_not_kept(tuning):
    eager = tiny()
    if tuning == "lora":
        eager = lora(eager)
    fused = copy.deepcopy(eager)
    fused_mlp.install(fused)
    batch, seq = 2, 9
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))
    freed = saved_bytes(eager, ids) - saved_bytes(fused, ids)
    assert freed == LAYERS * batch * seq * INTERMEDIATE * 4  # silu(gate), fp32


def test_no_grad_forward_is_the_eager_one():
    eager = tiny()
    fused = copy.deepcopy(eager)
    fused_mlp.install(fused)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(eager(input_ids=ids).logits, fused(input_ids=ids).logits)


def test_only_the_exact_gated_silu_line_is_replaced():
    assert fused_mlp._is_gated_mlp(LlamaMLP)
    assert not fused_mlp._is_gated_mlp(GPT2MLP)  # fc -> act -> proj -> dropout

    class ScaledMLP(LlamaMLP):  # same modules, a different forward: left alone
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 0.5

    class DocumentedMLP(LlamaMLP):
        def forward(self, hidden):
            """The same line under another argument name and a docstring."""
            return self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))

    assert not fused_mlp._is_gated_mlp(ScaledMLP)
    assert fused_mlp._is_gated_mlp(DocumentedMLP)
    assert fused_mlp.install(tiny(act="gelu")) == 0  # another activation: nothing replaced
    model = tiny()
    model.model.layers[0].mlp.__class__ = ScaledMLP
    assert fused_mlp.install(model) == LAYERS - 1
