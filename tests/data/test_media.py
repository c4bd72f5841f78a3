"""A record's images (data/media.py): the right bytes in the right order from every record shape, LLaMA-Factory's
rules (checked against LF's own converter, tests/fixtures/lf_parity/frozen_media.json), and each bad image a
one-line named error from the CLI or, with on_bad_record: skip, a counted skip at stage "media"."""

import io
import json
import subprocess
import sys

import pytest
from helpers import EXAMPLES, ROOT
from mm_helpers import RLHF_V_ENTRY, build_vlm, draw_image, png_bytes, rlhf_v_records, write_rlhf_v
from PIL import Image

from prefalign.data.formats import RecordError, detect_format, format_from_registry, to_pair
from prefalign.data.media import MediaReader, open_image, with_media
from prefalign.data.sources import DataReport, DatasetSpec, _read_hub, convert_records, load_preference_pairs

FROZEN = json.loads((ROOT / "tests" / "fixtures" / "lf_parity" / "frozen_media.json").read_text())


def read(record, fmt, media_dir):
    """One record through the loader's two steps: to_pair, then its media."""
    from prefalign.contracts import RecordSource

    return with_media(to_pair(record, fmt, RecordSource("f.json", 0)), record, fmt, MediaReader(str(media_dir)))


# --- LLaMA-Factory's rules, as LF 0.9.5 itself applied them ------------------------------------------------


def test_media_paths_and_placeholder_rule_match_llamafactory(tmp_path, monkeypatch):
    """For each record of benchmarks/lf_media_parity.py, LF read these files (relative paths in media_dir,
    else as given from the working directory; absolute paths) or refused the record; prefalign reads the
    same files' bytes in the same order and refuses the same records (stage media)."""
    assert FROZEN["llamafactory"] == "0.9.5"
    for relative, (width, height, colour) in FROZEN["layout"].items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), tuple(colour)).save(tmp_path / relative)
    monkeypatch.chdir(tmp_path / FROZEN["working_dir"])
    for n, (entry, lf) in enumerate(zip(FROZEN["records"], FROZEN["lf"], strict=True)):
        record = json.loads(json.dumps(entry["record"]).replace("{root}", str(tmp_path)))
        columns = {"images": "images"} if entry["formatting"] == "alpaca" else {"messages": "conversations",
                                                                               "images": "images"}
        fmt = format_from_registry(entry["formatting"], columns, None, "entry")
        if lf["error"]:
            with pytest.raises(RecordError) as caught:
                read(record, fmt, tmp_path / FROZEN["media_dir"])
            assert caught.value.stage == "media", n
        else:
            pair = read(record, fmt, tmp_path / FROZEN["media_dir"])
            assert pair.images == tuple((tmp_path / path).read_bytes() for path in lf["images"]), n
    # the cases the frozen set covers, so a re-freeze that lost one shows here
    assert sum(bool(lf["error"]) for lf in FROZEN["lf"]) == 4 and "cwd/imgs/d.png" in str(FROZEN["lf"])


# --- record shapes: the right bytes in the right order ---------------------------------------------------


def test_rlhf_v_dataset_reads_each_prompts_images_in_placeholder_order(tmp_path):
    write_rlhf_v(tmp_path / "data", count=6, seed=3)
    pairs, report = load_preference_pairs(["rlhf_v"], str(tmp_path / "data"))
    expected = rlhf_v_records(6, seed=3)
    assert len(pairs) == 6 and report.skipped == {"rlhf_v": 0}
    for pair, (record, images) in zip(pairs, expected):
        assert pair.images == tuple((tmp_path / "data" / path).read_bytes() for path in record["images"])
        assert [open_image(data).tobytes() for data in pair.images] == [image.tobytes() for image in images]
        placeholders = sum(m["content"].count("<image>") for m in pair.prompt)
        assert placeholders == len(images) >= 1 and pair.videos == ()


def test_media_dir_is_where_relative_paths_are(tmp_path):
    write_rlhf_v(tmp_path / "data", count=2)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data" / "images").rename(tmp_path / "elsewhere" / "images")
    pairs, _ = load_preference_pairs(["rlhf_v"], str(tmp_path / "data"), media_dir=str(tmp_path / "elsewhere"))
    record = rlhf_v_records(2)[0][0]
    assert pairs[0].images[0] == (tmp_path / "elsewhere" / record["images"][0]).read_bytes()
    with pytest.raises(Exception, match="file not found"):  # default media_dir: dataset_dir, not there now
        load_preference_pairs(["rlhf_v"], str(tmp_path / "data"))


