"""The images and videos of a record, read as LLaMA-Factory 0.9.5 reads them, checked, kept as raw bytes.

A record's `images` / `videos` column (a dataset_info.json entry names it in `columns`; a file read
without one: `images` or TRL's `image`, `videos` or `video`) holds one item or a list of items, in
the order of the `<image>` / `<video>` placeholders of the prompt. An item is:

    a path      looked up in `media_dir` first (LF's DataArguments.media_dir, default dataset_dir) for
                data read from local files; if no such file is there, the path as given (so an
                absolute path works), as LF's converter `_find_medias` does; hub data: as given
    a URL       refused: prefalign reads media offline
    bytes       the file's bytes
    an object   {"bytes", "path"}: datasets' Image feature as Parquet / Arrow store it (bytes win,
                else the path as given, as LF's mm_plugin `_regularize_images`)
    a PIL image a decoded image (a hub dataset read elsewhere): kept as PNG bytes (lossless); the
                hub reader itself leaves `datasets.Image` columns undecoded, so their stored bytes come through

Every image is decoded once at load, so a missing, unreadable or truncated file is a record error
(stage "media") before training starts rather than a crash in the middle of it.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from prefalign.contracts import Message, PreferencePair
from prefalign.data.formats import IMAGE_PLACEHOLDER, SYSTEM, VIDEO_PLACEHOLDER, RecordError, RecordFormat
from prefalign.data.formats import _kind as kind

MEDIA_STAGE = "media"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class MediaError(ValueError):
    """Bytes that are not a readable image (the reason in one line)."""


def open_image(data: bytes):
    """The image in `data` as an RGB `PIL.Image.Image`, fully decoded.

    Raises MediaError naming what is wrong (not an image, truncated, too large for PIL).
    """
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode all of it: a truncated file fails here, not when the processor reads it
    except Image.DecompressionBombError as err:
        raise MediaError(f"is too large to decode safely ({err})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        reason = str(err).strip() or type(err).__name__
        if "cannot identify image file" in reason:
            reason = "not an image file PIL can read"
        raise MediaError(f"is not a readable image ({reason}; {len(data):,} bytes)") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def video_refusal() -> str:
    """Why this environment cannot read a record's videos, in one line: prefalign decodes them with PyAV and
    runs transformers' video processor, which needs torchvision, and here one of the two is missing.
    torchvision's PyPI wheel for torch 2.13 (0.28.0) is a CUDA build: beside a CPU-only torch it is installed
    but fails to import, so an installed package is imported to be sure."""
    import importlib.util

    missing = [] if importlib.util.find_spec("av") else ["PyAV (av) is not installed"]
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        missing.append("torchvision is not installed")
    except Exception as exc:  # a torchvision built for another torch fails while registering its ops
        import torch

        missing.append(f"the installed torchvision does not load with torch {torch.__version__} "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}: it needs a torchvision "
                       "built for this torch)")
    here = "; ".join(missing) if missing else "both load, but the model has no video processor"
    return (f"videos are not read here: prefalign decodes them with PyAV and runs the model's video processor, which "
            f"needs torchvision (here {here}); install av and the torchvision built for this torch, remove the "
            "record's videos, or skip it with on_bad_record: skip")


@dataclass(frozen=True)
class MediaReader:
    """How to find a dataset's media: `media_dir` for relative paths, `local` whether the dataset was
    read from local files (LF joins `media_dir` only then; a hub dataset's paths are used as given)."""

    media_dir: str
    local: bool = True

    def read(self, value: Any, field: str, video: bool = False) -> tuple[bytes, ...]:
        """The bytes of each item of a media column's value (one item, a list of them, or null)."""
        # LF's _find_medias: null and [] are no media, a single item is a list of one.
        items = value if isinstance(value, list) else ([] if value is None else [value])
        read = []
        for n, item in enumerate(items):
            where = f"{field}[{n}]" if isinstance(value, list) else field
            data = self._bytes(item, where, video)
            if not video:
                try:
                    open_image(data)
                except MediaError as err:
                    raise RecordError(where, f"{self._named(item)}{err}", MEDIA_STAGE) from None
            elif not data:
                raise RecordError(where, f"{self._named(item)}is an empty file", MEDIA_STAGE)
            read.append(data)
        return tuple(read)

    def _bytes(self, item: Any, where: str, video: bool) -> bytes:
        if isinstance(item, (bytes, bytearray)):
            return bytes(item)
        if isinstance(item, str):
            return self._file(item, where, join=self.local)
        if isinstance(item, dict) and ("bytes" in item or "path" in item):
            if item.get("bytes") is not None:
                return bytes(item["bytes"])
            if isinstance(item.get("path"), str):
                return self._file(item["path"], where, join=False)
            raise RecordError(where, "holds neither bytes nor a path", MEDIA_STAGE)
        if type(item).__module__.startswith("PIL."):
            out = io.BytesIO()
            item.save(out, format="PNG")
            return out.getvalue()
        if video and isinstance(item, list):
            raise RecordError(where, "is a list of frames: prefalign reads a video from one video file; "
                                     "give the video's path", MEDIA_STAGE)
        raise RecordError(where, f"expected a {'video' if video else 'image'} path, {{\"bytes\", \"path\"}} "
                                 f"object or bytes, found {kind(item)}", MEDIA_STAGE)

    def _file(self, path: str, where: str, join: bool) -> bytes:
        if _URL.match(path):
            raise RecordError(where, f"is a URL ({path}): prefalign reads media offline, from local files; "
                                     "download it and give its path (relative to media_dir)", MEDIA_STAGE)
        looked = [os.path.join(self.media_dir, path)] if join else []
        found = next((p for p in looked if os.path.isfile(p)), path)
        if not os.path.isfile(found):
            tried = ", ".join(dict.fromkeys([*looked, os.path.abspath(path)]))
            raise RecordError(where, f"file not found: {path!r} (looked at {tried}); fix the path, or set "
                                     "media_dir to the folder it is relative to", MEDIA_STAGE)
        try:
            with open(found, "rb") as handle:
                return handle.read()
        except OSError as err:
            raise RecordError(where, f"cannot read {found}: {err.strerror or err}", MEDIA_STAGE) from None

    @staticmethod
    def _named(item: Any) -> str:
        if isinstance(item, str):
            return f"{item!r} "
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            return f"{item['path']!r} "
        return ""


def with_media(pair: PreferencePair, record: dict, fmt: RecordFormat, reader: MediaReader) -> PreferencePair:
    """`pair` with the images and videos of `record` (as `fmt` names their columns), their placeholders checked.

    The rule is LLaMA-Factory's (mm_plugin `_validate_messages`, run for every VLM template): the
    number of `<image>` (`<video>`) placeholders in the conversation must equal the number of
    images (videos), or LF stops with "The number of images does not match the number of <image>
    tokens". A record with images but no placeholder is therefore an error too: LF adds the
    placeholders for you only in `chat` (its hf_engine puts them before the first message), never in
    training data. LF counts placeholders in the replies as well and would expand them into the
    trained reply tokens; prefalign refuses them there (the images belong to the prompt, shared by
    both replies). LF does not count placeholders in the system message (it leaves them as text);
    prefalign refuses them there as well. Without a media column a record is text and its text is
    not checked.
    """
    cols = fmt.columns
    if not (cols.images or cols.videos):
        return pair
    images = reader.read(record.get(cols.images), cols.images) if cols.images else ()
    videos = reader.read(record.get(cols.videos), cols.videos, video=True) if cols.videos else ()
    for placeholder, items, column in ((IMAGE_PLACEHOLDER, images, cols.images or "images"),
                                       (VIDEO_PLACEHOLDER, videos, cols.videos or "videos")):
        _check_placeholders(pair, placeholder, len(items), column, fmt)
    return replace(pair, images=images, videos=videos)


def _check_placeholders(pair: PreferencePair, placeholder: str, count: int, column: str, fmt: RecordFormat) -> None:
    cols = fmt.columns
    for text, name in ((pair.chosen, cols.chosen), (pair.rejected, cols.rejected or cols.chosen)):
        if placeholder in text:
            raise RecordError(name, f"a reply holds the placeholder {placeholder}: media belong in the prompt "
                                    "(both replies answer the same images); remove it from the reply",
                              MEDIA_STAGE)
    if any(placeholder in message.get("content", "") for message in pair.prompt if message["role"] == SYSTEM):
        raise RecordError(cols.system or "system", f"the system message holds the placeholder {placeholder}: "
                                                   "put it in a user message (LLaMA-Factory leaves it as text)",
                          MEDIA_STAGE)
    try:
        check_placeholder_count(pair.prompt, placeholder, count)
    except PlaceholderCountError as exc:
        what = "image" if placeholder == IMAGE_PLACEHOLDER else "video"
        fix = (f"add one {placeholder} to the prompt where each {what} goes (LLaMA-Factory refuses such records too)"
               if exc.found < count else f"remove the extra {placeholder} or add the missing {what}(s) to '{column}'")
        raise RecordError(column, f"{exc}: {fix}", MEDIA_STAGE) from None


class PlaceholderCountError(MediaError):
    """A prompt whose placeholders do not match its images (or videos) one to one."""

    def __init__(self, placeholder: str, found: int, count: int):
        what = "image" if placeholder == IMAGE_PLACEHOLDER else "video"
        super().__init__(f"holds {count} {what}(s) but the prompt has {found} {placeholder} placeholder(s)")
        self.found = found


def check_placeholder_count(prompt: list[Message], placeholder: str, count: int) -> None:
    """The one check that a prompt's `placeholder`s match its `count` images (videos): one in its non-system
    messages per item (LLaMA-Factory's rule; a system message's are text). Raises PlaceholderCountError.
    Asked when a record's media are read (`with_media`) and when a prompt's images are expanded
    (data/vision.VisionProcessor.expand: chat --image reaches it without a record)."""
    found = sum(placeholder_count(message, placeholder) for message in prompt if message["role"] != SYSTEM)
    if found != count:
        raise PlaceholderCountError(placeholder, found, count)


def placeholder_count(message: Message, placeholder: str) -> int:
    content = message.get("content")
    return content.count(placeholder) if isinstance(content, str) else 0
