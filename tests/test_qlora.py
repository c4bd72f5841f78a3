"""QLoRA: a 4-bit (NF4, bitsandbytes on the CPU) base, a LoRA adapter trained on it, the base with the
adapter off as the reference, the same on every CPU kernel path; and the config errors around
quantization and DeepSpeed."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import EXAMPLES, ROOT, config_for, first_batch, qwen2_shaped_model

from prefalign.errors import ConfigError

bnb = pytest.importorskip("bitsandbytes", reason='QLoRA needs bitsandbytes: pip install "prefalign[qlora]"')


def _linear4bit(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


QUANTIZED_LINEAR = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_from_ln2_with_the_quantized_base_as_reference(tiny_model_dir, tmp_path, bits):
    from prefalign.train.workflow import build_trainer

    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, quantization_bit=bits))
    assert trainer.reference.name == "adapter-disabled" and trainer.reference.model is trainer.model  # no copy
    quantized = [m for m in trainer.model.modules() if isinstance(m, QUANTIZED_LINEAR[bits])]
    assert len(quantized) == 2 * 7  # every linear layer of both decoder layers is quantized
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = first_batch(trainer)
    trainer.model.train()  # the policy's forward in training mode, the reference's in eval mode:
    loss, out, _ = trainer.batch_loss(trainer.model, batch)  # the same kernel (pin_cpu_kernels)
    assert torch.allclose(out.losses, torch.full_like(out.losses, math.log(2)), atol=1e-6)  # policy == reference
    ref_before = trainer.reference.logps(batch)
    trainer.train()
    after = trainer.batch_loss(trainer.model, batch)[0]
    assert after.item() < math.log(2) - 1e-4  # it learned
    ref_after = trainer.reference.logps(batch)
    assert torch.equal(ref_before.chosen, ref_after.chosen)  # the quantized base never changed


@pytest.fixture(scope="module")
def qwen2_model_dir(tiny_model_dir, tmp_path_factory):
    """Qwen2's shape: q/k/v projections with biases (hidden 64)."""
    return qwen2_shaped_model(tiny_model_dir, tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("model", ["tiny_model_dir", "llama64_model_dir", "qwen2_model_dir"])  # biases: Qwen2
def test_a_reference_forward_changes_neither_the_policys_scores_nor_its_gradients(request, tmp_path, model, bits):
    """The adapter-disabled reference reads the base in eval mode, without grad. On a CPU with
    AVX512-BF16 that forward used to repack bitsandbytes' 4-bit weights for good (pin_cpu_kernels):
    afterwards the policy took a bf16 kernel without a backward, so its scores moved and the
    gradient through the frozen base was silently dropped (hidden-64 Llama); with q/k/v biases it
    raised; on the hidden-32 Llama it raised at once (input size 32 is not a multiple of the 4-bit
    block, 64)."""
    from prefalign.modeling.logprobs import pair_logps
    from prefalign.train.workflow import build_trainer

    trainer = build_trainer(config_for(request.getfixturevalue(model), tmp_path, quantization_bit=bits))
    batch = first_batch(trainer)
    lora = [p for p in trainer.model.parameters() if p.requires_grad]

    def policy():
        trainer.model.train()
        logps = pair_logps(trainer.model, batch)
        return logps.chosen.detach(), torch.autograd.grad((logps.chosen - logps.rejected).sum(), lora)

    scores, grads = policy()
    assert sum(bool(g.any()) for g in grads) >= len(grads) // 2  # lora_B's gradients (lora_A's are 0 while B is)
    trainer.reference.logps(batch)
    scores_after, grads_after = policy()
    assert torch.equal(scores, scores_after)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_after, strict=True))


