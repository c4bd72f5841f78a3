"""Chat data as people have it: system turns a template refuses, prompts that are not a prefix,
thinking switches and chat-template arguments, tools in three shapes."""

import json

import pytest
from helpers import NO_SYSTEM_CHATML, SYSTEM_LAST_CHATML, THINKING_CHATML, TOOLS_CHATML, write_json

from prefalign.config import build_config
from prefalign.data.collate import IGNORE_INDEX, PairCollator
from prefalign.data.pipeline import prepare_data
from prefalign.errors import DataError, PairError

SYSTEM = "Answer briefly."
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"


def records(n=6, with_system=(0, 3), extra=None):
    """LLaMA-Factory dpo_en_demo-style sharegpt records; those in `with_system` start with a system turn."""
    return [{"conversations": ([{"from": "system", "value": SYSTEM}] if i in with_system else [])
             + [{"from": "human", "value": f"Question {i}?"}],
             "chosen": {"from": "gpt", "value": f"Good answer {i}."},
             "rejected": {"from": "gpt", "value": f"Bad answer {i}."}, **(extra or {}).get(i, {})} for i in range(n)]


def prepare(tokenizer, tmp_path, data, **keys):
    values = {"model_name_or_path": "unused", "dataset": write_json(tmp_path / "data.json", data),
              "cutoff_len": 256, **keys}
    config = build_config(values)
    return prepare_data(config.data, tokenizer, seed=0, need_train=bool(config.data.dataset),
                        cache_dir=str(tmp_path / "cache"))


