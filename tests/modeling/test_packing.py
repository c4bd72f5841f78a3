"""Packed batches (data/packing.py, modeling/packed_attention.py) against a plain computation:
each sequence run alone through the model, no padding, no mask, log-softmax summed by hand."""

import pytest
import torch
from helpers import PLAIN, config_for, make_random_adapter
from test_speed_paths import FEATURES, assert_grads_close, grads_of, objective, tiny_llama
from transformers import Qwen2Config, Qwen2ForCausalLM

from prefalign.contracts import BatchLayout
from prefalign.data.collate import PairCollator, PrefixSharedCollator
from prefalign.data.packing import PackedCollator, assign_rows
from prefalign.modeling.logprobs import pair_logps
from prefalign.modeling.throughput import ModelShape, ThroughputMeter, batch_counts, forward_passes


def tiny_qwen2(seed=0):
    """Tied embeddings, grouped-query attention, biases on q/k/v: what the 150k-vocabulary models have."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).float()


def plain_logps(model, features):
    """Summed reply log-probs, each sequence alone: (chosen (B,), rejected (B,)), differentiable."""
    sums = {"chosen_ids": [], "rejected_ids": []}
    for side in sums:
        for f in features:
            ids = torch.tensor([f["prompt_ids"] + f[side]])
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            token = logps.gather(-1, targets[:, None]).squeeze(-1)
            sums[side].append(token[len(f["prompt_ids"]) - 1:].sum())
    return torch.stack(sums["chosen_ids"]), torch.stack(sums["rejected_ids"])


def plain_objective(model, features):
    chosen, rejected = plain_logps(model, features)
    return chosen.sum() - 0.7 * rejected.sum()


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2, lambda: tiny_llama(attn="eager")],
                         ids=["llama-sdpa", "qwen2-tied-gqa", "llama-eager"])
@pytest.mark.parametrize("prefix_sharing", [False, True])
@pytest.mark.parametrize("packing_length", [0, 12])
def test_packed_equals_each_sequence_alone_values_and_gradients(make_model, prefix_sharing, packing_length):
    model = make_model()
    chosen, rejected = plain_logps(model, FEATURES)
    plain_grads = grads_of(model, plain_objective(model, FEATURES))
    batch = PackedCollator(0, prefix_sharing=prefix_sharing, packing_length=packing_length)(FEATURES)
    out = pair_logps(model, batch)
    assert torch.allclose(out.chosen, chosen, atol=1e-5) and torch.allclose(out.rejected, rejected, atol=1e-5)
    assert out.chosen_tokens.tolist() == [len(f["chosen_ids"]) for f in FEATURES]
    assert out.rejected_tokens.tolist() == [len(f["rejected_ids"]) for f in FEATURES]
    assert_grads_close(grads_of(model, objective(out)), plain_grads)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_packed_per_token_extras_match_the_padded_path(prefix_sharing):
    """LD-DPO / WPO read per-token values: the same, in the same order, as the concatenated layout."""
    model = tiny_llama()
    padded = pair_logps(model, PairCollator(0)(FEATURES), token_level=True, want_sqnorm=True)
    packed = pair_logps(model, PackedCollator(0, prefix_sharing=prefix_sharing)(FEATURES), token_level=True,
                        want_sqnorm=True)
    assert packed.extras.keys() == padded.extras.keys()
    for key in padded.extras:
        assert torch.allclose(packed.extras[key].float(), padded.extras[key].float(), atol=1e-5), key
    for field in ("chosen_mean_logit", "rejected_mean_logit"):
        assert torch.allclose(getattr(packed, field), getattr(padded, field), atol=1e-5)


def test_a_pair_never_sees_another_pair():
    """Changing pair 0's tokens changes no log-prob of pairs 1 and 2 in the same packed row."""
    model = tiny_llama()
    before = pair_logps(model, PackedCollator(0, prefix_sharing=True)(FEATURES))
    changed = [dict(FEATURES[0], prompt_ids=[30, 31, 32, 33, 34], chosen_ids=[35, 36])] + FEATURES[1:]
    after = pair_logps(model, PackedCollator(0, prefix_sharing=True)(changed))
    assert not torch.allclose(after.chosen[0], before.chosen[0])
    assert torch.allclose(after.chosen[1:], before.chosen[1:]) and torch.allclose(after.rejected[1:], before.rejected[1:])


