"""The batch layout a run gets (modeling/layout.py): packed and prefix-shared by default where the
model's attention gives the plain layout's log-probs, plain where it cannot, and what the config writes."""

import logging

import pytest
import torch
from helpers import config_for
from test_speed_paths import FEATURES, tiny_llama
from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

from prefalign.config.args import DataArguments, FinetuningArguments
from prefalign.data.collate import PairCollator
from prefalign.data.packing import PackedCollator
from prefalign.errors import ConfigError
from prefalign.modeling.layout import choose_layout
from prefalign.modeling.logprobs import pair_logps

AUTO = FinetuningArguments()  # packing and prefix_sharing left null


def tiny_mistral(window: int):
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=window)
    cfg._attn_implementation = "sdpa"
    return MistralForCausalLM(cfg).float()


def tiny_gemma2():
    cfg = Gemma2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return Gemma2ForCausalLM(cfg)


def test_a_llama_packs_and_shares_its_prompts_by_default():
    layout = choose_layout(AUTO, DataArguments(cutoff_len=2048), tiny_llama())
    assert (layout.packing, layout.prefix_sharing, layout.notes) == (True, True, ())


def test_what_the_config_writes_is_kept():
    written = choose_layout(FinetuningArguments(packing=False, prefix_sharing=True), DataArguments(cutoff_len=2048), tiny_llama())
    assert (written.packing, written.prefix_sharing) == (False, True)
    unplain = choose_layout(FinetuningArguments(packing=False, prefix_sharing=False), DataArguments(), tiny_gemma2())
    assert (unplain.packing, unplain.prefix_sharing, unplain.notes) == (False, False, ())


def with_attention(model, implementation: str):
    model.config._attn_implementation = implementation
    return model


# A `true` the model's attention cannot run, refused before the run (one key, one line each): the
# packed attention would drop the soft-cap or the window, flash-attention's padding-free path would
# let a rejected reply attend to the chosen one, and an attention without custom masks ignores spans.
@pytest.mark.parametrize("keys, model, cutoff_len, message", [
    ({"packing": True, "prefix_sharing": False}, tiny_gemma2, 2048,
     "packing: true, but the model soft-caps its attention scores; set packing: false (or null"),
    ({"packing": False, "prefix_sharing": True}, tiny_gemma2, 2048,
     "prefix_sharing: true, but the model soft-caps its attention scores; set prefix_sharing: false"),
    ({"packing": True, "prefix_sharing": False}, lambda: tiny_mistral(window=4), 96,
     "packing: true, but the model's sliding-window attention (4 tokens) is shorter than cutoff_len 96; "),
    ({"packing": True, "prefix_sharing": True}, lambda: with_attention(tiny_llama(), "flash_attention_2"), 2048,
     "prefix_sharing: true, but attn_implementation=flash_attention_2 cannot share a prompt between two replies; "),
    ({"packing": False, "prefix_sharing": True}, lambda: with_attention(tiny_llama(), "flash_attention_2"), 2048,
     "prefix_sharing: true, but attn_implementation=flash_attention_2 cannot share"),
    ({"packing": True, "prefix_sharing": False}, lambda: with_attention(tiny_llama(), "flex_attention"), 2048,
     "packing: true, but attn_implementation=flex_attention takes no custom mask; set packing: false"),
])
def test_a_true_the_models_attention_cannot_run_is_refused_in_one_line(keys, model, cutoff_len, message):
    with pytest.raises(ConfigError) as info:
        choose_layout(FinetuningArguments(**keys), DataArguments(cutoff_len=cutoff_len), model())
    [line] = info.value.problems
    assert line.startswith(message), line


def test_flash_attention_packs_when_no_prompt_is_shared():
    model = with_attention(tiny_llama(), "flash_attention_2")
    layout = choose_layout(FinetuningArguments(packing=True, prefix_sharing=False), DataArguments(), model)
    assert layout.packing and not layout.prefix_sharing


def test_soft_capped_attention_falls_back_to_the_plain_layout_with_the_reason(caplog):
    with caplog.at_level(logging.INFO, logger="prefalign.modeling.layout"):
        layout = choose_layout(AUTO, DataArguments(cutoff_len=2048), tiny_gemma2())
    assert not layout.packing and not layout.prefix_sharing
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Batch layout")]
    assert line == ("Batch layout: plain (no packing, no prefix sharing); packing off: the model soft-caps its "
                    "attention scores; prefix_sharing off: the model soft-caps its attention scores")


def test_a_sliding_window_shorter_than_cutoff_len_turns_both_off_and_a_longer_one_does_not():
    short = choose_layout(AUTO, DataArguments(cutoff_len=96), tiny_mistral(window=16))
    assert not short.packing and not short.prefix_sharing
    assert "sliding-window attention (16 tokens) is shorter than cutoff_len 96" in short.notes[0]
    assert choose_layout(AUTO, DataArguments(cutoff_len=16), tiny_mistral(window=16)).packing


def test_the_reference_model_decides_too():
    """A separate reference of another family must run the same batches."""
    layout = choose_layout(AUTO, DataArguments(cutoff_len=2048), tiny_llama(), tiny_gemma2())
    assert not layout.packing and not layout.prefix_sharing


def test_flash_attention_packs_without_sharing_prompts():
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    layout = choose_layout(AUTO, DataArguments(cutoff_len=2048), model)
    assert layout.packing and not layout.prefix_sharing
    assert layout.notes == ("prefix_sharing off: attn_implementation=flash_attention_2 cannot share a prompt "
                            "between two replies",)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_sequences_within_a_sliding_window_pack_to_the_plain_log_probs(prefix_sharing):
    """Every sequence (at most 8 tokens) fits a window of 16: the window never slides, so packing is exact."""
    model = tiny_mistral(window=16)
    plain = pair_logps(model, PairCollator(0)(FEATURES))
    packed = pair_logps(model, PackedCollator(0, prefix_sharing=prefix_sharing)(FEATURES))
    torch.testing.assert_close(packed.chosen, plain.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.rejected, plain.rejected, atol=1e-5, rtol=0)


def test_a_default_run_trains_packed_and_prefix_shared(tiny_model_dir, tmp_path):
    from prefalign.train.workflow import build_trainer

    collator = build_trainer(config_for(tiny_model_dir, tmp_path)).data_collator
    assert isinstance(collator, PackedCollator) and collator.prefix_sharing


def test_streamed_pairs_pack_and_share_their_prompts_by_default():
    layout = choose_layout(AUTO, DataArguments(streaming=True, cutoff_len=2048), tiny_llama())
    assert (layout.packing, layout.prefix_sharing, layout.notes) == (True, True, ())


def test_a_router_loss_keeps_the_plain_layout_by_default_and_true_is_kept():
    """The router's auxiliary loss counts tokens as laid out: off by default, but the attention can run it."""
    model = tiny_llama()
    model.config.output_router_logits = True
    layout = choose_layout(AUTO, DataArguments(cutoff_len=2048), model)
    assert not layout.packing and layout.notes[0] == (
        "packing off: the router's auxiliary loss counts the batch's tokens as they are laid out "
        "(set packing: true to use it anyway)")
    assert choose_layout(FinetuningArguments(packing=True), DataArguments(cutoff_len=2048), model).packing
