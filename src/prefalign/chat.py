"""`prefalign chat`: talk to the aligned model, one-shot (`--prompt`) or line by line from stdin.

Replies are rendered with the chat template training used (the tokenizer's own, or `template:`),
streamed token by token, and stop at the template's end-of-turn token. With `--compare-reference`
the reference (`reference.plan_reference(phase="chat")`: the policy with its adapter disabled, or `ref_model`)
answers the same conversation with the same seed, after the policy; each keeps its own history.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

import torch

from prefalign.config import RunConfig
from prefalign.contracts import PreferencePair, RecordSource
from prefalign.data.chat import ChatRenderer
from prefalign.data.collate import image_inputs
from prefalign.data.formats import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from prefalign.data.media import MediaError, open_image
from prefalign.data.vision import TESTED_TEMPLATES, VideoError
from prefalign.errors import PrefalignError
from prefalign.modeling.load import compute_dtype, load_inference_policy, load_run_tokenizer
from prefalign.modeling.vision import load_vision
from prefalign.modeling.zero import loaded_whole
from prefalign.scoring import build_planned_reference, reference_plan

EXIT_WORDS = ("exit", "quit")
CLEAR_WORD = "clear"


@dataclass
class Speaker:
    """One model that answers: a label, how to enter its mode (e.g. adapter off), and its conversation."""

    label: str
    model: object
    context: object  # a callable returning a context manager
    history: list[dict] = field(default_factory=list)


class ChatSession:
    """Generates replies for one or two speakers with one tokenizer, template and generation setup."""

    def __init__(self, config: RunConfig, tokenizer, speakers: list[Speaker], *, seed: int, device,
                 vision=None, images: tuple[bytes, ...] = (), videos: tuple[bytes, ...] = ()):
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer.from_config(tokenizer, config.data, vision)
        self.images = images  # the first user turn's (its placeholders, or before its text, as LF's chat)
        self.videos = videos  # likewise (LF's chat puts the videos' placeholders before the images')
        self.speakers = speakers
        self.seed = seed
        self.device = device
        self.system = config.data.default_system
        self.generate_kwargs = _generate_kwargs(config, tokenizer, self.renderer)

    def reply(self, speaker: Speaker, user_text: str, *, stream: bool = True) -> str:
        """Append the user turn to `speaker`'s history, generate (streamed to stdout), append and return the reply."""
        from transformers import TextStreamer, set_seed

        for placeholder, items in ((IMAGE_PLACEHOLDER, self.images), (VIDEO_PLACEHOLDER, self.videos)):
            if items and not speaker.history and placeholder not in user_text:
                user_text = placeholder * len(items) + user_text
        speaker.history.append({"role": "user", "content": user_text})
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + speaker.history
        inputs = {}
        media = self.images or self.videos
        if media:  # the image (video) tokens in the prompt, their inputs beside it (data/vision.py)
            pair = PreferencePair(messages, "", "", RecordSource("--image" if self.images else "--video", 0),
                                  images=self.images, videos=self.videos)
            messages = self.renderer.with_image_tokens(pair)
        input_ids = torch.tensor([self.renderer.prompt_ids(messages)], device=self.device)
        if media:
            inputs = {k: v.to(self.device) for k, v in
                      image_inputs(self.renderer.vision, input_ids, [list(self.images)],
                                   pair_videos=[list(self.videos)]).items()}
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        set_seed(self.seed)  # the same seed for every speaker: differences come from the weights alone
        with torch.no_grad(), speaker.context():
            output = speaker.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                            streamer=streamer, **inputs, **self.generate_kwargs)
        answer = self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
        speaker.history.append({"role": "assistant", "content": answer})
        return answer

    def turn(self, user_text: str, out: TextIO) -> dict:
        """Every speaker answers `user_text`; returns {"prompt": ..., label: answer, ...}."""
        result = {"prompt": user_text}
        for speaker in self.speakers:
            print(f"{speaker.label}: ", end="", file=out, flush=True)
            result[speaker.label.lower()] = self.reply(speaker, user_text, stream=out is sys.stdout)
            if out is not sys.stdout:
                print(result[speaker.label.lower()], file=out, flush=True)
        return result

    def clear(self) -> None:
        for speaker in self.speakers:
            speaker.history.clear()


