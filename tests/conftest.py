"""Shared fixtures: a tiny Llama and its locally trained tokenizer, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

DEMO_DATA_DIR = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="session")
def demo_data_dir() -> Path:
    """The shipped demo data: demo_train.json, demo_eval.json and their dataset_info.json."""
    return DEMO_DATA_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_data_dir) -> str:
    """A randomly initialised 2-layer Llama (hidden 32, 4 heads) with the demo tokenizer (chatml, eos <|im_end|>).

    Session-scoped and shared: tests must not write into it; copy it (or save elsewhere) to modify.
    """
    from prefalign.demo import build_tiny_model, demo_texts

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    return build_tiny_model(path, texts=demo_texts(demo_data_dir), hidden_size=32, num_layers=2, heads=4, seed=0)


@pytest.fixture(scope="session")
def llama64_model_dir(tmp_path_factory, demo_data_dir) -> str:
    """The tiny Llama at hidden 64: every layer's input size a multiple of bitsandbytes' 4-bit block (64),
    a shape every CPU kernel path takes. Shared like `tiny_model_dir`: do not write into it."""
    from prefalign.demo import build_tiny_model, demo_texts

    path = tmp_path_factory.mktemp("models") / "tiny-llama64"
    return build_tiny_model(path, texts=demo_texts(demo_data_dir), hidden_size=64, num_layers=2, heads=4, seed=0)


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    """A fresh copy of the tiny model's tokenizer per test, so a test may change it (e.g. its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    """Tests write their encoded-data caches under tmp, and never reach for a model hub."""
    import os

    os.environ["PREFALIGN_CACHE"] = str(tmp_path_factory.mktemp("prefalign-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
