"""Token-for-token parity of `template: NAME` with LLaMA-Factory's own DPO data path.

Two halves, one script, two Pythons (LLaMA-Factory cannot be installed into prefalign's environment):

1. With LLaMA-Factory's venv it writes the records (LF's dpo_en_demo / dpo_zh_demo: the shortest
   single-turn and multi-turn ones, plus a system-prompt record and one whose reply thinks) as an LF
   data folder and LF's ids for every template name prefalign accepts x every tokenizer folder:
   `get_template_and_fix_tokenizer` + LF's sharegpt converter + `PairwiseDatasetProcessor`:
       /work/venvs/lf/bin/python benchmarks/lf_template_parity.py lf --lf-data LF_SRC/data \\
           --tokenizers /work/artifacts/tokenizers --out /work/artifacts/lf_parity
2. With prefalign's Python it reads the same data folder through prefalign's own reader, encodes with
   prefalign's ChatRenderer + encode_pair, and reports per name: equal, differing (with the first
   differing token), or refused (with prefalign's reason):
       PYTHONPATH=src python benchmarks/lf_template_parity.py compare --out /work/artifacts/lf_parity

`shrink` writes the tests' small tokenizers (tests/fixtures/lf_parity/tokenizers: real ones, their
vocabulary cut to its first ids), and `freeze` (run with LF's venv, like `lf`) writes the small frozen
set of LF's ids the tests check (tests/fixtures/lf_parity/frozen.json) for the most used names, and
the same records cut at CUTOFFS for a few names (frozen_truncated.json):
    PYTHONPATH=src python benchmarks/lf_template_parity.py shrink
    /work/venvs/lf/bin/python benchmarks/lf_template_parity.py freeze --lf-data LF_SRC/data

Tool records (ShareGPT with a `tools` column, `function_call` and `observation` turns; TOOL_RECORDS)
go the same way with `--tools` (`lf --tools`, `compare --tools`), and `freeze-tools` writes their
frozen set (tests/fixtures/lf_parity/frozen_tools.json); two of those records' chosen or rejected reply
is a tool call (a `function_call` message), and OPENAI_RECORDS (an OpenAI-style dataset in the same
folder) has one as an assistant message with `tool_calls`. Both sides state one fixed date in llama3's
tool prompt (LLaMA-Factory writes the day it encodes). Truncation: `lf --truncate` / `compare --truncate`
encode the plain records at each of CUTOFFS for TRUNCATION_NAMES (lf_truncated_ids.json).
Without `--lf-data`, `lf` and `freeze` reuse the records already in the output's data folder.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

CUTOFF = 100_000  # no truncation: the encodings are compared whole
SYSTEM_RECORD = {"conversations": [{"from": "human", "value": "Name one prime number."}],
                 "chosen": {"from": "gpt", "value": "7 is a prime number."},
                 "rejected": {"from": "gpt", "value": "Nine."},
                 "system": "You are a terse math tutor. Answer in one sentence."}
THINKING_RECORD = {"conversations": [{"from": "human", "value": "What is 12 * 3?"},
                                     {"from": "gpt", "value": "<think>\nEasy.\n</think>\n\n36."},
                                     {"from": "human", "value": "And 12 * 4?"}],
                   "chosen": {"from": "gpt", "value": "<think>\n12 * 4 = 48.\n</think>\n\n48."},
                   "rejected": {"from": "gpt", "value": "44."},
                   "system": ""}
DATASET = "lf_parity"
TOOLS_DATASET = "lf_parity_tools"
TODAY = (2024, 7, 26)  # the date llama3's tool prompt states, fixed on both sides ("26 Jul 2024")
_WEATHER = {"name": "get_weather", "description": "Get the current weather of a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "description": "The unit", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city"]}}
_SEARCH = {"name": "search", "description": "Search the web",
           "parameters": {"type": "object", "properties": {
               "query": {"type": "string", "description": "What to search for"},
               "sites": {"type": "array", "description": "Sites to search", "items": {"type": "string"}}},
               "required": ["query"]}}
# Tool calls, each as a function_call turn holds it; the frozen texts add them as one parallel call.
TOOL_CALLS = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
              {"name": "search", "arguments": {"query": "LLaMA-Factory docs", "sites": ["github.com"], "n": 3,
                                               "safe": True, "lang": None, "note": "größer"}}]
# LLaMA-Factory's ShareGPT tool records (its glaive_toolcall demos' shape): a `tools` column holding the
# definitions as a JSON string, `function_call` turns holding one call as JSON, `observation` turns.
TOOL_RECORDS = [
    {"conversations": [{"from": "human", "value": "What is the weather in Paris?"},
                       {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {
                           "city": "Paris", "unit": "celsius"}})},
                       {"from": "observation", "value": json.dumps({"temperature": 22, "condition": "sunny"})}],
     "chosen": {"from": "gpt", "value": "It is sunny in Paris, 22 degrees Celsius."},
     "rejected": {"from": "gpt", "value": "It is raining."},
     "system": "", "tools": json.dumps([_WEATHER])},
    {"conversations": [{"from": "human", "value": "Find the LLaMA-Factory docs."},
                       {"from": "function_call", "value": json.dumps({"name": "search", "arguments": {
                           "query": "LLaMA-Factory docs", "sites": ["github.com"]}}, ensure_ascii=False)},
                       {"from": "observation", "value": "llamafactory.readthedocs.io"},
                       {"from": "gpt", "value": "They are at llamafactory.readthedocs.io."},
                       {"from": "human", "value": "Thanks. Is it warm in Rome?"}],
     "chosen": {"from": "gpt", "value": "Let me check the weather in Rome for you."},
     "rejected": {"from": "gpt", "value": "No."},
     "system": "You are a helpful assistant with tools.", "tools": json.dumps([_WEATHER, _SEARCH])},
    {"conversations": [{"from": "human", "value": "Say hello."}],
     "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Bye."},
     "system": "", "tools": json.dumps([_SEARCH])},
    # the chosen reply is a tool call (a function_call turn), then the rejected one after a tool result
    {"conversations": [{"from": "human", "value": "Is it cold in Oslo?"}],
     "chosen": {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
     "rejected": {"from": "gpt", "value": "Yes, always."},
     "system": "", "tools": json.dumps([_WEATHER])},
    {"conversations": [{"from": "human", "value": "Find the docs, then tell me the weather in Rome."},
                       {"from": "function_call", "value": json.dumps({"name": "search", "arguments": {
                           "query": "LLaMA-Factory docs"}})},
                       {"from": "observation", "value": "llamafactory.readthedocs.io"}],
     "chosen": {"from": "gpt", "value": "The docs are at llamafactory.readthedocs.io."},
     "rejected": {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {
         "city": "Rome", "unit": "celsius"}})},
     "system": "You are a helpful assistant with tools.", "tools": json.dumps([_WEATHER, _SEARCH])},
]
OPENAI_DATASET = "lf_parity_openai"
# The same kind of pairs written OpenAI-style: the reply an assistant message with `tool_calls`.
OPENAI_RECORDS = [
    {"messages": [{"role": "user", "content": "Is it cold in Oslo?"}],
     "chosen": {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
     "rejected": {"role": "assistant", "content": "Yes, always."}, "tools": [_WEATHER]},
]
# Truncation: the plain records cut at each of these cutoff_len, for TRUNCATION_NAMES (x every tokenizer).
CUTOFFS = (24, 64, 160)
TRUNCATION_NAMES = ("qwen", "qwen3", "qwen3_nothink", "llama2", "llama3", "mistral", "phi", "alpaca", "vicuna",
                    "default", "zephyr", "chatml", "smollm2", "gemma", "empty", "glm4", "seed_oss")


def pick_records(lf_data: Path, per_kind: int = 2) -> list[dict]:
    """The shortest single-turn and multi-turn records of each demo file, and the two hand-made ones."""
    records = []
    for name in ("dpo_en_demo", "dpo_zh_demo"):
        rows = json.loads((lf_data / f"{name}.json").read_text())
        size = lambda r: len(json.dumps(r, ensure_ascii=False))  # noqa: E731
        single = sorted((r for r in rows if len(r["conversations"]) == 1), key=size)[:per_kind]
        multi = sorted((r for r in rows if len(r["conversations"]) > 1), key=size)[:1]
        records += [{**r, "system": ""} for r in single + multi]
    return records + [SYSTEM_RECORD, THINKING_RECORD]


def records_for(args, folder: Path, per_kind: int = 2) -> list[dict]:
    """The plain records: picked from LF's demo files (--lf-data), else the ones already written in `folder`
    (a earlier run's, e.g. when LF's sdist is not at hand)."""
    if args.lf_data:
        return pick_records(Path(args.lf_data), per_kind)
    return json.loads((folder / f"{DATASET}.json").read_text())


def write_data(folder: Path, records: list[dict], dataset: str = DATASET) -> None:
    """An LF data folder holding `records` as `dataset`; the tool records' folder also holds OPENAI_RECORDS."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{dataset}.json").write_text(json.dumps(records, ensure_ascii=False, indent=1))
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "system"}
    info = {dataset: {"file_name": f"{dataset}.json", "ranking": True, "formatting": "sharegpt", "columns": columns}}
    if dataset == TOOLS_DATASET:
        columns["tools"] = "tools"
        (folder / f"{OPENAI_DATASET}.json").write_text(json.dumps(OPENAI_RECORDS, ensure_ascii=False, indent=1))
        info[OPENAI_DATASET] = {
            "file_name": f"{OPENAI_DATASET}.json", "ranking": True, "formatting": "openai",
            "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected", "tools": "tools"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "observation_tag": "tool", "system_tag": "system"}}
    (folder / "dataset_info.json").write_text(json.dumps(info))


