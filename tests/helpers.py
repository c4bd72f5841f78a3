"""Helpers shared by the tests that train the tiny model (fixtures live in conftest.py)."""

from pathlib import Path

from transformers import TrainerCallback

from prefalign.config import build_config

ROOT = Path(__file__).resolve().parents[1]  # the repository
EXAMPLES = ROOT / "examples"
FIXTURES = ROOT / "tests" / "fixtures" / "data"


# The plain layout (rows prompt+chosen, then prompt+rejected), which runs leave only when asked:
# the reference side of the tests that compare a speed path with it (modeling/layout.py).
PLAIN = {"packing": False, "prefix_sharing": False}


def config_for(model_dir, out, **overrides):
    """A small, fast LoRA DPO config on the demo data; `overrides` are config keys."""
    values = {
        "model_name_or_path": str(model_dir), "stage": "dpo", "finetuning_type": "lora",
        "dataset": "demo_train", "dataset_dir": str(EXAMPLES / "data"), "max_samples": 16,
        "cutoff_len": 96, "output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 3,
        "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "overwrite_output_dir": True, "seed": 0, "disable_tqdm": True,
    }
    values.update(overrides)
    return build_config(values)


def first_batch(trainer):
    """The first training batch, on the trainer's device."""
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def sequence_logps(model, batch):
    """Summed log-probs of the labelled tokens of each row, (2B,), by the textbook shift-and-gather."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token = logits.float().log_softmax(-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    return (token * mask).sum(-1)


def textbook_dpo_loss(model, batch, beta: float, reference_model=None):
    """Sigmoid DPO on a concatenated batch (rows [0, B) chosen, [B, 2B) rejected), by hand:
    -log σ(β((πc - rc) - (πr - rr))), the reference being `reference_model`, or (None) the same peft
    model with its adapter disabled."""
    import contextlib

    import torch
    import torch.nn.functional as F

    with torch.no_grad(), (contextlib.nullcontext() if reference_model else model.disable_adapter()):
        reference = sequence_logps(reference_model or model, batch)
    policy = sequence_logps(model, batch)
    half = policy.shape[0] // 2
    margin = (policy[:half] - reference[:half]) - (policy[half:] - reference[half:])
    return -F.logsigmoid(beta * margin).mean()


def make_random_adapter(model_dir, path, *, seed=1, target_modules="all-linear", b_std=None) -> str:
    """Save a LoRA adapter with random, non-zero A and B (as if trained), so base + adapter != base.

    `b_std` redraws lora_B from N(0, b_std) for a larger effect than peft's random init.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=target_modules,
                                             init_lora_weights=False))
    if b_std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, b_std)
    model.save_pretrained(path)
    return str(path)


def qwen2_shaped_model(model_dir, path, *, hidden_size=64, num_layers=2, heads=4, seed=0) -> str:
    """A tiny random `Qwen2ForCausalLM` (q/k/v with biases, drawn non-zero) with `model_dir`'s tokenizer.

    hidden 64: every layer's input size is a multiple of bitsandbytes' 4-bit block (64), a shape
    every CPU kernel path takes.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("proj.bias"):
                    param.normal_(0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# Chat templates of our own, in the tiny tokenizer's ChatML markup, for the rules real templates need.

# Tools-capable (Qwen2.5-like): tool definitions in the system turn, tool calls as <tool_call> JSON,
# tool results as a user turn.
TOOLS_CHATML = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n\\n' }}{% endif %}{{ '# Tools\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}"
    "{% elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + m['content'] }}"
    "{% for call in m['tool_calls'] or [] %}{{ '<tool_call>\\n' + (call['function'] | tojson) + '\\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>"
    "<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen3-like thinking switch: with enable_thinking false, an empty thought follows the assistant header.
THINKING_CHATML = (
    "{% set no_think = enable_thinking is defined and enable_thinking is false %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% if loop.last and no_think %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{{ m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% if no_think %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}"
)

# Gemma-2-like: no system role.
NO_SYSTEM_CHATML = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Mistral-Nemo-like: the system text goes into the last user turn only, so with a system message the
# prompt is not a prefix of prompt + reply.
SYSTEM_LAST_CHATML = (
    "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% for m in (messages[1:] if sys else messages) %}{% if m['role'] == 'user' %}{{ '<|im_start|>user\\n' }}"
    "{% if loop.last and sys %}{{ sys + '\\n\\n' }}{% endif %}{{ m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def model_with_template(model_dir, path, chat_template: str) -> str:
    """A copy of the tiny model whose tokenizer has `chat_template` as its own."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return str(path)


def with_llama3_tokens(model_dir: str, path) -> str:
    """The tiny model with Llama 3's markup tokens added (and its embeddings resized), so `template: llama3` fits."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(model_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>", "<|eom_id|>"]})
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_json(path, records) -> str:
    import json

    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return str(path)


class StopAfter(TrainerCallback):
    """Stops training after optimizer step `step` (its checkpoint, if save_steps says so, is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = control.should_training_stop or state.global_step >= self.step
