"""Response-only, chunked log-probs against hand-computed values and the naive computation."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefalign.data.collate import PairCollator
from prefalign.modeling.logprobs import pair_logps

FEATURES = [
    {"prompt_ids": [3, 4, 5], "chosen_ids": [6, 7], "rejected_ids": [8, 9, 10], "index": 0},
    {"prompt_ids": [3, 11], "chosen_ids": [12, 13, 14, 15], "rejected_ids": [16], "index": 1},
]


def tiny_llama(vocab=32, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


def naive_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return token.sum(-1), mask.sum(-1)


def test_uniform_model_gives_minus_n_log_v():
    """A zero output head makes every token's probability 1/V: a response of n tokens has log-prob -n·ln V.

    V=32: chosen lengths 2 and 4 -> -2 ln 32 = -6.9315, -4 ln 32 = -13.8629; rejected 3 and 1.
    """
    model = tiny_llama()
    torch.nn.init.zeros_(model.lm_head.weight)
    out = pair_logps(model, PairCollator(0)(FEATURES))
    expected_c = torch.tensor([-2 * math.log(32), -4 * math.log(32)])
    expected_r = torch.tensor([-3 * math.log(32), -1 * math.log(32)])
    assert torch.allclose(out.chosen, expected_c, atol=1e-5)
    assert torch.allclose(out.rejected, expected_r, atol=1e-5)
    assert out.chosen_tokens.tolist() == [2, 4] and out.rejected_tokens.tolist() == [3, 1]


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_chunked_equals_naive_values_and_gradients(chunk_size):
    model = tiny_llama()
    batch = PairCollator(0)(FEATURES)
    out = pair_logps(model, batch, chunk_size=chunk_size)
    (out.chosen.sum() - 0.5 * out.rejected.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sums, _ = naive_logps(model, batch)
    (sums[:2].sum() - 0.5 * sums[2:].sum()).backward()
    assert torch.allclose(torch.cat([out.chosen, out.rejected]), sums, atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-5), name


def test_token_level_extras_are_left_aligned():
    model = tiny_llama()
    batch = PairCollator(0)(FEATURES)
    out = pair_logps(model, batch, token_level=True, want_sqnorm=True)
    assert out.extras["chosen_mask"].tolist() == [[True, True, False, False], [True, True, True, True]]
    assert torch.allclose(out.extras["chosen_token_logps"].sum(1), out.chosen, atol=1e-6)
    assert torch.allclose(out.extras["rejected_token_logps"].sum(1), out.rejected, atol=1e-6)
    # log Σ_v p(v)² lies in [-ln V, 0]
    sq = out.extras["chosen_token_sqnorm"][out.extras["chosen_mask"]]
    assert (sq <= 1e-6).all() and (sq >= -math.log(32) - 1e-5).all()