def prefalign_names() -> list[str]:
    """The names prefalign accepts (read from its source: this half runs without prefalign installed)."""
    import ast
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "prefalign" / "data"
    names = re.findall(r"^    '([^']+)': LFTemplate\(", (src / "lf_templates.py").read_text(), re.M)
    names += re.findall(r"^    '([^']+)': LFTemplate\(", (src / "template_formats.py").read_text(), re.M)
    ast.literal_eval(repr(names))
    return sorted(set(names))


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory's half


_COPIES: dict = {}


def _fix_lf_date() -> None:
    """LLaMA-Factory's llama3 tool prompt states the day it encodes; both sides state TODAY instead."""
    import datetime as dt

    import llamafactory.data.tool_utils as tool_utils

    class Fixed(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(*TODAY)

    tool_utils.datetime = Fixed


def lf_encode(original, name: str, data_dir: Path, enable_thinking: bool = True, dataset: str = DATASET,
              tool_format: str | None = None, cutoff_len: int = CUTOFF) -> dict:
    """LF's ids for every record of the data folder with (a copy of) the tokenizer `original` (with
    "added": the tokens LF's template fix adds to it), or {"error": ...} where LF refuses.

    LF fixes the tokenizer in place; the fix depends only on replace_eos and the stop words, and fixing
    twice the same way changes nothing, so names that fix alike share one copy (copying is slow)."""
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.processor.pairwise import PairwiseDatasetProcessor
    from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    if name not in TEMPLATES:
        return {"error": f"LLaMA-Factory has no template {name}"}
    key = (id(original), TEMPLATES[name].replace_eos, tuple(TEMPLATES[name].stop_words))
    if key not in _COPIES:
        _COPIES.clear() if len(_COPIES) > 64 else None
        _COPIES[key] = copy.deepcopy(original)
    tokenizer = _COPIES[key]
    size = len(original)
    _fix_lf_date()
    data_args = DataArguments(template=name, cutoff_len=cutoff_len, enable_thinking=enable_thinking,
                              dataset=dataset, dataset_dir=str(data_dir), tool_format=tool_format)
    saved = copy.deepcopy(TEMPLATES[name])  # get_template_and_fix_tokenizer writes into the registry
    try:
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
    except Exception as exc:  # noqa: BLE001 - LF's own refusal is a result
        return {"error": f"LLaMA-Factory refuses: {type(exc).__name__}: {exc}"}
    finally:
        TEMPLATES[name] = saved
    added = []
    if len(tokenizer) != size:  # LF adds tokens (and, with resize_vocab, resizes); the ids are still its ids
        _COPIES.pop(key)
        added = sorted(set(tokenizer.get_vocab()) - set(original.get_vocab()))
    attr = get_dataset_list([dataset], str(data_dir))[0]
    converter = get_dataset_converter(attr.formatting, attr, data_args)
    rows = [converter(r) for r in json.loads((data_dir / f"{dataset}.json").read_text())]
    batch = {key: [row[key] for row in rows] for key in rows[0]}
    processor = PairwiseDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=data_args)
    try:
        out = processor.preprocess_dataset(batch)
    except Exception as exc:  # noqa: BLE001 - e.g. a multimodal plugin that wants the model's processor
        return {"error": f"LLaMA-Factory refuses: {type(exc).__name__}: {exc}"}
    results = []
    for chosen, chosen_labels, rejected, rejected_labels in zip(
            out["chosen_input_ids"], out["chosen_labels"], out["rejected_input_ids"], out["rejected_labels"]):
        n_prompt = sum(1 for label in chosen_labels if label == -100)
        results.append({"prompt": chosen[:n_prompt], "chosen": chosen[n_prompt:], "rejected": rejected[n_prompt:],
                        "chosen_trained": [label != -100 for label in chosen_labels][n_prompt:],
                        "rejected_prompt_equal": rejected[:n_prompt] == chosen[:n_prompt]})
    return {"records": results, "added": added} if added else {"records": results}


