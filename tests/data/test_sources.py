"""Reading datasets (data/sources.py): the fixture registry and files, paths and hub names, broken
files and bad records (error and skip), sampling and mixing."""

import json
import os

import pytest
from helpers import FIXTURES

from prefalign.data.sources import load_preference_pairs, mix
from prefalign.errors import ConfigError, DataError

DIR = str(FIXTURES)


def load(*names, dataset_dir=DIR, **options):
    return load_preference_pairs(list(names), dataset_dir, **options)


def data_error(*names, dataset_dir=DIR, **options) -> str:
    with pytest.raises(DataError) as caught:
        load(*names, dataset_dir=dataset_dir, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


def write(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def user(text):
    return {"role": "user", "content": text}


GOOD = {"prompt": "Q", "chosen": "good", "rejected": "bad"}


# --- the fixture registry ---------------------------------------------------------------------


@pytest.mark.parametrize("name, count", [
    ("alpaca_pairs", 3), ("alpaca_plain", 3), ("alpaca_dir", 3), ("csv_remapped", 2),
    ("sharegpt_pairs", 2), ("sharegpt_custom", 2), ("openai_pairs", 2),
])
def test_every_registry_entry_loads(name, count):
    pairs, report = load(name)
    assert len(pairs) == count
    assert report.loaded == {name: count} and report.skipped == {name: 0} and report.used == {name: count}
    assert all(pair.source.dataset == name for pair in pairs)


def test_registry_alpaca_with_system_and_history_columns():
    pairs, _ = load("alpaca_pairs")
    assert pairs[1].prompt == [{"role": "system", "content": "You are a careful translator."},
                               user("Translate to French.\nGood morning")]
    assert pairs[2].prompt == [user("What is 2 plus 2?"), {"role": "assistant", "content": "2 plus 2 is 4."},
                               user("And what is 3 times that?")]
    assert pairs[2].source.file == os.path.join(DIR, "alpaca_pairs.json")
    assert (pairs[2].source.index, pairs[2].source.line) == (2, 15)


def test_registry_alpaca_without_columns_ignores_system_and_history():
    pairs, _ = load("alpaca_plain")
    assert [len(pair.prompt) for pair in pairs] == [1, 1, 1]


def test_registry_sharegpt_tools_and_tool_turns():
    pairs, _ = load("sharegpt_pairs")
    assert pairs[0].prompt[0] == {"role": "system", "content": "Answer in one word."}
    assert [m["role"] for m in pairs[1].prompt] == ["user", "assistant", "tool"]
    assert json.loads(pairs[1].tools)[0]["name"] == "get_temperature"  # the bare definition, as the file has it


def test_registry_custom_columns_and_tags():
    pairs, _ = load("sharegpt_custom")
    assert pairs[0].prompt == [{"role": "system", "content": "You like short answers."},
                               user("How many legs does a spider have?")]
    assert (pairs[0].chosen, pairs[0].rejected) == ("Eight.", "Six.")
    assert pairs[1].source.line == 3  # the blank line 2 is not a record
    assert pairs[1].source.index == 1


def test_registry_openai_replies_as_message_or_list():
    pairs, _ = load("openai_pairs")
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("Hello! Nice to meet you.", "What do you want?"), ("Water makes other things wet.", "No idea.")]


def test_registry_directory_reads_its_files_in_name_order_and_ignores_others():
    pairs, _ = load("alpaca_dir")
    assert [p.chosen for p in pairs] == ["2", "4", "6"]
    assert [os.path.basename(p.source.file) for p in pairs] == ["part-000.jsonl"] * 2 + ["part-001.jsonl"]


def test_num_samples_draws_with_replacement_when_larger_than_the_dataset():
    pairs, report = load("alpaca_upsampled")
    indices = [p.source.index for p in pairs]
    assert len(indices) == 5 and set(indices) == {0, 1, 2}  # every record at least once
    assert report.loaded == {"alpaca_upsampled": 5}
    assert indices == [p.source.index for p in load("alpaca_upsampled")[0]]  # seeded


def test_num_samples_smaller_than_the_dataset_is_a_seeded_subset_without_repeats():
    runs = {seed: [p.source.index for p in load("alpaca_subsampled", seed=seed)[0]] for seed in range(6)}
    assert all(len(set(indices)) == 2 for indices in runs.values())
    assert len({tuple(indices) for indices in runs.values()}) > 1  # the seed matters


def test_max_samples_keeps_the_first_records_of_each_dataset():
    pairs, report = load("alpaca_pairs", "openai_pairs", max_samples=2)
    assert [p.source.index for p in pairs] == [0, 1, 0, 1]
    assert report.loaded == {"alpaca_pairs": 2, "openai_pairs": 2}


def test_registry_hub_entry_calls_load_dataset_with_its_settings(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list([
            {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "a"},
             "rejected": {"from": "gpt", "value": "b"}}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, _ = load("hub_pairs")
    assert calls == [("example-org/tiny-preferences",
                      {"name": "en", "split": "test", "data_dir": "v1", "revision": None})]
    assert pairs[0].prompt == [user("Q")]
    assert str(pairs[0].source) == "example-org/tiny-preferences[test] record 0"


def test_a_name_that_is_no_path_is_a_hub_dataset_when_there_is_no_registry(monkeypatch, tmp_path):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: calls.append((path, kw)) or
                        datasets.Dataset.from_list([GOOD]))
    pairs, _ = load("someone/prefs", dataset_dir=str(tmp_path))
    assert calls[0][0] == "someone/prefs" and calls[0][1]["split"] == "train"
    assert pairs[0].chosen == "good"


def test_a_failing_hub_load_is_a_data_error(monkeypatch, tmp_path):
    import datasets

    def fail(path, **kwargs):
        raise FileNotFoundError("Dataset 'someone/missing' doesn't exist on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    message = data_error("someone/missing", dataset_dir=str(tmp_path))
    assert "someone/missing" in message and "doesn't exist on the Hub" in message


# --- registry errors --------------------------------------------------------------------------


def test_a_non_preference_registry_entry_says_to_add_ranking():
    message = data_error("alpaca_sft")
    assert message.startswith(f"dataset 'alpaca_sft' in {os.path.join(DIR, 'dataset_info.json')} is not "
                              "a preference dataset: add \"ranking\": true")


def test_an_unknown_name_lists_the_registry_and_suggests_a_close_name():
    message = data_error("alpaca_pair")
    assert os.path.join(DIR, "dataset_info.json") in message
    assert "did you mean 'alpaca_pairs'?" in message and "sharegpt_custom" in message


@pytest.mark.parametrize("entry, says", [
    ({"file_name": "a.json", "ranking": True, "formating": "sharegpt"},
     "unknown key \"formating\" (did you mean 'formatting'?)"),
    ({"file_name": "missing.json", "ranking": True}, "\"file_name\" 'missing.json' not found"),
    ({"file_name": "a.json", "ranking": True, "num_samples": 0}, "\"num_samples\" is 0"),
    ({"file_name": "a.json", "ranking": True, "columns": {"chosen": "good", "rejectd": "bad"}},
     "(did you mean 'rejected'?)"),
    ({"script_url": "my_script", "ranking": True}, "no \"file_name\" or \"hf_hub_url\""),
    ({"file_name": "a.json", "ranking": "yes"}, "is not a preference dataset"),
])
def test_registry_entry_errors_name_the_dataset_and_registry(tmp_path, entry, says):
    write(tmp_path, "a.json", json.dumps([GOOD]))
    registry = write(tmp_path, "dataset_info.json", json.dumps({"mine": entry}))
    message = data_error("mine", dataset_dir=str(tmp_path))
    assert message.startswith(f"dataset 'mine' in {registry}") and says in message


def test_a_registry_that_does_not_parse_gives_line_and_column(tmp_path):
    registry = write(tmp_path, "dataset_info.json", '{\n  "mine": {"file_name": "a.json",}\n}\n')
    message = data_error("mine", dataset_dir=str(tmp_path))
    assert message.startswith(f"{registry}: not valid JSON at line 2, column 34")


# --- paths ------------------------------------------------------------------------------------


def test_paths_absolute_relative_to_cwd_and_relative_to_dataset_dir(tmp_path, monkeypatch):
    absolute = str(FIXTURES / "trl_standard.jsonl")
    assert len(load(absolute, dataset_dir=str(tmp_path))[0]) == 3
    monkeypatch.chdir(FIXTURES.parent)
    assert len(load("data/trl_standard.jsonl", dataset_dir=str(tmp_path))[0]) == 3
    assert len(load("trl_standard.jsonl", dataset_dir=DIR)[0]) == 3  # beside the registry


def test_a_missing_file_is_not_sent_to_the_hub(tmp_path):
    message = data_error("nowhere/prefs.jsonl", dataset_dir=str(tmp_path))
    assert "no such file or directory" in message and "nowhere/prefs.jsonl" in message


@pytest.mark.parametrize("name, first_prompt, chosen", [
    ("trl_standard.jsonl", [user("What is the boiling point of water at sea level?")], "100 °C (212 °F)."),
    ("trl_conversational.jsonl", [{"role": "system", "content": "You are a math tutor."},
                                  user("What is 7 squared?")], "49"),
    ("implicit_messages.jsonl", [user("What is the capital of Italy?")], "Rome."),
    ("hh_transcripts.jsonl", [user("How do I boil an egg?")], "Put it in boiling water for about nine minutes."),
    ("ultrafeedback.jsonl", [user("Give a synonym for 'quick'.")], "Fast."),
    ("prompt_pairs.csv", [user("List two colours, separated by a comma.")], "red, blue"),
    ("pairs_dir", [user("What is 1 + 1?")], "2"),
])
def test_files_without_registry_entry_are_detected(name, first_prompt, chosen):
    pairs, _ = load(str(FIXTURES / name), dataset_dir="/nonexistent")
    assert pairs[0].prompt == first_prompt and pairs[0].chosen == chosen


def test_csv_cells_may_hold_commas_and_newlines_and_records_know_their_line():
    pairs, _ = load(str(FIXTURES / "prompt_pairs.csv"), dataset_dir="/nonexistent")
    assert pairs[1].chosen == "Roses bloom at dawn,\nthe dew is gone by noon."
    assert (pairs[1].source.index, pairs[1].source.line) == (1, 3)


def test_parquet_with_nulls_in_optional_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "Q1", "input": None, "chosen": "a", "rejected": "b", "system": None},
            {"instruction": "Q2", "input": "more", "chosen": "c", "rejected": "d", "system": "S"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    pairs, _ = load(str(tmp_path / "pairs.parquet"), dataset_dir=str(tmp_path))
    assert pairs[0].prompt == [user("Q1")]
    assert pairs[1].prompt == [{"role": "system", "content": "S"}, user("Q2\nmore")]


def test_a_json_file_holding_one_object_per_line_is_read_as_jsonl(tmp_path):
    path = write(tmp_path, "prefs.json", jsonl(GOOD, {**GOOD, "chosen": "better"}))
    pairs, _ = load(path, dataset_dir=str(tmp_path))
    assert [(p.chosen, p.source.line) for p in pairs] == [("good", 1), ("better", 2)]


def test_a_json_object_that_is_not_an_array_is_refused(tmp_path):
    path = write(tmp_path, "prefs.json", json.dumps({"data": [GOOD]}))
    assert "expected a JSON array of records" in data_error(path, dataset_dir=str(tmp_path))


@pytest.mark.parametrize("files, says", [
    ({"a.json": json.dumps([GOOD]), "b.jsonl": jsonl(GOOD)}, "several types (.json, .jsonl)"),
    ({"notes.txt": "hi"}, "no data files"),
    ({"empty.jsonl": "\n\n"}, "holds no records"),
])
def test_directory_and_empty_file_errors(tmp_path, files, says):
    folder = tmp_path / "prefs"
    folder.mkdir()
    for name, content in files.items():
        write(folder, name, content)
    assert says in data_error(str(folder), dataset_dir=str(tmp_path))


# --- broken files -----------------------------------------------------------------------------


def test_non_utf8_json_names_the_byte_offset_and_line(tmp_path):
    path = write(tmp_path, "prefs.json", b'[\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n]\n')
    message = data_error(path, dataset_dir=str(tmp_path))
    assert message.startswith(f"{path}: not valid UTF-8 at byte offset 17 (line 2)")


def test_non_utf8_jsonl_line_is_a_bad_record_naming_line_and_byte_offset(tmp_path):
    good = json.dumps(GOOD).encode()
    path = write(tmp_path, "prefs.jsonl", good + b"\n" + b'{"prompt": "caf\xe9"}\n' + good + b"\n")
    message = data_error(path, dataset_dir=str(tmp_path))
    offset = len(good) + 1 + len(b'{"prompt": "caf')
    assert message.startswith(f"{path} record 1 (line 2), field '(whole record)': not valid UTF-8 at "
                              f"byte offset {offset}")
    pairs, report = load(path, dataset_dir=str(tmp_path), on_bad_record="skip")
    assert len(pairs) == 2 and report.skipped == {path: 1}


def test_a_json_file_cut_off_mid_record_gives_line_and_column(tmp_path):
    text = '[\n  {"prompt": "Q", "chosen": "a", "rejected": "b"},\n  {"prompt": "Q2", "cho'
    path = write(tmp_path, "prefs.json", text)
    message = data_error(path, dataset_dir=str(tmp_path))
    assert message.startswith(f"{path}: not valid JSON at line 3, column 20: Unterminated string")
    assert "cut off" in message


def test_a_json_syntax_error_mid_file_gives_line_and_column(tmp_path):
    text = '[\n  {"prompt": "Q", "chosen": "a", "rejected": "b"}\n  {"prompt": "Q2"}\n]'  # no comma
    path = write(tmp_path, "prefs.json", text)
    assert data_error(path, dataset_dir=str(tmp_path)).startswith(
        f"{path}: not valid JSON at line 3, column 3: Expecting ',' or ']'")


def test_a_jsonl_file_cut_off_mid_record(tmp_path):
    path = write(tmp_path, "prefs.jsonl", jsonl(GOOD, GOOD | {"chosen": "fine"}) + '{"prompt": "Q", "chos')
    message = data_error(path, dataset_dir=str(tmp_path))
    assert message.startswith(f"{path} record 2 (line 3), field '(whole record)': not valid JSON")
    assert "cut off" in message
    pairs, report = load(path, dataset_dir=str(tmp_path), on_bad_record="skip")
    assert len(pairs) == 2 and report.rejects[0]["record"] == '{"prompt": "Q", "chos'


def test_a_csv_row_with_too_few_values(tmp_path):
    path = write(tmp_path, "prefs.csv", "prompt,chosen,rejected\nQ,a,b\nQ2,only\n")
    assert data_error(path, dataset_dir=str(tmp_path)).startswith(
        f"{path} record 1 (line 3), field 'rejected': is missing: the row has 2 values for 3 columns")


# --- bad records: error names file, record, line and field; skip counts them -------------------

BAD_RECORDS = [
    ({"prompt": "Q", "chosen": "a"}, "rejected", "is missing"),
    ({"prompt": "Q", "chosen": ["a"], "rejected": "b"}, "chosen[0]", "expected a message object"),
    ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "chosen", "found a number (3)"),
    ({"prompt": "Q", "chosen": "   ", "rejected": "b"}, "chosen", "empty or whitespace only"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "rejected", "identical to 'chosen'"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "prompt", "is null"),
    ({"prompt": [user("Q"), {"role": "assistant", "content": "A"}], "chosen": "a", "rejected": "b"},
     "prompt", "ends with an assistant message"),
    ({"prompt": [{"role": "assistant", "content": "A"}, user("Q")], "chosen": "a", "rejected": "b"},
     "prompt[0]", "has role 'assistant' first"),
    ({"prompt": "Q", "chosen": "x" * 1_000_001, "rejected": "b"}, "chosen", "more than the limit"),
    ('["Q", "a", "b"]', "(whole record)", "expected an object"),
    ('{"prompt": "Q", "chosen": "a", "rejected": "b"', "(whole record)", "not valid JSON"),
]


@pytest.mark.parametrize("record, field, says", BAD_RECORDS)
def test_a_bad_record_stops_with_file_index_line_and_field(tmp_path, record, field, says):
    path = write(tmp_path, "prefs.jsonl", jsonl(GOOD, GOOD, record, GOOD))
    message = data_error(path, dataset_dir=str(tmp_path))
    assert message.startswith(f"{path} record 2 (line 3), field '{field}': ")
    assert says in message and "on_bad_record: skip" in message
    assert len(message) < 1000  # a huge value is not echoed


def test_skip_keeps_or_counts_every_record_and_explains_each_reject(tmp_path):
    records = [GOOD] + [record for record, _, _ in BAD_RECORDS] + [GOOD]
    path = write(tmp_path, "prefs.jsonl", jsonl(*records))
    pairs, report = load(path, dataset_dir=str(tmp_path), on_bad_record="skip")
    assert len(pairs) == 2 and report.skipped == {path: len(BAD_RECORDS)}
    assert report.loaded[path] + report.skipped[path] == len(records)
    assert [(r["index"], r["line"], r["field"]) for r in report.rejects] == [
        (n + 1, n + 2, field) for n, (_, field, _) in enumerate(BAD_RECORDS)]
    first = report.rejects[0]
    assert first["dataset"] == path and first["file"] == path and "is missing" in first["reason"]
    assert first["record"] == {"prompt": "Q", "chosen": "a"}
    long = next(r for r in report.rejects if "limit" in r["reason"])
    assert len(long["record"]["chosen"]) < 3000  # the rejects file stays small
    json.dumps(report.rejects)  # saved as JSON (rejected_records.jsonl)


def test_when_every_record_is_bad_the_error_shows_the_first(tmp_path):
    path = write(tmp_path, "prefs.jsonl", jsonl({"prompt": "Q", "chosen": "a", "rejected": None}))
    message = data_error(path, dataset_dir=str(tmp_path), on_bad_record="skip")
    assert "all 1 records were bad" in message and "record 0, field 'rejected': is null" in message


def test_a_bad_record_in_a_registry_dataset_names_its_remapped_column(tmp_path):
    write(tmp_path, "a.json", json.dumps([{"instruction": "Q", "good": "a", "bad": None}]))
    write(tmp_path, "dataset_info.json", json.dumps(
        {"mine": {"file_name": "a.json", "ranking": True, "columns": {"chosen": "good", "rejected": "bad"}}}))
    message = data_error("mine", dataset_dir=str(tmp_path))
    assert message.startswith(f"{tmp_path / 'a.json'} record 0 (line 1), field 'bad': is null")


# --- mixing -----------------------------------------------------------------------------------


def test_concat_keeps_dataset_order():
    pairs, report = load("alpaca_pairs", "openai_pairs")
    assert [p.source.dataset for p in pairs] == ["alpaca_pairs"] * 3 + ["openai_pairs"] * 2
    assert report.used == {"alpaca_pairs": 3, "openai_pairs": 2}


def test_interleave_without_probabilities_takes_turns():
    """As `datasets.interleave_datasets`: A B A B | A (B is out: stop) or A B A B A B(again) A."""
    a, b = list("ABC"), list("xy")
    assert mix([a, b], "interleave_under", None, 0) == ["A", "x", "B", "y", "C"]
    assert mix([a, b], "interleave_over", None, 0) == ["A", "x", "B", "y", "C"]
    assert mix([list("AB"), list("xyz")], "interleave_under", None, 0) == ["A", "x", "B", "y"]
    assert mix([list("AB"), list("xyz")], "interleave_over", None, 0) == ["A", "x", "B", "y", "A", "z"]


def test_interleave_with_probabilities_is_seeded():
    a, b = [f"a{i}" for i in range(50)], [f"b{i}" for i in range(50)]
    under = mix([a, b], "interleave_under", [0.8, 0.2], 7)
    assert under == mix([a, b], "interleave_under", [0.8, 0.2], 7)
    assert under != mix([a, b], "interleave_under", [0.8, 0.2], 8)
    assert len(under) < 100 and (under.count("a49") == 1 or "b49" in under)  # stopped at the first out
    over = mix([a, b], "interleave_over", [0.8, 0.2], 7)
    assert set(a) | set(b) <= set(over)  # every pair used at least once
    assert mix([a, b], "interleave_over", [1.0, 0.0], 7) == a  # a zero-probability dataset is not used


def test_interleave_report_counts_pairs_used():
    """openai_pairs (2) and alpaca_pairs (3) in turns: o0 a0 o1 a1 o0 a2: every pair used, o0 twice."""
    pairs, report = load("openai_pairs", "alpaca_pairs", mix_strategy="interleave_over")
    assert [p.source.index for p in pairs] == [0, 0, 1, 1, 0, 2]
    assert report.loaded == {"openai_pairs": 2, "alpaca_pairs": 3}
    assert report.used == {"openai_pairs": 3, "alpaca_pairs": 3}


@pytest.mark.parametrize("options, says", [
    ({"on_bad_record": "skipp"}, "did you mean 'skip'?"),
    ({"mix_strategy": "interleave"}, "mix_strategy"),
    ({"mix_strategy": "interleave_under", "interleave_probs": [1.0]}, "1 values for 2 datasets"),
    ({"mix_strategy": "interleave_under", "interleave_probs": [0.5, 0.6]}, "sum to 1"),
    ({"interleave_probs": [0.5, 0.5]}, "mix_strategy is concat"),
    ({"max_samples": 0}, "max_samples"),
])
def test_bad_options_are_config_errors(options, says):
    with pytest.raises(ConfigError) as caught:
        load("alpaca_pairs", "openai_pairs", **options)
    assert says in str(caught.value)


def test_a_dataset_listed_twice_is_refused():
    with pytest.raises(ConfigError, match="listed more than once"):
        load("alpaca_pairs", "alpaca_pairs")
