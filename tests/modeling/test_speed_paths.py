"""Every speed path against the plain computation: the fused log-prob kernel, prefix sharing,
length grouping, gradient checkpointing, and a DDP-wrapped policy (no silent gradient desync)."""

import math

import helpers
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefalign.contracts import IGNORE_INDEX, batch_to
from prefalign.data.collate import (
    PairCollator,
    PrefixSharedCollator,
    pack_pair,
)
from prefalign.modeling import logprobs
from prefalign.modeling.logprobs import _FusedResponseLogps, pair_logps
from prefalign.modeling.prefix import shared_prefix_attention_mask


# varied lengths, so both layouts pad; the last pair has a one-token prompt (no shared segment)
FEATURES = [
    {"prompt_ids": [3, 4, 5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12], "index": 0},
    {"prompt_ids": [3, 13], "chosen_ids": [14, 15, 16, 17], "rejected_ids": [18], "index": 1},
    {"prompt_ids": [19], "chosen_ids": [20, 21, 22], "rejected_ids": [23, 24], "index": 2},
]


def tiny_llama(vocab=40, seed=0, attn="sdpa", **config):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **config)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).float()


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def objective(out):
    """A loss reading chosen and rejected differently, so a mix-up of the two changes gradients."""
    return out.chosen.sum() - 0.7 * out.rejected.sum()


def assert_grads_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), (name, (a[name] - b[name]).abs().max())


# -- the fused kernel -------------------------------------------------------------------------------
def naive(hidden, weight, bias, targets, softcap=None, scale=None):
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    elif scale:
        logits = logits * scale
    logps = torch.log_softmax(logits, -1)
    token = logps.gather(-1, targets[:, None]).squeeze(-1)
    sqnorm = torch.logsumexp(2 * logps, -1)
    return token, logits.sum(-1), sqnorm