def run_lf(args) -> None:
    from importlib.metadata import version

    from transformers import AutoTokenizer

    out = Path(args.out)
    if args.tools:
        return run_lf_tools(args)
    records = records_for(args, out / "data")
    write_data(out / "data", records)
    if args.truncate:
        return run_lf_truncated(args)
    families = sorted(p.name for p in Path(args.tokenizers).iterdir() if (p / "tokenizer_config.json").is_file())
    result = {"llamafactory": version("llamafactory"), "transformers": version("transformers"),
              "tokenizers_dir": str(args.tokenizers), "families": families, "ids": {}}
    if args.add:  # encode these families only, into the existing result
        result = json.loads((out / "lf_ids.json").read_text())
        result["families"] = sorted(set(result["families"]) | set(args.add))
        families = args.add
    for family in families:
        tokenizer = AutoTokenizer.from_pretrained(Path(args.tokenizers) / family)
        for name in prefalign_names():
            result["ids"][f"{family}/{name}"] = lf_encode(tokenizer, name, out / "data")
        print(f"{family}: done", file=sys.stderr, flush=True)
    (out / "lf_ids.json").write_text(json.dumps(result))


def run_lf_truncated(args) -> None:
    """LF's ids of the plain records cut at each of CUTOFFS, for TRUNCATION_NAMES x every tokenizer folder:
    lf_truncated_ids.json, keyed FAMILY/NAME/cutoff_len=N."""
    from importlib.metadata import version

    from transformers import AutoTokenizer

    out = Path(args.out)
    families = sorted(p.name for p in Path(args.tokenizers).iterdir() if (p / "tokenizer_config.json").is_file())
    result = {"llamafactory": version("llamafactory"), "transformers": version("transformers"),
              "tokenizers_dir": str(args.tokenizers), "families": families, "ids": {}}
    for family in families:
        tokenizer = AutoTokenizer.from_pretrained(Path(args.tokenizers) / family)
        for name in TRUNCATION_NAMES:
            for cutoff in CUTOFFS:
                result["ids"][f"{family}/{name}/cutoff_len={cutoff}"] = lf_encode(tokenizer, name, out / "data",
                                                                                   cutoff_len=cutoff)
        print(f"{family}: done", file=sys.stderr, flush=True)
    (out / "lf_truncated_ids.json").write_text(json.dumps(result))