def rows(dataset) -> dict:
    return {row["index"]: row for row in dataset}


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_system_turn_the_template_refuses_is_folded_into_the_first_user_turn(tiny_tokenizer, tmp_path):
    tiny_tokenizer.chat_template = NO_SYSTEM_CHATML
    data = prepare(tiny_tokenizer, tmp_path, records())
    assert data.summary.train.folded_system_turns == 2 and data.summary.train.pairs == 6
    by_index = rows(data.train)
    assert tiny_tokenizer.decode(by_index[0]["prompt_ids"]) == (
        f"<|im_start|>user\n{SYSTEM}\n\nQuestion 0?<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(by_index[1]["prompt_ids"]) == "<|im_start|>user\nQuestion 1?<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(by_index[0]["chosen_ids"]) == "Good answer 0.<|im_end|>"
    assert "train: 2 system turns folded into the first user turn" in data.summary.describe()


def test_a_refused_system_turn_with_fold_off_is_an_error_or_a_skipped_record(tiny_tokenizer, tmp_path):
    tiny_tokenizer.chat_template = NO_SYSTEM_CHATML
    with pytest.raises(DataError, match=r"data.json record 0 \(line \d+\), field prompt: the tokenizer's own chat template cannot "
                                        r"render this conversation: System role not supported; set on_unsupported"):
        prepare(tiny_tokenizer, tmp_path, records(), on_unsupported_system="error")
    data = prepare(tiny_tokenizer, tmp_path, records(), on_unsupported_system="error", on_bad_record="skip")
    assert data.summary.train.pairs == 4 and data.summary.skipped_by_stage == {"render": 2}
    assert [(r["index"], r["stage"], r["field"]) for r in data.rejects] == [(0, "render", "prompt"),
                                                                            (3, "render", "prompt")]
    assert data.rejects[0]["record"]["prompt"][0] == {"role": "system", "content": SYSTEM}
    assert sorted(rows(data.train)) == [1, 2, 4, 5]


def test_a_prompt_that_is_not_a_prefix_is_an_error_by_default(tiny_tokenizer, tmp_path):
    tiny_tokenizer.chat_template = SYSTEM_LAST_CHATML
    with pytest.raises(PairError, match=r"record 0 \(line \d+\), field chosen: with the tokenizer's own chat template, the rendered "
                                        r"prompt is not a prefix.*on_prompt_not_prefix: append") as error:
        prepare(tiny_tokenizer, tmp_path, records())
    assert error.value.stage == "prefix"
    data = prepare(tiny_tokenizer, tmp_path, records(), on_bad_record="skip")
    assert data.summary.skipped_by_stage == {"prefix": 2} and data.summary.train.pairs == 4


def test_append_keeps_the_generation_prompt_and_appends_reply_and_end_of_turn(tiny_tokenizer, tmp_path):
    """Mistral-Nemo style: the system text sits in the last user turn of the prompt; the reply follows
    the prompt as the template writes an assistant turn."""
    tiny_tokenizer.chat_template = SYSTEM_LAST_CHATML
    data = prepare(tiny_tokenizer, tmp_path, records(), on_prompt_not_prefix="append")
    assert data.summary.train.appended_replies == 2
    row = rows(data.train)[0]
    assert row["prompt_ids"] == ids(tiny_tokenizer, f"<|im_start|>user\n{SYSTEM}\n\nQuestion 0?<|im_end|>\n"
                                                    "<|im_start|>assistant\n")
    assert row["chosen_ids"] == ids(tiny_tokenizer, "Good answer 0.<|im_end|>")
    assert row["rejected_ids"] == ids(tiny_tokenizer, "Bad answer 0.<|im_end|>")
    # records without a system turn are a prefix and encoded as always
    assert rows(data.train)[1]["chosen_ids"] == ids(tiny_tokenizer, "Good answer 1.<|im_end|>")


@pytest.mark.parametrize("keys, in_prompt, in_reply", [
    # LLaMA-Factory's templates: qwen3_nothink writes no thought block at all; qwen3 (enable_thinking true by
    # default, as in LLaMA-Factory) trains the empty block at the start of a reply without one, and with
    # thinking off puts it in the (untrained) prompt; both train the newline after <|im_end|>, as LF does
    ({"template": "qwen3_nothink"}, "", "Good answer 0.<|im_end|>\n"),
    ({"template": "qwen3"}, "", EMPTY_THOUGHT + "Good answer 0.<|im_end|>\n"),
    ({"template": "qwen3", "enable_thinking": False}, EMPTY_THOUGHT, "Good answer 0.<|im_end|>\n"),
    # the tokenizer's own template gets the switch as a template argument
    ({}, "", "Good answer 0.<|im_end|>"),
    ({"enable_thinking": False}, EMPTY_THOUGHT, "Good answer 0.<|im_end|>"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, EMPTY_THOUGHT, "Good answer 0.<|im_end|>"),
])
def test_thinking_switch_reaches_the_template(tiny_tokenizer, tmp_path, keys, in_prompt, in_reply):
    tiny_tokenizer.chat_template = THINKING_CHATML
    data = prepare(tiny_tokenizer, tmp_path, records(n=2, with_system=()), **keys)
    row = rows(data.train)[0]
    header = "<|im_start|>user\nQuestion 0?<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(row["prompt_ids"]) == header + in_prompt
    assert tiny_tokenizer.decode(row["chosen_ids"]) == in_reply
    if "template" in keys:
        assert "LLaMA-Factory 0.9.5's slots, encoded slot by slot" in data.summary.template


def test_a_records_own_chat_template_kwargs_go_on_top_of_the_configs(tiny_tokenizer, tmp_path):
    tiny_tokenizer.chat_template = THINKING_CHATML
    data = prepare(tiny_tokenizer, tmp_path, records(n=3, with_system=(), extra={
        1: {"chat_template_kwargs": {"enable_thinking": False}},
        2: {"chat_template_kwargs": {"enable_thinking": True}}}), enable_thinking=False)
    decoded = {i: tiny_tokenizer.decode(row["prompt_ids"]) for i, row in rows(data.train).items()}
    assert decoded[0].endswith(EMPTY_THOUGHT) and decoded[1].endswith(EMPTY_THOUGHT)
    assert decoded[2].endswith("<|im_start|>assistant\n")


def test_chat_and_eval_render_with_the_same_template_arguments(tiny_tokenizer, tmp_path):
    from prefalign.chat import ChatSession

    tiny_tokenizer.chat_template = THINKING_CHATML
    for keys, ending in (({"template": "qwen3_nothink"}, "<|im_start|>assistant\n"),
                         ({"template": "qwen3", "enable_thinking": False}, "<|im_start|>assistant\n" + EMPTY_THOUGHT)):
        config = build_config({"model_name_or_path": "unused", **keys})
        session = ChatSession(config, tiny_tokenizer, [], seed=0, device="cpu")
        prompt = tiny_tokenizer.decode(session.renderer.prompt_ids([{"role": "user", "content": "Hi"}]))
        assert prompt == "<|im_start|>user\nHi<|im_end|>\n" + ending
        data = prepare(tiny_tokenizer, tmp_path, [], dataset=None, **keys,
                       eval_dataset=write_json(tmp_path / "eval.json", records(n=2, with_system=())))
        assert tiny_tokenizer.decode(data.eval[0]["prompt_ids"]).endswith(ending)


WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
RESULT = '{"sky": "sunny"}'
TOOL_SHAPES = {
    # LLaMA-Factory sharegpt: a `tools` JSON string, function_call and observation turns
    "llamafactory": {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                       {"from": "function_call",
                                        "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
                                       {"from": "observation", "value": RESULT}],
                     "chosen": {"from": "gpt", "value": "It is sunny."},
                     "rejected": {"from": "gpt", "value": "It is raining."}, "tools": json.dumps([WEATHER])},
    # TRL conversational: a `tools` list of JSON schemas, tool_calls and tool messages
    "trl": {"prompt": [{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": "", "tool_calls": [
                           {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                       {"role": "tool", "name": "get_weather", "content": RESULT}],
            "chosen": [{"role": "assistant", "content": "It is sunny."}],
            "rejected": [{"role": "assistant", "content": "It is raining."}],
            "tools": [{"type": "function", "function": WEATHER}]},
    # OpenAI messages: arguments as a JSON string, a tool message answering a call id
    "openai": {"messages": [{"role": "user", "content": "Weather in Paris?"},
                            {"role": "assistant", "content": None, "tool_calls": [
                                {"id": "call_1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                            {"role": "tool", "tool_call_id": "call_1", "content": RESULT}],
               "chosen": "It is sunny.", "rejected": "It is raining.",
               "tools": [{"type": "function", "function": WEATHER}]},
}


def test_tools_in_three_shapes_render_the_same_boundary_and_masks(tiny_tokenizer, tmp_path):
    tiny_tokenizer.chat_template = TOOLS_CHATML
    registry = {"lf_tools": {"file_name": "lf.json", "formatting": "sharegpt", "ranking": True,
                             "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                         "tools": "tools"}}}
    write_json(tmp_path / "dataset_info.json", registry)
    write_json(tmp_path / "lf.json", [TOOL_SHAPES["llamafactory"]])
    write_json(tmp_path / "trl.json", [TOOL_SHAPES["trl"]])
    write_json(tmp_path / "openai.json", [TOOL_SHAPES["openai"]])
    config = build_config({"model_name_or_path": "unused", "dataset": "lf_tools,trl.json,openai.json",
                           "dataset_dir": str(tmp_path), "cutoff_len": 512})
    data = prepare_data(config.data, tiny_tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    expected_prompt = (
        "<|im_start|>system\n# Tools\n<tools>\n" + json.dumps({"type": "function", "function": WEATHER})
        + "\n</tools><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        f"<|im_start|>user\n<tool_response>\n{RESULT}\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert len(data.train) == 3
    for row in data.train:
        assert row["prompt_ids"] == ids(tiny_tokenizer, expected_prompt)
        assert row["chosen_ids"] == ids(tiny_tokenizer, "It is sunny.<|im_end|>")
        assert row["rejected_ids"] == ids(tiny_tokenizer, "It is raining.<|im_end|>")
    batch = PairCollator(pad_token_id=tiny_tokenizer.pad_token_id)([data.train[0]])
    prompt_length = len(data.train[0]["prompt_ids"])
    labels = batch["labels"][0].tolist()
    assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length  # the tool call and result are not trained
    assert labels[prompt_length:] == data.train[0]["chosen_ids"]


@pytest.mark.parametrize("shape", sorted(TOOL_SHAPES))
def test_tool_data_with_a_builtin_template_encodes(shape, tiny_tokenizer, tmp_path):
    """Tool records of each shape encode with a built-in template (LLaMA-Factory's tool slots: their ids are checked
    against LF's in tests/data/test_lf_parity.py): the definitions, the call and the result are in the prompt."""
    # cutoff_len 1024: the prompt (qwen's system text and tool prompt, the call, the result) fits; a built-in template
    # cuts as LLaMA-Factory does, keeping the prompt's start, so a shorter one cuts the call and the result
    data = prepare(tiny_tokenizer, tmp_path, [TOOL_SHAPES[shape]], template="qwen", cutoff_len=1024)
    assert len(data.train) == 1 and not data.summary.skipped_by_stage
    prompt = tiny_tokenizer.decode(data.train[0]["prompt_ids"])
    assert all(word in prompt for word in ("get_weather", "Paris", "<tool_call>", "<tool_response>")), prompt


def test_a_split_whose_every_pair_fails_is_an_error_naming_the_first(tiny_tokenizer, tmp_path):
    tiny_tokenizer.chat_template = NO_SYSTEM_CHATML
    with pytest.raises(DataError, match=r"train: all 2 pairs failed to encode.*record 0 \(render\), field prompt: .*"
                                        r"System role not supported"):
        prepare(tiny_tokenizer, tmp_path, records(n=2, with_system=(0, 1)), on_unsupported_system="error",
                on_bad_record="skip")


def test_a_pair_error_survives_the_trip_from_a_worker_process():
    import pickle

    error = pickle.loads(pickle.dumps(PairError("render", "f.json record 3", "prompt", "no system role")))
    assert (error.stage, error.field, str(error)) == ("render", "prompt", "f.json record 3, field prompt: no system role")
