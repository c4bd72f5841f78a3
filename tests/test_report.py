"""What a training run leaves for people: report.html (checked in headless Chromium), plots, the model card,
TensorBoard logs."""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from prefalign.cli import main

EXAMPLES = Path(__file__).parents[1] / "examples"
CHROMIUM = Path("/usr/bin/chromium")


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A 4-step LoRA run with held-out data evaluated every 2 steps (TensorBoard logging when installed)."""
    from prefalign.config import load_config
    from prefalign.train.workflow import run_train

    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "run"
    config = {
        "model_name_or_path": tiny_model_dir, "stage": "dpo", "finetuning_type": "lora",
        "dataset": "demo_train", "eval_dataset": "demo_eval", "dataset_dir": str(EXAMPLES / "data"),
        "max_samples": 8, "cutoff_len": 96, "output_dir": str(out), "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8, "max_steps": 4, "learning_rate": 1e-2, "logging_steps": 1,
        "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "no", "plot_loss": True,
        "overwrite_output_dir": True, "disable_tqdm": True, "seed": 0,
        "report_to": "tensorboard" if _has_tensorboard() else "none",
    }
    (tmp / "run.yaml").write_text(yaml.safe_dump(config))
    run_train(load_config(tmp / "run.yaml"))
    return out


class _Page(HTMLParser):
    """Collects the images, the external references and the rows of each table id."""

    def __init__(self):
        super().__init__()
        self.images, self.external, self.rows = [], [], {}
        self._table, self._in_body = None, False
        self._cell, self._row = None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            value = attrs.get(key)
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self._table = attrs.get("id")
            self.rows.setdefault(self._table, [])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_report_html_holds_curves_metrics_and_scored_pairs(run_dir):
    page = parse((run_dir / "report.html").read_text())
    assert page.external == []  # nothing is fetched from the network
    curves = [img for img in page.images if img.get("class") == "curve"]
    assert len(curves) == 5  # loss, rewards/accuracies, rewards/margins, rewards/chosen, rewards/rejected
    for img in curves:
        assert base64.b64decode(img["src"].removeprefix("data:image/png;base64,"))[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((run_dir / "all_results.json").read_text())
    metrics = {row[0]: row[1] for row in page.rows["metrics"]}
    assert float(metrics["eval_loss"]) == pytest.approx(results["eval_loss"], rel=1e-3)
    assert float(metrics["train_loss"]) == pytest.approx(results["train_loss"], rel=1e-3)

    pairs = page.rows["pairs"]
    assert len(pairs) == 5 and [row[0] for row in pairs] == ["0", "1", "2", "3", "4"]
    first = json.loads((EXAMPLES / "data" / "demo_eval.json").read_text())[0]
    assert first["instruction"] in pairs[0][1] and pairs[0][2] == first["chosen"] and pairs[0][3] == first["rejected"]
    assert {"data-summary", "token-lengths"} <= set(page.rows)

    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    speed = {row[0]: row for row in page.rows["speed"]}
    for key in ("throughput/tokens_per_second", "throughput/padding_fraction", "throughput/mfu"):
        logged = [h[key] for h in history if key in h]
        assert logged and float(speed[key][2]) == pytest.approx(logged[-1], rel=1e-3), key
        assert float(speed[key][1]) == pytest.approx(sum(logged) / len(logged), rel=1e-3), key


def test_report_pairs_match_prefalign_eval(run_dir, tmp_path):
    """The report's pairs are scored like `prefalign eval` scores them, and reward margin = β (Δπ − Δref)."""
    samples = json.loads((run_dir / "report_samples.json").read_text())
    assert samples["held_out"] is True
    cfg = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    cfg.update(adapter_name_or_path=str(run_dir), output_dir=str(tmp_path / "eval"), max_samples=5)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "eval_pairs.jsonl").read_text().splitlines()]
    for sample, row in zip(samples["pairs"], rows, strict=True):
        assert sample["index"] == row["index"]
        for key in ("policy_chosen_logps", "reference_rejected_logps", "margin", "loss"):
            assert sample[key] == pytest.approx(row[key], abs=1e-5), key
        # β = 0.1 (the default pref_beta)
        assert sample["margin"] == pytest.approx(0.1 * (sample["policy_margin"] - sample["reference_margin"]), abs=1e-5)


@pytest.mark.skipif(not CHROMIUM.is_file(),
                    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (run_dir / "report.html").resolve().as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse(dom.stdout)
    assert len([img for img in page.images if img.get("class") == "curve"]) == 5
    assert any(row[0] == "eval_rewards/accuracies" for row in page.rows["metrics"])
    assert len(page.rows["pairs"]) == 5

    # The browser decodes and draws the curves: matplotlib's first colour (#1f77b4) is on the screenshot.
    import numpy as np
    from PIL import Image

    shot = tmp_path / "shot.png"
    done = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,1800", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    blue = (np.abs(pixels - np.array([31, 119, 180])) < 25).all(-1).sum()
    assert blue > 200


def test_model_card_front_matter_and_its_snippet_runs(run_dir, tiny_model_dir):
    text = (run_dir / "README.md").read_text()
    front, body = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S).groups()
    meta = yaml.safe_load(front)
    assert meta["base_model"] == tiny_model_dir and meta["library_name"] == "peft"
    assert {"dpo", "prefalign"} <= set(meta["tags"]) and meta["datasets"] == ["demo_train", "demo_eval"]
    assert "`sigmoid`" in body and "β = 0.1" in body and "| learning_rate | 0.01 |" in body
    assert "| eval_rewards/accuracies |" in body
    snippet = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # loads base + adapter with peft and generates
    assert type(scope["model"]).__name__.startswith("Peft")


def test_final_evaluation_is_plotted_and_plot_and_report_commands(run_dir, tmp_path, capsys):
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    eval_steps = [h["step"] for h in history if "eval_loss" in h]
    assert eval_steps[-1] == 4 and 2 in eval_steps  # eval_steps=2, and the final evaluation after training
    for name in ("loss", "rewards_accuracies", "rewards_margins", "rewards_chosen", "rewards_rejected"):
        (run_dir / f"training_{name}.png").unlink()
    assert main(["plot", str(run_dir)]) == 0
    assert len(capsys.readouterr().out.split()) == 5 and (run_dir / "training_rewards_margins.png").is_file()

    (run_dir / "report.html").unlink()
    (run_dir / "README.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "README.md").is_file() and len(parse((run_dir / "report.html").read_text()).rows["pairs"]) == 5

    assert main(["plot", str(tmp_path)]) == 2
    assert "trainer_state.json" in capsys.readouterr().err


@pytest.mark.skipif(not _has_tensorboard(),
                    reason="tensorboard is not installed (pip install 'prefalign[tensorboard]')")
def test_tensorboard_logs_offline(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((run_dir / "runs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "eval/rewards/margins" in acc.Tags()["scalars"]
    shutil.rmtree(run_dir / "runs")  # leave the folder as the other tests expect it


def test_report_data_section_shows_folds_and_skips_by_stage():
    from prefalign.data.summary import DataSummary, SplitSummary
    from prefalign.report import _data_section

    summary = DataSummary(template="gemma", cutoff_len=64, datasets={"d": 9}, skipped={"d": 1},
                          skipped_by_stage={"parse": 1, "render": 2},
                          train=SplitSummary(pairs=7, folded_system_turns=3, skipped=2))
    page = parse(_data_section(summary))
    assert page.rows["splits"] == [["train", "7", "0", "0", "3", "2"]]
    assert "Skipped records by stage: parse 1, render 2;" in _data_section(summary)