def test_layout_no_padding_by_default_and_rows_within_the_budget():
    batch = PackedCollator(0, prefix_sharing=True)(FEATURES)
    assert batch["layout"] is BatchLayout.PACKED and batch["input_ids"].shape[0] == 1
    assert (batch["pair_ids"] >= 0).all()  # one row, nothing padded
    # prefix-shared blocks are 5+2+1+3 = 11, 2+4+1+1 = 8 and 1+3+1+2 = 7 tokens long
    assert assign_rows([11, 8, 7], 15) == [[0], [1, 2]]
    assert assign_rows([11, 8, 7], 0) == [[0, 1, 2]]
    assert assign_rows([20, 3], 10) == [[0], [1]]  # longer than the budget: a row of its own, not cut
    long = PackedCollator(0, prefix_sharing=True, packing_length=4)(FEATURES)
    assert long["input_ids"].shape == (3, 11)
    assert sorted((long["pair_ids"] == i).sum().item() for i in range(3)) == [7, 8, 11]
    # positions restart at each sequence; the rejected reply continues the prompt
    row = batch["position_ids"][0].tolist()
    assert row[:11] == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7]


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt of at least one token"):
        PackedCollator(0)([{"prompt_ids": [], "chosen_ids": [1], "rejected_ids": [2]}])


def test_counts_and_padding_fraction_by_layout():
    """Pair 0: prompt 5, chosen 2, rejected 3. Concatenated rows: 7 and 8 tokens, padded to 8."""
    one = FEATURES[:1]
    concat = batch_counts(PairCollator(0)(one))
    assert concat == {"positions": 16.0, "scored": 5.0, "tokens": 15.0, "attended": 7 * 8 / 2 + 8 * 9 / 2}
    packed = batch_counts(PackedCollator(0, prefix_sharing=True)(one))
    # shared 4 + chosen 3 = 7 causal, then rejected 4 attending the 4 shared tokens and itself
    assert packed == {"positions": 11.0, "scored": 5.0, "tokens": 11.0, "attended": 7 * 8 / 2 + 4 * 5 / 2 + 4 * 4}
    shared = batch_counts(PrefixSharedCollator(0)(one))
    assert shared == packed


def test_meter_reports_padding_and_an_mfu_from_the_counts():
    model = tiny_llama()
    shape = ModelShape.of(model)
    # decoder: 2 layers x (q 32x32, k/v 32x16, o 32x32, mlp 3 x 32x64, 2 norms of 32) + the final norm
    assert shape.decoder_params == 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32) + 32
    # full tuning against a live reference: forward + backward (2 forwards) + the reference's forward
    assert forward_passes(backward=True, trains_weights=True, live_reference=True) == 4.0
    assert forward_passes(backward=True, trains_weights=False, live_reference=False) == 2.0
    meter = ThroughputMeter(shape, passes=3.0, peak=1e9)
    meter.add(PairCollator(0)(FEATURES))
    report = meter.report()
    # rows: 7, 6, 4 (chosen) and 8, 3, 3 (rejected) tokens of 6 rows x 8 positions
    assert report["throughput/padding_fraction"] == pytest.approx(1 - 31 / 48)
    assert report["throughput/tokens_per_second"] > 0 and 0 < report["throughput/mfu"]
    assert meter.report() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention 2 needs a CUDA GPU")
def test_flash_attention_padding_free_path_on_gpu():
    pytest.importorskip("flash_attn", reason="the flash-attn package is not installed")
    model = tiny_llama(attn="flash_attention_2").cuda().to(torch.bfloat16)
    reference = tiny_llama().cuda().to(torch.bfloat16)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in PackedCollator(0)(FEATURES).items()}
    padded = {k: v.cuda() for k, v in PairCollator(0)(FEATURES).items()}
    out, ref = pair_logps(model, batch), pair_logps(reference, padded)
    assert torch.allclose(out.chosen.float(), ref.chosen.float(), rtol=0.02, atol=0.2)