@pytest.mark.parametrize("transform", [{}, {"softcap": 3.0}, {"scale": 0.5}])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [13, 0])
def test_fused_kernel_equals_naive_values_and_gradients(monkeypatch, transform, with_bias, rows):
    """Tiles of 5 rows x 7 vocabulary columns over V=30 (a partial last tile) against autograd on full logits;
    with no rows at all, every gradient is zero (as autograd's), not whatever the weight's buffer held."""
    monkeypatch.setattr(logprobs, "VOCAB_BLOCK", {"cpu": 7})
    torch.manual_seed(0)
    hidden = torch.randn(rows, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    bias = torch.randn(30, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 30, (rows,))
    upstream = torch.randn(rows)
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    token, sums, sqnorm = _FusedResponseLogps.apply(hidden, weight, bias, targets, 5, transform.get("softcap"),
                                                    transform.get("scale"), True)
    fused_grads = torch.autograd.grad((token * upstream).sum(), inputs)
    n_token, n_sums, n_sqnorm = naive(hidden, weight, bias, targets, **transform)
    naive_grads = torch.autograd.grad((n_token * upstream).sum(), inputs)
    assert torch.allclose(token, n_token, atol=1e-5)
    assert torch.allclose(sums, n_sums.detach(), atol=1e-4)
    assert torch.allclose(sqnorm, n_sqnorm.detach(), atol=1e-5)
    for fused, plain in zip(fused_grads, naive_grads):
        assert torch.allclose(fused, plain, atol=1e-5)


@pytest.mark.parametrize("scale", [None, 0.5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_head_forms_the_input_gradient_in_the_forward(monkeypatch, scale, with_bias):
    """A frozen head (LoRA's): the hidden states' gradient equals autograd's on full logits, and the backward
    runs no matmul at all (the forward formed w_t - E_softmax[w]; a recompute of the tiles would show as mm)."""
    monkeypatch.setattr(logprobs, "VOCAB_BLOCK", {"cpu": 7})
    torch.manual_seed(1)
    hidden = torch.randn(13, 16, requires_grad=True)
    weight, bias = torch.randn(30, 16), (torch.randn(30) if with_bias else None)
    targets, upstream = torch.randint(0, 30, (13,)), torch.randn(13)

    token, _, _ = _FusedResponseLogps.apply(hidden, weight, bias, targets, 5, None, scale, False, True)
    with torch.profiler.profile() as prof:
        (fused,) = torch.autograd.grad((token * upstream).sum(), [hidden])
    matmuls = [e.key for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")]
    n_token, _, _ = naive(hidden, weight, bias, targets, scale=scale)
    (plain,) = torch.autograd.grad((n_token * upstream).sum(), [hidden])
    assert torch.allclose(token, n_token, atol=1e-5)
    assert torch.allclose(fused, plain, atol=1e-5)
    assert matmuls == []


def test_head_that_is_not_a_plain_linear_takes_the_module_path_with_the_same_result():
    """A LoRA-wrapped head must be called as a module (its weight alone would drop the adapter)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    batch = PairCollator(0)(FEATURES)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    assert not logprobs._fusable_head(model.get_output_embeddings())
    out = pair_logps(model, batch, chunk_size=4)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    sums = (token * (labels != IGNORE_INDEX)).sum(-1)
    assert torch.allclose(torch.cat([out.chosen, out.rejected]), sums, atol=1e-5)


# -- prefix sharing -----------------------------------------------------------------------------------
def test_packed_row_layout():
    """[p0 p1 p2 | c0 c1 | p2 r0]: the rejected segment restarts at the prompt's last position."""
    packed = pack_pair([5, 6, 7], [8, 9], [10])
    assert packed["input_ids"] == [5, 6, 7, 8, 9, 7, 10]
    assert packed["labels"] == [-100, -100, -100, 8, 9, -100, 10]
    assert packed["segment_ids"] == [0, 0, 1, 1, 1, 2, 2]
    assert packed["position_ids"] == [0, 1, 2, 3, 4, 2, 3]


def test_rejected_tokens_cannot_see_the_chosen_reply():
    segments = PrefixSharedCollator(0)(FEATURES[:1])["segment_ids"]
    mask = shared_prefix_attention_mask(segments, "sdpa")[0, 0]
    # row 0: prompt 0..3 shared, 4 = p4 + chosen 5,6 (segment 1), 7 = p4 copy + rejected 8..10 (segment 2)
    assert mask[8, :4].all() and not mask[8, 4:7].any() and mask[8, 7:9].all() and not mask[8, 9:].any()
    assert mask[6, :7].all() and not mask[6, 7:].any()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("token_level", [False, True])
def test_prefix_shared_equals_concatenated_values_and_gradients(attn, token_level):
    model = tiny_llama(attn=attn)
    concat = pair_logps(model, PairCollator(0)(FEATURES), token_level=token_level, want_sqnorm=token_level)
    concat_grads = grads_of(model, objective(concat))
    shared = pair_logps(model, PrefixSharedCollator(0)(FEATURES), token_level=token_level, want_sqnorm=token_level)
    shared_grads = grads_of(model, objective(shared))
    for field in ("chosen", "rejected", "chosen_tokens", "rejected_tokens", "chosen_mean_logit", "rejected_mean_logit"):
        assert torch.allclose(getattr(shared, field), getattr(concat, field), atol=1e-5), field
    assert shared.extras.keys() == concat.extras.keys()
    for key in concat.extras:
        assert torch.allclose(shared.extras[key].float(), concat.extras[key].float(), atol=1e-5), key
    assert_grads_close(shared_grads, concat_grads)


# -- trainer-level paths --------------------------------------------------------------------------------
def config_for(model_dir, out, **overrides):
    return helpers.config_for(model_dir, out, **{"max_steps": 2, "max_samples": 24, **overrides})


def _first_batch_loss_and_grads(trainer):
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    order = batch["index"].argsort()  # compare pair by pair, whatever the layout
    loss, out, _ = trainer.batch_loss(model, batch)
    grads = grads_of(model, loss)
    return loss.item(), out.losses.detach()[order], grads


def test_training_with_prefix_sharing_logs_the_same_losses(tiny_model_dir, tmp_path):
    """Full tuning (every weight, embeddings included, gets a gradient); LoRA is the same forward."""
    from prefalign.train.workflow import build_trainer

    logs = {}
    for sharing in (False, True):
        trainer = build_trainer(config_for(tiny_model_dir, tmp_path / str(sharing), finetuning_type="full",
                                           packing=False, prefix_sharing=sharing))
        assert isinstance(trainer.data_collator, PrefixSharedCollator) == sharing
        trainer.train()
        logs[sharing] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs[True]) == len(logs[False]) == 2
    for plain, shared in zip(logs[False], logs[True]):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert shared[key] == pytest.approx(plain[key], abs=1e-5), key


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, tmp_path):
    from prefalign.train.workflow import build_trainer

    results = []
    for checkpointing in (False, True):
        trainer = build_trainer(config_for(tiny_model_dir, tmp_path / str(checkpointing),
                                           activation_checkpointing=checkpointing))
        if checkpointing:  # the Trainer turns it on when training starts; do the same here
            trainer.model.activation_checkpointing_enable()
            trainer.model.train()
            assert trainer.model.base_model.model.model.gradient_checkpointing
        results.append(_first_batch_loss_and_grads(trainer))
    (loss_a, losses_a, grads_a), (loss_b, losses_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6) and torch.allclose(losses_a, losses_b, atol=1e-6)
    assert grads_a and all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6) for n in grads_a)