def test_parquet_image_structs_pil_images_and_trl_image_parts(tmp_path):
    """datasets' Image feature in Parquet ({"bytes", "path"} structs) with TRL's conversational prompt, whose
    {"type": "image"} parts are the placeholders; a PIL image (a hub row) is kept as lossless PNG bytes."""
    import datasets

    first, second = png_bytes(draw_image(1)), png_bytes(draw_image(2))
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Left or"},
                                           {"type": "text", "text": "right?"}, {"type": "image"}]}]
    rows = {"prompt": [prompt], "chosen": ["left"], "rejected": ["right"],
            "images": [[{"bytes": second, "path": None}, {"bytes": first, "path": None}]]}
    features = datasets.Features({"prompt": [{"role": datasets.Value("string"),
                                              "content": [{"type": datasets.Value("string"),
                                                           "text": datasets.Value("string")}]}],
                                  "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
                                  "images": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "trl.parquet")
    pairs, _ = load_preference_pairs([str(tmp_path / "trl.parquet")], str(tmp_path))
    assert pairs[0].images == (second, first)
    assert pairs[0].prompt == [{"role": "user", "content": "<image>Left or\nright?<image>"}]
    # a PIL image, as datasets decodes an Image column of a hub dataset
    image = draw_image(7)
    (data,) = MediaReader(str(tmp_path), local=False).read(image, "image")
    assert open_image(data).tobytes() == image.tobytes() and data.startswith(b"\x89PNG")


def test_trl_single_image_column_and_path_objects(tmp_path):
    draw_image(4).save(tmp_path / "x.png")
    rows = [{"prompt": "<image>What is it?", "chosen": "a square", "rejected": "a cat",
             "image": {"bytes": None, "path": str(tmp_path / "x.png")}}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pairs, _ = load_preference_pairs([str(tmp_path / "rows.json")], str(tmp_path))
    assert pairs[0].images == ((tmp_path / "x.png").read_bytes(),)


def test_a_text_dataset_is_unchanged(tmp_path):
    """No media column: no images, and a literal '<image>' in text is text (LF's text templates leave it)."""
    rows = [{"prompt": "What does <image> mean in HTML?", "chosen": "nothing", "rejected": "a tag"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pairs, _ = load_preference_pairs([str(tmp_path / "rows.json")], str(tmp_path))
    assert pairs[0].images == () and "<image>" in pairs[0].prompt[0]["content"]


# --- errors: one line from the CLI naming file, record and fix; a counted skip -------------------------------


def _broken(kind, data_dir):
    """Make record 1 of the rlhf_v folder bad in one way; returns words its error must hold."""
    records = json.loads((data_dir / "rlhf_v.json").read_text())
    record = records[1]
    first = data_dir / record["images"][0]
    if kind == "missing":
        first.unlink()
        says = ["file not found", record["images"][0], "media_dir"]
    elif kind == "truncated":
        data = first.read_bytes()
        first.write_bytes(data[:len(data) // 2])  # a PNG cut short in the middle of its pixel data
        says = ["is not a readable image (image file is truncated", record["images"][0]]
    elif kind == "not_an_image":
        first.write_text("not a picture")
        says = ["not an image file PIL can read"]
    elif kind == "url":
        record["images"][0] = "https://example.com/cat.png"
        says = ["is a URL", "offline", "download it"]
    elif kind == "too_many":  # two images, one placeholder
        record["images"] = record["images"] + [record["images"][0]]
        says = ["image(s) but the prompt has", "<image>"]
    elif kind == "no_placeholder":
        for message in record["conversations"]:
            message["value"] = message["value"].replace("<image>", "")
        says = ["but the prompt has 0 <image> placeholder(s)", "LLaMA-Factory refuses such records too"]
    elif kind == "in_reply":
        record["chosen"]["value"] = "<image> " + record["chosen"]["value"]
        says = ["a reply holds the placeholder <image>", "remove it from the reply"]
    (data_dir / "rlhf_v.json").write_text(json.dumps(records))
    return says


BAD = ("missing", "truncated", "not_an_image", "url", "too_many", "no_placeholder", "in_reply")


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    """Image pairs encode only with a vision-language model and its template (a text model refuses them)."""
    return build_vlm("qwen2_vl", tmp_path_factory.mktemp("vlm") / "qwen2_vl")


def prefalign_data(model_dir, data_dir, *args, cwd):
    return subprocess.run([sys.executable, "-m", "prefalign", "data", str(EXAMPLES / "lora_dpo.yaml"),
                           f"model_name_or_path={model_dir}", "build_demo_model=false", f"dataset_dir={data_dir}",
                           "dataset=rlhf_v", "val_size=0", "template=qwen2_vl", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_image_is_a_named_record_error_or_a_counted_skip(kind, tmp_path):
    """In-process: error names file, record and field; skip counts it at stage media in the rejects."""
    data_dir = tmp_path / "data"
    write_rlhf_v(data_dir, count=4)
    says = _broken(kind, data_dir)
    with pytest.raises(Exception) as caught:
        load_preference_pairs(["rlhf_v"], str(data_dir))
    message = str(caught.value)
    assert type(caught.value).__name__ == "DataError" and "\n" not in message
    assert message.startswith(f"{data_dir / 'rlhf_v.json'} record 1 (line ")
    assert all(word in message for word in says), message
    pairs, report = load_preference_pairs(["rlhf_v"], str(data_dir), on_bad_record="skip")
    assert len(pairs) == 3 and report.skipped == {"rlhf_v": 1}
    (reject,) = report.rejects
    assert reject["index"] == 1 and reject["stage"] == "media"
    assert "bytes" not in json.dumps(reject) or len(json.dumps(reject)) < 5000  # no image bytes in the rejects


@pytest.mark.parametrize("kind", ["missing", "truncated", "too_many"])
def test_the_cli_reports_a_bad_image_in_one_line_and_counts_a_skip(kind, qwen2_vl_dir, tmp_path):
    data_dir = tmp_path / "data"
    write_rlhf_v(data_dir, count=4)
    says = _broken(kind, data_dir)
    run = prefalign_data(qwen2_vl_dir, data_dir, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("prefalign data: error:")]
    assert len(errors) == 1 and "rlhf_v.json record 1" in errors[0] and "on_bad_record: skip" in errors[0]
    assert all(word in errors[0] for word in says), errors[0]
    run = prefalign_data(qwen2_vl_dir, data_dir, "on_bad_record=skip", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "rlhf_v: 3 pairs" in lines and "rlhf_v: 1 records skipped (see rejected_records.jsonl)" in lines
    assert "skipped records by stage: media 1 (see rejected_records.jsonl)" in lines


def test_registry_entry_is_lfs_rlhf_v_entry():
    """The generated dataset's entry is LF's rlhf_v entry (LF's data/dataset_info.json), the hub URL made local."""
    lf_entry = {"hf_hub_url": "llamafactory/RLHF-V", "ranking": True, "formatting": "sharegpt",
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}
    assert {k: v for k, v in RLHF_V_ENTRY.items() if k != "file_name"} == {k: v for k, v in lf_entry.items()
                                                                           if k != "hf_hub_url"}


def test_videos_are_read_as_file_bytes_and_frame_lists_refused(tmp_path):
    """A video is one file (its bytes, unparsed: decoding is the model side's); LF's processed-frame lists
    are refused by name; an empty file is a media error."""
    (tmp_path / "v.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    fmt = format_from_registry("sharegpt", {"videos": "videos"}, None, "entry")
    record = {"conversations": [{"from": "human", "value": "<video>What happens?"}],
              "chosen": {"from": "gpt", "value": "a ball falls"}, "rejected": {"from": "gpt", "value": "nothing"},
              "videos": ["v.mp4"]}
    pair = read(record, fmt, tmp_path)
    assert pair.videos == ((tmp_path / "v.mp4").read_bytes(),) and pair.images == ()
    with pytest.raises(RecordError, match="list of frames"):
        read({**record, "videos": [["f1.png", "f2.png"]]}, fmt, tmp_path)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(RecordError, match="empty file"):
        read({**record, "videos": ["empty.mp4"]}, fmt, tmp_path)
    with pytest.raises(RecordError, match="holds 2 video"):
        read({**record, "videos": ["v.mp4", "v.mp4"]}, fmt, tmp_path)


def test_a_hub_datasets_image_column_gives_the_files_own_bytes(tmp_path):
    """Read through datasets.load_dataset (the hub path; here a local folder of Parquet), an Image column
    yields the stored JPEG bytes themselves, not a decoded image re-encoded."""
    import datasets

    out = io.BytesIO()
    draw_image(5, (40, 40)).save(out, format="JPEG", quality=70)
    jpeg = out.getvalue()
    features = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string"), "images": datasets.List(datasets.Image())})
    rows = {"prompt": ["<image>Colour?"], "chosen": ["red"], "rejected": ["blue"], "images": [[{"bytes": jpeg,
                                                                                                "path": None}]]}
    (tmp_path / "hub").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "hub" / "train.parquet")
    spec = DatasetSpec("d", str(tmp_path / "hub"), True, "hub dataset 'd'")
    records = _read_hub(spec)
    fmt = detect_format([r.value for r in records], "d")
    (pair,) = convert_records(records, fmt, spec, "error", DataReport(), MediaReader(str(tmp_path), local=False))
    assert pair.images == (jpeg,)