def run_lf_tools(args) -> None:
    """LF's ids of the tool records (TOOL_RECORDS) for every name x tokenizer folder: lf_tool_ids.json."""
    from importlib.metadata import version

    from transformers import AutoTokenizer

    out = Path(args.out)
    write_data(out / "tools_data", TOOL_RECORDS, TOOLS_DATASET)
    families = sorted(p.name for p in Path(args.tokenizers).iterdir() if (p / "tokenizer_config.json").is_file())
    result = {"llamafactory": version("llamafactory"), "transformers": version("transformers"),
              "tokenizers_dir": str(args.tokenizers), "families": families, "ids": {}}
    for family in families:
        tokenizer = AutoTokenizer.from_pretrained(Path(args.tokenizers) / family)
        for name in prefalign_names():
            result["ids"][f"{family}/{name}"] = lf_encode(tokenizer, name, out / "tools_data", dataset=TOOLS_DATASET)
            if "records" in result["ids"][f"{family}/{name}"]:  # where LF encodes the ShareGPT tool records
                result["ids"][f"{family}/{name}/openai"] = lf_encode(tokenizer, name, out / "tools_data",
                                                                     dataset=OPENAI_DATASET)
        print(f"{family}: done", file=sys.stderr, flush=True)
    (out / "lf_tool_ids.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# prefalign's half


def prefalign_renderer(tokenizer, name: str, kwargs: dict | None = None, tool_format: str | None = None):
    """prefalign's renderer for `name`, its llama3 tool prompt stating TODAY as LF's does here."""
    from prefalign.data.chat import ChatRenderer

    renderer = ChatRenderer(tokenizer, name, kwargs or {}, tool_format=tool_format)
    if renderer.lf_encoder is not None:
        renderer.lf_encoder.today = "{2:02d} {1} {0}".format(
            TODAY[0], ("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec").split()[TODAY[1] - 1], TODAY[2])
    return renderer


def prefalign_encode(tokenizer, name: str, pairs, cutoff_len: int = CUTOFF) -> dict:
    from prefalign.data.encode import encode_pair
    from prefalign.errors import ConfigError, PairError

    try:
        renderer = prefalign_renderer(tokenizer, name)
    except ConfigError as exc:
        return {"error": str(exc)}
    results = []
    for pair in pairs:
        try:
            encoded = encode_pair(pair, renderer, cutoff_len)
        except PairError as exc:
            results.append({"error": str(exc)})
            continue
        results.append({"prompt": encoded["prompt_ids"], "chosen": encoded["chosen_ids"],
                        "rejected": encoded["rejected_ids"]})
    return {"records": results}


def first_difference(tokenizer, ours: list[int], theirs: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    show = lambda ids: repr(tokenizer.convert_ids_to_tokens(ids[at:at + 1])[0]) if at < len(ids) else "end"  # noqa: E731
    return f"at token {at}: prefalign {show(ours)}, LLaMA-Factory {show(theirs)}"


def compare_one(tokenizer, lf: dict, ours: dict) -> tuple[str, str]:
    """(verdict, detail): equal / differs / refused (prefalign) / LF refuses / both refuse / not in LF."""
    if lf.get("error", "").startswith("LLaMA-Factory has no template"):
        return "not in LF", lf["error"]
    if "error" not in lf and any(None in record.get(part, ()) for record in lf["records"]
                                 for part in ("prompt", "chosen", "rejected")):
        # LF writes a named token the tokenizer lacks (no unknown token) as the id None: it cannot train it
        lf = {"error": "LLaMA-Factory encodes a token the tokenizer lacks as None"}
    if "error" in lf and "error" in ours:
        return "both refuse", ours["error"]
    if "error" in lf:
        return "LF refuses", lf["error"]
    if "error" in ours:
        return "refused", ours["error"]
    for index, (a, b) in enumerate(zip(ours["records"], lf["records"])):
        if "error" in a:
            return "refused", f"record {index}: {a['error']}"
        for part in ("prompt", "chosen", "rejected"):
            if a[part] != b[part]:
                return "differs", f"record {index} {part} {first_difference(tokenizer, a[part], b[part])}"
        if not all(b["chosen_trained"]):
            return "differs", f"record {index}: LF leaves part of the response untrained"
    return "equal", ""


def run_compare(args) -> None:
    from transformers import AutoTokenizer

    from prefalign.data.sources import load_preference_pairs

    out = Path(args.out)
    kind = "tools" if args.tools else "truncated" if args.truncate else ""
    folder, ids = {"tools": ("tools_data", "lf_tool_ids"), "truncated": ("data", "lf_truncated_ids")}.get(
        kind, ("data", "lf_ids"))
    lf = json.loads((out / f"{ids}.json").read_text())
    pairs = {"": load_preference_pairs([TOOLS_DATASET if args.tools else DATASET], str(out / folder))[0]}
    if args.tools:  # keys FAMILY/NAME/openai: the OpenAI-style records
        pairs["openai"] = load_preference_pairs([OPENAI_DATASET], str(out / folder))[0]
    rows, counts = [], {}
    for family in lf["families"]:
        tokenizer = AutoTokenizer.from_pretrained(Path(lf["tokenizers_dir"]) / family)
        for key, theirs in sorted(lf["ids"].items()):
            if not key.startswith(family + "/"):
                continue
            name, _, case = key.split("/", 1)[1].partition("/")
            cutoff = int(case.removeprefix("cutoff_len=")) if case.startswith("cutoff_len=") else CUTOFF
            records = pairs.get(case, pairs[""])
            verdict, detail = compare_one(tokenizer, theirs, prefalign_encode(tokenizer, name, records, cutoff))
            if case == "openai" and verdict == "differs":  # LF's openai converter drops a reply's tool_calls
                textual = [dataclasses.replace(p, chosen_calls=None, rejected_calls=None) for p in records]
                if compare_one(tokenizer, theirs, prefalign_encode(tokenizer, name, textual))[0] == "equal":
                    verdict = "LF drops the reply's tool_calls"
            counts[verdict] = counts.get(verdict, 0) + 1
            rows.append({"family": family, "name": key.split("/", 1)[1], "verdict": verdict, "detail": detail})
    (out / f"compare{'_' + kind if kind else ''}.json").write_text(json.dumps(
        {"llamafactory": lf["llamafactory"], "counts": counts, "rows": rows}, ensure_ascii=False, indent=1))
    print(f"LLaMA-Factory {lf['llamafactory']} vs prefalign, {sum(map(len, pairs.values()))} records, {len(lf['families'])} tokenizers: "
          + ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())))
    for row in rows:
        if row["verdict"] != "equal":
            print(f"{row['family']:>14} {row['name']:<24} {row['verdict']:<12} {row['detail'][:220]}")