# -- through the trainer, eval and the precomputed reference --------------------------------------------
def _logged(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_logged_throughput_counts_the_time_of_the_forwards(tiny_model_dir, tmp_path):
    """The meter's clock covers each step's forwards: with every decoder forward slowed by 0.1 s (the
    policy's and the adapter-off reference's, 2 per micro-batch), the logged tokens/s is at most the
    step's tokens over that time, and the MFU-style figure below 1."""
    import time

    from prefalign.train.workflow import build_trainer

    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, max_steps=2, per_device_train_batch_size=2,
                                       gradient_accumulation_steps=2, max_samples=8,
                                       train_sampling_strategy="sequential"))
    pause = 0.1
    decoder = trainer.model.get_base_model().get_decoder()
    decoder.register_forward_pre_hook(lambda module, args, kwargs: time.sleep(pause), with_kwargs=True)
    collate = trainer.data_collator
    step_tokens = [sum(batch_counts(collate([trainer.train_dataset[i] for i in range(j, j + 2)]))["tokens"]
                       for j in (start, start + 2)) for start in (0, 4)]
    trainer.train()
    logs = _logged(trainer)
    assert len(logs) == 2
    for log, tokens in zip(logs, step_tokens):
        assert 0 < log["throughput/tokens_per_second"] <= tokens / (2 * 2 * pause)
        assert 0 < log["throughput/mfu"] < 1