def test_bf16_mixed_precision_through_the_trainer_keys(tiny_model_dir, tmp_path):
    """`bf16: true` (on a CPU also `use_cpu: true`): autocast runs the head's tiles in bf16, the
    log-probs stay fp32 and within bf16 rounding of the fp32 ones; the policy starts at the reference."""
    from prefalign.train.workflow import build_trainer

    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, bf16=True, use_cpu=True, finetuning_type="full",
                                       prefix_sharing=True))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    exact = pair_logps(trainer.model, batch)
    with trainer.compute_loss_context_manager(), trainer.accelerator.autocast():
        assert logprobs._compute_dtype(torch.zeros(1), trainer.model.lm_head.weight) == torch.bfloat16
        mixed = pair_logps(trainer.model, batch)
    assert mixed.chosen.dtype == torch.float32 and not torch.equal(mixed.chosen, exact.chosen)
    assert torch.allclose(mixed.chosen, exact.chosen, rtol=0.01)
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def _pad_tokens(trainer) -> int:
    return sum(int((batch["attention_mask"] == 0).sum()) for batch in trainer.get_train_dataloader())


def test_group_by_length_cuts_padding(tiny_model_dir, tmp_path):
    """The demo pairs vary in length; batches of similar lengths pad less than random ones."""
    from prefalign.train.workflow import build_trainer

    pads = {}
    for strategy in ("random", "group_by_length"):
        trainer = build_trainer(config_for(tiny_model_dir, tmp_path / strategy, max_samples=200,
                                           train_sampling_strategy=strategy, **helpers.PLAIN))  # packing pads nothing
        pads[strategy] = _pad_tokens(trainer)
        if strategy == "group_by_length":
            assert "length" in trainer.train_dataset.column_names
    assert pads["group_by_length"] < 0.6 * pads["random"], pads


# -- DDP: the wrapper's forward must run ------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, results):
    from torch.nn.parallel import DistributedDataParallel

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_llama()
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        calls = []
        ddp.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
        # each rank scores a different pair: only an all-reduce makes the gradients equal
        out = pair_logps(ddp, PairCollator(0)([FEATURES[rank]]))
        objective(out).backward()
        results[rank] = {"calls": len(calls), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_wrapped_policy_runs_through_ddp_and_syncs_gradients(tmp_path):
    """Two gloo processes, each with a different pair: after backward both hold the averaged gradient.

    Calling the inner model's decoder directly would skip DDP.forward, and each process would keep
    its own gradient (a silent desync); so the test also checks DDP.forward ran.
    """
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    model = tiny_llama()  # the same seed: the unwrapped reference computation
    expected = []
    for rank in range(2):
        expected.append(grads_of(model, objective(pair_logps(model, PairCollator(0)([FEATURES[rank]])))))
    for name, grad in results[0]["grads"].items():
        average = (expected[0][name] + expected[1][name]) / 2
        assert torch.allclose(grad, results[1]["grads"][name], atol=1e-6), name
        assert torch.allclose(grad, average, atol=1e-5), name
    assert any(not torch.allclose(expected[0][n], expected[1][n]) for n in expected[0])
    assert results[0]["calls"] == results[1]["calls"] == 1


# -- GPU-only paths ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast and flash attention need a CUDA GPU")
def test_bf16_autocast_on_gpu_stays_close_to_fp32():
    model = tiny_llama().cuda()
    batch = batch_to(PrefixSharedCollator(0)(FEATURES), "cuda")
    exact = pair_logps(model, batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = pair_logps(model, batch)
    assert mixed.chosen.dtype == torch.float32
    assert torch.allclose(mixed.chosen, exact.chosen, rtol=0.02, atol=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention 2 needs a CUDA GPU")
def test_flash_attention_concatenated_path_on_gpu():
    pytest.importorskip("flash_attn", reason="the flash-attn package is not installed")
    model = tiny_llama(attn="flash_attention_2").cuda().to(torch.bfloat16)
    batch = batch_to(PairCollator(0)(FEATURES), "cuda")
    reference = tiny_llama().cuda().to(torch.bfloat16)
    out, ref = pair_logps(model, batch), pair_logps(reference, batch)
    assert torch.allclose(out.chosen, ref.chosen, rtol=0.02, atol=0.2)


def test_activation_offload_gives_the_same_loss_and_gradients(tiny_model_dir, tmp_path):
    """`activation_offload: true` saves the policy's activations through torch's save_on_cpu hooks
    (on a CPU: copies in host memory); the loss and every gradient are those of the plain run."""
    from prefalign.train.workflow import build_trainer

    results = []
    for offload in (False, True):
        trainer = build_trainer(config_for(tiny_model_dir, tmp_path / str(offload), finetuning_type="full",
                                           activation_offload=offload))
        assert trainer.activation_offload is offload
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        loss = trainer.compute_loss(trainer.model, batch)
        results.append((loss.item(), grads_of(trainer.model, loss)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-7)
    assert grads_a and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