# ---------------------------------------------------------------------------------------------
# The tests' frozen set

FROZEN_NAMES = ("qwen", "qwen3", "qwen3_nothink", "llama2", "llama3", "mistral", "phi", "alpaca", "vicuna",
                "default", "zephyr", "chatml", "smollm2", "gemma")


FROZEN_TRUNCATED_NAMES = ("qwen", "qwen3", "llama2", "llama3", "mistral", "alpaca")
FROZEN_TRUNCATED_FAMILIES = ("llama-spm", "llama3.1-bpe", "qwen2")


def run_freeze(args) -> None:
    from importlib.metadata import version

    from transformers import AutoTokenizer

    fixtures = Path(args.fixtures)
    records = records_for(args, fixtures / "data", per_kind=1)
    write_data(fixtures / "data", records)
    frozen = {"llamafactory": version("llamafactory"), "transformers": version("transformers"), "ids": {}}
    for family in sorted(p.name for p in (fixtures / "tokenizers").iterdir()):
        tokenizer = AutoTokenizer.from_pretrained(fixtures / "tokenizers" / family)
        for name in FROZEN_NAMES:
            for thinking in ((True, False) if name == "qwen3" else (True,)):
                key = f"{family}/{name}" + ("" if thinking else "/enable_thinking=false")
                frozen["ids"][key] = lf_encode(tokenizer, name, fixtures / "data", thinking)
    (fixtures / "frozen.json").write_text(json.dumps(frozen, separators=(",", ":")))
    truncated = {**frozen, "ids": {}}  # the same records cut by LF's pairwise processor (frozen_truncated.json)
    for family in FROZEN_TRUNCATED_FAMILIES:
        tokenizer = AutoTokenizer.from_pretrained(fixtures / "tokenizers" / family)
        for name in FROZEN_TRUNCATED_NAMES:
            for cutoff in CUTOFFS:
                truncated["ids"][f"{family}/{name}/cutoff_len={cutoff}"] = lf_encode(
                    tokenizer, name, fixtures / "data", cutoff_len=cutoff)
    (fixtures / "frozen_truncated.json").write_text(json.dumps(truncated, separators=(",", ":")))