def _generate_kwargs(config: RunConfig, tokenizer, renderer: ChatRenderer) -> dict:
    gen = config.generation
    kwargs = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample,
              "repetition_penalty": gen.repetition_penalty, "use_cache": True,
              "eos_token_id": renderer.stop_ids,
              "pad_token_id": tokenizer.pad_token_id}
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    else:  # greedy: clear the sampling defaults a model's generation_config may carry, so none warns
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def build_session(config: RunConfig, *, compare_reference: bool = False, seed: int | None = None,
                  images: list[str] = (), videos: list[str] = ()) -> ChatSession:
    """Load the policy (and, with `compare_reference`, the reference) and set up a `ChatSession`; `images`
    (`videos`): the paths of the first message's images (videos), `--image` (`--video`)."""
    import contextlib

    plan = reference_plan(config, "chat") if compare_reference else None
    args = config.training
    tokenizer, vocab = load_run_tokenizer(config)
    vision, pictures, clips = None, (), ()
    if images or videos:
        flag = "--image" if images else "--video"
        vision = load_vision(config.model, config.data, tokenizer)
        if vision is None:
            raise PrefalignError(f"{flag}: {config.model.model_name_or_path!r} with template: {config.data.template} "
                                 f"takes no {'images' if images else 'videos'}; use a vision-language model with its "
                                 f"template ({', '.join(TESTED_TEMPLATES)})")
        pictures = tuple(_read_image(path) for path in images)
        clips = tuple(_read_video(path, vision) for path in videos)
    dtype = compute_dtype(config)
    device = args.device
    with loaded_whole():  # one process generates: whole models, whatever `deepspeed:` says
        policy = load_inference_policy(config.model, dtype, vocab).to(device)
        reference = build_planned_reference(config, plan, policy, dtype=dtype, vocab=vocab).to(device) if plan else None
    speakers = [Speaker("Policy" if compare_reference else "Assistant", policy, contextlib.nullcontext)]
    if compare_reference:
        # A Reference runs `model` inside `_model_context()` (e.g. adapter disabled); generation does the same.
        speakers.append(Speaker("Reference", reference.model, reference._model_context))
    return ChatSession(config, tokenizer, speakers, seed=args.seed if seed is None else seed, device=device,
                       vision=vision, images=pictures, videos=clips)


def _read_image(path: str) -> bytes:
    """An --image file's bytes, checked to be a readable image (one line naming the file otherwise)."""
    try:
        data = open(path, "rb").read()
        open_image(data)
    except (OSError, MediaError) as exc:
        raise PrefalignError(f"--image {path}: {str(exc).splitlines()[0]}") from None
    return data


def _read_video(path: str, vision) -> bytes:
    """A --video file's bytes, checked to be a video this model's processing takes (one line otherwise: a family
    whose videos prefalign does not encode, PyAV or torchvision missing, a file PyAV cannot read)."""
    refused = vision.video_refusal()
    if refused:  # its advice is for records
        raise PrefalignError(f"--video {path}: {refused.split('; remove')[0]}")
    try:
        data = open(path, "rb").read()
        vision.video_seqlen(data)
    except (OSError, VideoError) as exc:
        raise PrefalignError(f"--video {path}: {str(exc).splitlines()[0]}") from None
    return data


def run_chat(config: RunConfig, *, prompt: str | None = None, compare_reference: bool = False,
             seed: int | None = None, stdin: TextIO | None = None, out: TextIO | None = None,
             images: list[str] = (), videos: list[str] = ()) -> list[dict]:
    """One-shot with `prompt`, else read user turns from `stdin` (default sys.stdin) until EOF or `exit`;
    `images` (`videos`): paths of the first message's images (videos)."""
    session = build_session(config, compare_reference=compare_reference, seed=seed, images=images, videos=videos)
    out = out or sys.stdout
    if prompt is not None:
        return [session.turn(prompt, out)]
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    if interactive:
        print(f"Chat with {config.model.model_name_or_path}. '{CLEAR_WORD}' forgets the conversation, "
              f"'{EXIT_WORDS[0]}' or Ctrl-D ends it.", file=out)
    turns = []
    while True:
        if interactive:
            print("User: ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.rstrip("\n")
        if text.strip().lower() in EXIT_WORDS:
            break
        if not text.strip():
            continue
        if text.strip().lower() == CLEAR_WORD:
            session.clear()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not interactive:
            print(f"User: {text}", file=out, flush=True)
        turns.append(session.turn(text, out))
    return turns