def _prequantized(model_dir, path, bits: int) -> str:
    """`model_dir` saved in `bits` bits, as prefalign quantizes it (NF4, double quantization, fp32 compute)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    settings = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32))
    AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", quantization_config=settings).save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return str(path)


def _losses(out) -> list[float]:
    return [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def _adapter(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("bits", [4, 8])
def test_training_on_a_base_quantized_at_load_or_saved_quantized_is_the_same(qwen2_model_dir, tmp_path, bits):
    """The same quantized weights either way, one kernel (pin_cpu_kernels): identical losses and adapters."""
    from prefalign.train.workflow import run_train

    saved = _prequantized(qwen2_model_dir, tmp_path / "base", bits)
    at_load, loaded = tmp_path / "at-load", tmp_path / "saved"
    run_train(config_for(qwen2_model_dir, at_load, quantization_bit=bits, learning_rate=1e-2))
    run_train(config_for(saved, loaded, learning_rate=1e-2))
    assert len(_losses(at_load)) == 3 and _losses(at_load) == _losses(loaded)
    assert _losses(at_load)[-1] < _losses(at_load)[0]  # it learned
    assert all(torch.equal(t, _adapter(loaded)[n]) for n, t in _adapter(at_load).items())


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    from prefalign.train.workflow import run_train

    out = tmp_path_factory.mktemp("qlora") / "run"
    run_train(config_for(tiny_model_dir, out, quantization_bit=4, max_steps=4, learning_rate=1e-2))
    return out


def test_qlora_adapter_loads_on_the_4bit_and_on_the_fp32_base(tiny_model_dir, qlora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from prefalign.modeling.quantize import pin_cpu_kernels

    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    four_bit = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    pin_cpu_kernels(four_bit)  # bitsandbytes' AVX512 repack refuses the tiny model's 32-wide layers
    for base in (four_bit, AutoModelForCausalLM.from_pretrained(tiny_model_dir)):
        model = PeftModel.from_pretrained(base, qlora_run)
        with torch.no_grad(), model.disable_adapter():
            plain = model(input_ids=ids).logits
        with torch.no_grad():
            adapted = model(input_ids=ids).logits
        assert (adapted - plain).abs().max() > 1e-3  # the trained adapter acts on either base


def test_eval_on_a_quantized_base_is_the_same_quantized_at_load_or_before(tiny_model_dir, qlora_run, tmp_path):
    """The run quantizes the fp32 base (quantization_bit: 4), or the base was saved in 4 bits: same scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from prefalign.evaluate import run_eval

    prequantized = tmp_path / "base-nf4"
    AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32)).save_pretrained(prequantized)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(prequantized)
    rows = {}
    for name, overrides in (("at-load", dict(quantization_bit=4)),
                            ("saved", dict(model_name_or_path=str(prequantized)))):
        run_eval(config_for(tiny_model_dir, tmp_path / name, adapter_name_or_path=str(qlora_run), **overrides))
        rows[name] = [json.loads(line) for line in (tmp_path / name / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(rows["at-load"]) == 16
    for a, b in zip(rows["at-load"], rows["saved"], strict=True):
        for key in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "margin"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key  # the same NF4 weights, fp32 sums
    assert any(abs(r["margin"]) > 1e-3 for r in rows["at-load"])


def test_chat_on_a_quantized_base_answers_as_policy_and_reference(tiny_model_dir, qlora_run):
    import io

    from prefalign.chat import run_chat

    config = config_for(tiny_model_dir, qlora_run.parent / "chat", quantization_bit=4,
                        adapter_name_or_path=str(qlora_run), do_sample=False, max_new_tokens=4)
    [turn] = run_chat(config, prompt="How many legs does a spider have?", compare_reference=True, out=io.StringIO())
    assert set(turn) == {"prompt", "policy", "reference"}
    assert all(isinstance(turn[k], str) for k in ("policy", "reference"))


def test_ref_model_quantization_bit_loads_the_separate_reference_quantized(tiny_model_dir, tmp_path):
    from prefalign.train.workflow import build_trainer

    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, finetuning_type="full",
                                       ref_model=str(tiny_model_dir), ref_model_quantization_bit=4))
    assert trainer.reference.name == "separate-model"
    assert _linear4bit(trainer.reference.model) and not _linear4bit(trainer.model)
    loss = trainer.batch_loss(trainer.model, first_batch(trainer))[0]
    assert math.isfinite(loss.item()) and loss.item() != pytest.approx(math.log(2), abs=1e-6)  # NF4 != fp32


def test_export_refuses_to_merge_into_quantized_weights(tiny_model_dir, tmp_path):
    from prefalign.export import run_export

    with pytest.raises(ConfigError, match="quantization_bit"):
        run_export(config_for(tiny_model_dir, tmp_path, quantization_bit=4, export_dir=str(tmp_path / "x")))