# The tool-capable names frozen for the tool records, each with its own tool format, and qwen with another.
FROZEN_TOOL_CASES = (("qwen", None), ("qwen3", None), ("llama3", None), ("mistral", None), ("glm4", None),
                     ("chatml", None), ("default", None), ("seed_oss", None), ("qwen", "llama3"),
                     ("llama2", "mistral"))


def run_freeze_tools(args) -> None:
    """tests/fixtures/lf_parity/frozen_tools.json: LF's ids of TOOL_RECORDS for FROZEN_TOOL_CASES."""
    from importlib.metadata import version

    from transformers import AutoTokenizer

    fixtures = Path(args.fixtures)
    write_data(fixtures / "tools_data", TOOL_RECORDS, TOOLS_DATASET)
    frozen = {"llamafactory": version("llamafactory"), "transformers": version("transformers"), "today": TODAY,
              "ids": {}}
    for family in sorted(p.name for p in (fixtures / "tokenizers").iterdir()):
        tokenizer = AutoTokenizer.from_pretrained(fixtures / "tokenizers" / family)
        for name, tool_format in FROZEN_TOOL_CASES:
            key = f"{family}/{name}" + (f"/tool_format={tool_format}" if tool_format else "")
            frozen["ids"][key] = lf_encode(tokenizer, name, fixtures / "tools_data", dataset=TOOLS_DATASET,
                                           tool_format=tool_format)
    _fix_lf_date()
    texts = {}  # each tool format's text of the records' definitions and calls, straight from tool_utils
    from llamafactory.data.tool_utils import TOOLS, FunctionCall

    definitions = [json.loads(record["tools"]) for record in TOOL_RECORDS]
    calls = [[FunctionCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False))] for c in TOOL_CALLS]
    calls.append([FunctionCall(c[0].name, c[0].arguments) for c in calls])  # parallel calls
    for tool_format, utils in TOOLS.items():
        texts[tool_format] = {"tools": [utils.tool_formatter(d) for d in definitions], "calls": []}
        for call in calls:
            try:
                texts[tool_format]["calls"].append(utils.function_formatter(call))
            except ValueError as exc:  # glm4 writes no parallel calls
                texts[tool_format]["calls"].append({"error": str(exc)})
    frozen["texts"] = {"calls": [[list(c) for c in call] for call in calls], "formats": texts}
    (fixtures / "frozen_tools.json").write_text(json.dumps(frozen, ensure_ascii=False, separators=(",", ":")))


