"""Which image files LLaMA-Factory reads for a record, and which records it refuses: the frozen answers
prefalign's data/media.py is checked against (tests/data/test_media.py).

Run with LLaMA-Factory's venv; it builds LAYOUT under a temporary root, runs LF's own converters
(`SharegptDatasetConverter`, `AlpacaDatasetConverter`: the `images` column, `media_dir` joining) and
its placeholder check (mm_plugin `_validate_messages`, as every VLM template's `process_messages`
runs it on prompt + chosen) on RECORDS from the working directory LAYOUT names, then opens each
image it resolved with PIL as LF's `_regularize_images` does, and writes what it found, paths
relative to the root:
    /work/venvs/lf/bin/python benchmarks/lf_media_parity.py freeze
(writes tests/fixtures/lf_parity/frozen_media.json). The records and layout live in that file too,
so the test rebuilds the same folder.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

FROZEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "lf_parity" / "frozen_media.json"

# image files (relative to the root) -> (width, height, RGB colour)
LAYOUT = {
    "data/imgs/a.png": (20, 16, (255, 0, 0)),
    "data/imgs/b.png": (24, 18, (0, 255, 0)),
    "elsewhere/c.png": (30, 10, (0, 0, 255)),
    "cwd/imgs/d.png": (12, 12, (9, 9, 9)),
}
MEDIA_DIR = "data"  # LF's default: dataset_dir
WORKING_DIR = "cwd"


def _share(text, images, chosen="yes", rejected="no"):
    return {"formatting": "sharegpt", "record": {"conversations": [{"from": "human", "value": text}],
                                                 "chosen": {"from": "gpt", "value": chosen},
                                                 "rejected": {"from": "gpt", "value": rejected},
                                                 "images": images}}


# "{root}" stands for the root folder's absolute path.
RECORDS = [
    _share("<image><image>Which is red?", ["imgs/a.png", "imgs/b.png"]),
    _share("<image>Colour?", "imgs/a.png"),  # one path, not a list
    _share("<image>Colour?", ["{root}/elsewhere/c.png"]),  # absolute
    _share("<image>Colour?", ["imgs/d.png"]),  # not in media_dir: LF uses the path as given (the cwd's)
    _share("Colour?", None),  # text only
    _share("<image>Colour?", []),  # a placeholder, no image
    _share("<image>Which is red?", ["imgs/a.png", "imgs/b.png"]),  # two images, one placeholder
    _share("Which is red?", ["imgs/a.png"]),  # images and no placeholder
    _share("<image>Colour?", ["imgs/b.png"], chosen="<image> green"),  # a placeholder in the reply
    {"formatting": "alpaca", "record": {"instruction": "<image>Colour?", "input": "", "chosen": "green",
                                        "rejected": "red", "images": ["imgs/b.png"]}},
    _share("<image>Then <image>?", ["imgs/b.png", "imgs/a.png"]),  # order kept
]


def freeze() -> None:
    import llamafactory
    from llamafactory.data.converter import AlpacaDatasetConverter, SharegptDatasetConverter
    from llamafactory.data.mm_plugin import BasePlugin
    from llamafactory.data.parser import DatasetAttr
    from llamafactory.hparams import DataArguments
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="lf_media_"))
    for relative, (width, height, colour) in LAYOUT.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), colour).save(root / relative)
    os.chdir(root / WORKING_DIR)
    data_args = DataArguments(dataset_dir=str(root / MEDIA_DIR))
    plugin = BasePlugin(image_token="<image>", video_token=None, audio_token=None)
    results = []
    for entry in RECORDS:
        record = json.loads(json.dumps(entry["record"]).replace("{root}", str(root)))
        attr = DatasetAttr("file", "d", formatting=entry["formatting"], ranking=True, images="images")
        if entry["formatting"] == "sharegpt":
            attr.messages, attr.chosen, attr.rejected = "conversations", "chosen", "rejected"
            converter = SharegptDatasetConverter(attr, data_args)
        else:
            attr.chosen, attr.rejected = "chosen", "rejected"
            converter = AlpacaDatasetConverter(attr, data_args)
        out = converter(record)
        images = out["_images"] or []
        result = {"images": [], "error": None}
        try:
            plugin._validate_messages(out["_prompt"] + [out["_response"][0]], images, [], [])
            plugin._validate_messages(out["_prompt"] + [out["_response"][1]], images, [], [])
            for path in images:
                Image.open(path).load()
                result["images"].append(os.path.relpath(os.path.abspath(path), root))
        except ValueError as err:
            result["error"] = str(err).split(" tokens in ")[0]
        results.append(result)
    FROZEN.write_text(json.dumps({"llamafactory": llamafactory.__version__, "layout": LAYOUT,
                                  "media_dir": MEDIA_DIR, "working_dir": WORKING_DIR, "records": RECORDS,
                                  "lf": results}, indent=1) + "\n")
    print(f"wrote {FROZEN} ({len(results)} records, LLaMA-Factory {llamafactory.__version__})")


if __name__ == "__main__":
    if sys.argv[1:] != ["freeze"]:
        sys.exit("usage: lf_media_parity.py freeze  (with LLaMA-Factory's venv)")
    freeze()
