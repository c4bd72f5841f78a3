"""One reference plan: `plan_reference` decides the reference per phase, and the model card says
what the plan says (the card once named the bare base for a run whose reference was base + SFT)."""

import pytest

from prefalign.config import build_config
from prefalign.errors import ConfigError
from prefalign.model_card import model_card
from prefalign.reference import plan_reference
from prefalign.scoring import reference_plan

BASE = {"model_name_or_path": "base-model", "dataset": "d"}

# strategy -> the config keys that pick it in training
STRATEGIES = {
    "adapter-disabled": {},
    "sft-adapter": {"adapter_name_or_path": "sft-adapter"},
    "adapter-disabled (new adapter)": {"adapter_name_or_path": "sft-adapter", "create_new_adapter": True},
    "frozen-copy (full)": {"finetuning_type": "full", "adapter_name_or_path": "sft-adapter"},
    "frozen-copy (freeze)": {"finetuning_type": "freeze"},
    "separate-model": {"ref_model": "other-model", "ref_model_adapters": "ref-adapter"},
    "none": {"pref_loss": "simpo"},
}


@pytest.mark.parametrize("label", sorted(STRATEGIES))
def test_the_card_states_the_plan_of_each_strategy(label, tmp_path):
    config = build_config({**BASE, **STRATEGIES[label]})
    plan = reference_plan(config, "train")
    assert plan.strategy == label.split(" ")[0]
    card = model_card(config, tmp_path)
    assert f"- Reference: {plan.description}\n" in card
    assert "new adapter was trained on top" not in card or config.finetuning.create_new_adapter


def test_create_new_adapter_references_base_plus_the_merged_sft_adapter(tmp_path):
    """The reference is the base with the SFT adapter merged, not the bare base model."""
    config = build_config({**BASE, **STRATEGIES["adapter-disabled (new adapter)"]})
    words = reference_plan(config, "train").description
    assert "`sft-adapter`" in words and "merged" in words
    card = model_card(config, tmp_path)
    assert "(merged; a new adapter was trained on top)" in card


@pytest.mark.parametrize("finetuning_type", ["full", "freeze"])
def test_full_and_freeze_cards_train_no_new_adapter(finetuning_type, tmp_path):
    config = build_config({**BASE, "finetuning_type": finetuning_type, "adapter_name_or_path": "sft-adapter"})
    card = model_card(config, tmp_path)
    assert "new adapter" not in card
    assert "(merged into the weights before training)" in card
    assert "frozen copy of the starting model" in reference_plan(config, "train").description


@pytest.mark.parametrize("phase", ["eval", "chat"])
def test_after_training_the_reference_is_the_policy_with_its_last_adapter_off(phase):
    """Training's starting adapter is the result after training: it is switched off, whatever finetuning_type says."""
    plan = plan_reference(needs_reference=True, phase=phase, finetuning_type="full",
                          adapters=["first", "trained"])
    assert plan.strategy == "adapter-disabled"
    assert "`trained` disabled" in plan.description and "`first` merged" in plan.description


@pytest.mark.parametrize("phase, command", [("eval", "eval:"), ("chat", "chat --compare-reference:")])
def test_after_training_a_policy_without_adapter_or_ref_model_has_no_reference(phase, command):
    with pytest.raises(ConfigError, match=command):
        plan_reference(needs_reference=True, phase=phase, adapters=[])
    assert plan_reference(needs_reference=False, phase=phase).strategy == "none"
    assert plan_reference(needs_reference=True, phase=phase, ref_model="m").strategy == "separate-model"


def test_an_unknown_phase_is_a_bug():
    with pytest.raises(ValueError, match="phase"):
        plan_reference(needs_reference=True, phase="export")