def run_shrink(args) -> None:
    """Small copies of real tokenizers for the tests: their first `--keep` BPE merges, with the tokens those
    make, every single character and byte token and every added token (a BPE with fewer merges), so the
    pre-tokenizer, normalizer and special tokens stay the real ones."""
    import shutil

    for family in args.families:
        source, target = Path(args.tokenizers) / family, Path(args.fixtures) / "tokenizers" / family
        target.mkdir(parents=True, exist_ok=True)
        spec = json.loads((source / "tokenizer.json").read_text())
        model = spec["model"]
        added = {token["content"] for token in spec["added_tokens"]}
        merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]][:args.keep]
        keep = added | {t for t, i in model["vocab"].items() if i < 259 or len(t) == 1}
        keep |= {piece for a, b in merges for piece in (a, b, a + b)}
        model["vocab"] = {t: i for t, i in model["vocab"].items() if t in keep}
        model["merges"] = [m for m in merges if all(p in model["vocab"] for p in (m[0], m[1], m[0] + m[1]))]
        (target / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, separators=(",", ":")))
        shutil.copy(source / "tokenizer_config.json", target / "tokenizer_config.json")
        print(f"{family}: {len(model['vocab'])} tokens, {len(model['merges'])} merges", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("lf", "compare", "freeze", "freeze-tools", "shrink"))
    parser.add_argument("--tools", action="store_true", help="lf / compare: the tool records (TOOL_RECORDS)")
    parser.add_argument("--truncate", action="store_true",
                        help="lf / compare: the plain records cut at each of CUTOFFS (TRUNCATION_NAMES)")
    parser.add_argument("--families", nargs="*", default=["llama-bpe", "llama-spm", "phi-3", "qwen2"])
    parser.add_argument("--add", nargs="*", help="lf: encode only these tokenizer folders, added to lf_ids.json")
    parser.add_argument("--keep", type=int, default=2000, help="shrink: the BPE merges kept")
    parser.add_argument("--lf-data", help="LLaMA-Factory's data/ folder (its sdist has it); without it, the records "
                                          "already in the output's data/ folder")
    parser.add_argument("--tokenizers", default="/work/artifacts/tokenizers")
    parser.add_argument("--out", default="/work/artifacts/lf_parity")
    parser.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "lf_parity"))
    args = parser.parse_args()
    {"lf": run_lf, "compare": run_compare, "freeze": run_freeze, "freeze-tools": run_freeze_tools,
     "shrink": run_shrink}[args.mode](args)


if __name__ == "__main__":
    main()