@pytest.mark.slow
def test_packed_training_logs_the_padded_losses_under_accumulation(tiny_model_dir, tmp_path):
    """Full tuning, 2 pairs x accumulation 2, packed (with prefix sharing) vs padded: the same logged
    losses and metrics step after step, and the throughput figures in every training log."""
    from prefalign.train.workflow import build_trainer

    logs, models = {}, {}
    for name, keys in (("padded", PLAIN), ("packed", {"packing": True, "prefix_sharing": True})):
        trainer = build_trainer(config_for(tiny_model_dir, tmp_path / name, finetuning_type="full", max_steps=2,
                                           per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                           max_samples=8, train_sampling_strategy="sequential", **keys))
        assert isinstance(trainer.data_collator, PackedCollator) == (name == "packed")
        trainer.train()
        logs[name], models[name] = _logged(trainer), trainer.model
    assert len(logs["packed"]) == len(logs["padded"]) == 2
    for padded, packed in zip(logs["padded"], logs["packed"]):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen"):
            assert packed[key] == pytest.approx(padded[key], abs=1e-5), key
        assert packed["throughput/padding_fraction"] == 0.0 < padded["throughput/padding_fraction"]
        assert packed["throughput/tokens_per_second"] > 0 and packed["throughput/mfu"] > 0
    for (name, a), b in zip(models["padded"].named_parameters(), models["packed"].parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.slow
def test_packed_eval_and_precomputed_reference_match_the_padded_run(tiny_model_dir, tmp_path):
    """`prefalign eval` with packing scores every pair as the padded layout does; a precomputed
    reference built from packed batches is looked up by pair index like any other."""
    import json

    from test_evaluate import read_rows, write_config

    from prefalign.cli import main

    adapter = make_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    rows = {}
    for name, keys in (("padded", PLAIN), ("packed", {"packing": True, "prefix_sharing": False, "packing_length": 64}),
                       ("packed_shared", {"packing": True, "prefix_sharing": True})):
        cfg = write_config(tmp_path / f"{name}.yaml", model_name_or_path=tiny_model_dir,
                           adapter_name_or_path=adapter, output_dir=str(tmp_path / name), **keys)
        assert main(["eval", cfg]) == 0
        rows[name] = read_rows(tmp_path / name)
        results = json.loads((tmp_path / name / "eval_results.json").read_text())
        assert results["eval_throughput/tokens_per_second"] > 0
    for name in ("packed", "packed_shared"):
        assert [r["index"] for r in rows[name]] == [r["index"] for r in rows["padded"]]
        for a, b in zip(rows[name], rows["padded"]):
            for key in ("policy_chosen_logps", "policy_rejected_logps", "reference_rejected_logps", "loss"):
                assert a[key] == pytest.approx(b[key], abs=1e-4), (name, key)

    from prefalign.train.workflow import build_trainer

    losses = {}
    for precompute in (False, True):
        trainer = build_trainer(config_for(tiny_model_dir, tmp_path / f"pre{precompute}", packing=True,
                                           precompute_ref_log_probs=precompute, max_steps=2,
                                           per_device_train_batch_size=3))
        trainer.train()
        losses[precompute] = [h["loss"] for h in _logged(trainer)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_packed_with_gradient_checkpointing_gives_the_same_gradients():
    """A checkpointed layer is recomputed in the backward pass, after pair_logps returned: it must
    attend span by span again (the spans travel with the layer's saved keyword arguments)."""
    model = tiny_llama()
    plain = grads_of(model, plain_objective(model, FEATURES))
    model.activation_checkpointing_enable()
    model.train()
    assert model.model.gradient_checkpointing
    out = pair_logps(model, PackedCollator(0, prefix_sharing=True)(FEATURES))
    assert_grads_close(grads_of(model, objective(out)), plain)


def test_a_packed_batch_cut_apart_on_its_way_is_refused():
    """accelerate's dispatch once sliced every tensor of a streamed batch to the first one's rows: a packed
    row of 4 pairs kept its first span of 8, and the rest of the row silently attended nowhere."""
    batch = PackedCollator(0)(FEATURES)
    assert batch["input_ids"].shape[0] == 1 and batch["spans"].shape[0] == 2 * len(FEATURES)
    with pytest.raises(ValueError, match=r"packed spans cover \[\d+\] tokens of rows holding \[\d+\]"):
        pair_logps(tiny_llama(), {**batch, "spans": batch["spans"][:1]})


def _plain_prefix_reply_attention(q, kp, vp, kr, vr):
    """softmax(q kᵀ / √d + mask) v in fp64, KV heads repeated, the mask written out: every prompt key, the
    reply's own keys causally."""
    groups = q.shape[1] // kp.shape[1]
    k = torch.cat([kp, kr], 2).double().repeat_interleave(groups, 1)
    v = torch.cat([vp, vr], 2).double().repeat_interleave(groups, 1)
    prompt, reply = kp.shape[2], kr.shape[2]
    allowed = torch.ones(reply, prompt + reply, dtype=torch.bool)
    allowed[:, prompt:] = torch.ones(reply, reply, dtype=torch.bool).tril()
    scores = (q.double() @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("prompt,reply,heads,kv_heads", [(1, 1, 2, 2), (7, 3, 4, 2), (3, 19, 6, 2), (40, 25, 3, 1)])
def test_prefix_reply_attention_equals_the_masked_softmax(prompt, reply, heads, kv_heads):
    """The two merged flash calls give the plain masked attention's output and all five gradients."""
    from prefalign.modeling.packed_attention import PrefixReplyAttention

    torch.manual_seed(prompt + reply)
    shapes = [(1, heads, reply), (1, kv_heads, prompt), (1, kv_heads, prompt), (1, kv_heads, reply), (1, kv_heads, reply)]
    inputs = [torch.randn(*shape, 16, requires_grad=True) for shape in shapes]
    upstream = torch.randn(1, heads, reply, 16)
    expected = _plain_prefix_reply_attention(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs, upstream.double())
    out = PrefixReplyAttention.apply(*inputs, None)
    grads = torch.autograd.grad(out, inputs, upstream)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_a_prefix_shared_reply_keeps_no_mask_for_the_backward():
    """A reply of R tokens after a prompt of P keeps nothing of R x (P + R) elements per layer (sdpa kept its
    float copy of the boolean mask: memory in the square of a long pair's length)."""
    from prefalign.modeling.packed_attention import PackedSpans, packed_attention

    prompt, reply, heads = 48, 40, 4
    spans = PackedSpans(torch.tensor([[0, 0, prompt, 0, 0], [0, prompt, prompt + reply, 0, prompt]]),
                        [prompt + reply])
    query, key, value = (torch.randn(1, heads, prompt + reply, 8, requires_grad=True) for _ in range(3))
    saved = []

    def keep(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out, _ = packed_attention(None, query, key, value, None, packed_spans=spans)
    assert saved and reply * (prompt + reply) not in saved
    out.sum().backward()  # and the kept tensors are enough for the backward
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (query, key, value))
