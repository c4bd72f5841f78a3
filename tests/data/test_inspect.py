"""`prefalign data`: the real CLI in a subprocess prints the counts, the lengths and what the model reads."""

import json
import subprocess
import sys

from helpers import EXAMPLES


def prefalign_data(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prefalign", "data", str(EXAMPLES / "lora_dpo.yaml"), *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_prefalign_data_shows_counts_lengths_and_the_rendered_examples(tiny_model_dir, tmp_path):
    run = prefalign_data(f"model_name_or_path={tiny_model_dir}", "build_demo_model=false",
                         f"dataset_dir={EXAMPLES / 'data'}", "max_samples=10", "val_size=2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    lines = out.splitlines()
    assert "demo_train: 10 pairs" in lines
    assert "val_size: 2 of those pairs held out for evaluation" in lines
    assert any(line.startswith("train: 8 pairs, 0 prompts and 0 responses truncated") for line in lines)
    assert any(line.startswith("eval: 2 pairs") for line in lines)
    # token lengths of every part of both splits, with min <= p50 <= max
    for split in ("train", "eval"):
        for part in ("prompt", "chosen", "rejected"):
            line = next(line for line in lines if line.strip().startswith(f"{split} {part} tokens:"))
            numbers = dict(word.rstrip(",").split(" ") for word in
                           line.split(":", 1)[1].strip().replace(", ", ",").split(","))
            assert float(numbers["min"]) <= float(numbers["p50"]) <= float(numbers["max"])
    # two rendered examples: the prompt marked as masked, both replies as trained, in the demo's text
    assert out.count("[prompt: masked, not trained]") == 2 and out.count("[chosen: trained]") == 2
    records = json.loads((EXAMPLES / "data" / "demo_train.json").read_text())
    shown = [int(line.split()[2]) for line in lines if line.startswith("--- example ")]
    for index in shown:
        assert records[index]["chosen"] in out and records[index]["rejected"] in out


def test_prefalign_data_reports_a_bad_dataset_name_in_one_line(tiny_model_dir, tmp_path):
    run = prefalign_data(f"model_name_or_path={tiny_model_dir}", "build_demo_model=false",
                         f"dataset_dir={EXAMPLES / 'data'}", "dataset=demo_trian", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("prefalign data: error:")]
    assert len(errors) == 1 and "demo_trian" in errors[0] and "did you mean 'demo_train'?" in errors[0]