@pytest.mark.parametrize("overrides, message", [
    (dict(quantization_bit=4, finetuning_type="full"), "quantization_bit with finetuning_type: full"),
    (dict(quantization_bit=3), "quantization_bit: 3 is not supported; use 4 or 8"),
    (dict(quantization_bit=4, quantization_type="int4"), "quantization_type: 'int4'"),
    (dict(quantization_bit=4, quantization_method="gptq"), "quantization_method: 'gptq'"),
    (dict(ref_model_quantization_bit=4), "ref_model_quantization_bit is set without ref_model"),
    (dict(quantization_bit=4, deepspeed=str(EXAMPLES / "deepspeed" / "ds_z3_config.json")),
     "deepspeed: ZeRO-3 .* quantization_bit"),
    (dict(deepspeed="no/such.json"), "deepspeed: no/such.json does not exist"),
])
def test_impossible_settings_are_config_errors_naming_the_keys(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_for(tiny_model_dir, tmp_path, **overrides)


@pytest.mark.parametrize("package, key, extra", [("deepspeed", "deepspeed=examples/deepspeed/ds_z2_config.json", "deepspeed"),
                                                 ("bitsandbytes", "quantization_bit=4", "qlora")])
def test_a_missing_package_names_the_extra_to_install(tmp_path, package, key, extra):
    """As on a machine without the package: at start-up, it is made unfindable (as transformers and
    prefalign look for it) and unimportable."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        "_find = importlib.util.find_spec\n"
        f"importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == {package!r} else _find(name, *a)\n"
        "class _Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] == {package!r}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Refuse())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "prefalign", "train", str(EXAMPLES / "lora_dpo.yaml"), key],
                         capture_output=True, text=True, env=env, cwd=EXAMPLES.parent, timeout=300)
    assert run.returncode == 2
    assert f'needs the {package} package, which is not installed; pip install "prefalign[{extra}]"' in run.stderr
    assert "Traceback" not in run.stderr


# (model fixture, bits): without biases (the 32-wide Llama, whose layers bitsandbytes' AVX512 repack refuses) and
# with q/k/v biases (the Qwen2 shape, where the repacked kernel's `result += bias` raised in the backward)
CAPABILITY_RUNS = [("tiny_model_dir", 4), ("qwen2_model_dir", 4), ("qwen2_model_dir", 8)]


@pytest.mark.extended  # 3 processes x 3 trainings (README: Development)
def test_qlora_trains_the_same_on_every_cpu_capability(request, tmp_path):
    """torch's default and AVX2 kernels (ATEN_CPU_CAPABILITY, read when torch is imported, so each in its own
    process, which trains every case of CAPABILITY_RUNS in turn) and this machine's own: the same QLoRA losses
    and adapters, with and without biases, in 4 and 8 bits, whatever CPU the run lands on. bitsandbytes' own
    choice, the AVX512-BF16 repack, is pinned off (pin_cpu_kernels); what is left is rounding in torch's
    vectorized sums (measured: losses within 2e-7; adapters within 2e-5, Adam's normalised first steps
    magnify the rounding of near-zero gradients), where the repack moved outputs ~1e-2 and a step moves the
    adapter ~1e-2."""
    import yaml

    values = {"stage": "dpo", "finetuning_type": "lora", "dataset": "demo_train",
              "dataset_dir": str(EXAMPLES / "data"), "max_samples": 8, "cutoff_len": 96,
              "per_device_train_batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1,
              "save_strategy": "no", "report_to": "none", "overwrite_output_dir": True, "seed": 0,
              "disable_tqdm": True, "eval_dataset": ""}
    models = {name: request.getfixturevalue(name) for name, _ in CAPABILITY_RUNS}
    outs, capabilities = {}, {}
    for capability in ("default", "avx2", None):  # None: this machine's own (AVX512 with bf16 where CI ran)
        configs = []
        for model, bits in CAPABILITY_RUNS:
            outs[capability, model, bits] = out = tmp_path / f"{capability}-{model}-{bits}"
            configs.append(tmp_path / f"{capability}-{model}-{bits}.yaml")
            configs[-1].write_text(yaml.safe_dump({**values, "model_name_or_path": str(models[model]),
                                                   "quantization_bit": bits, "output_dir": str(out)}))
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        run = subprocess.run([sys.executable, "-c", "import sys, torch; from prefalign.cli import main; "
                              "print('capability', torch.backends.cpu.get_cpu_capability()); "
                              "sys.exit(max(main(['train', config]) for config in sys.argv[1:]))",
                              *map(str, configs)], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
        capabilities[capability] = run.stdout.split("capability ")[1].split()[0]
    assert capabilities["default"] == "DEFAULT" and capabilities["avx2"] == "AVX2"  # the paths really were taken
    for (capability, model, bits), out in outs.items():
        expected = outs[None, model, bits]
        assert len(_losses(out)) == 3 and _losses(out)[-1] < _losses(out)[0]  # it learned
        assert _losses(out) == pytest.approx(_losses(expected), abs=1e-5), (capability, model, bits)
        for name, value in _adapter(expected).items():
            assert torch.allclose(_adapter(out)[name], value, rtol=0, atol=1e-4), (capability, model, bits, name)
