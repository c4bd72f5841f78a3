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
from prefalign.data.formats import IMAGE_PLACEHOLDER
from prefalign.data.media import MediaError, open_image
from prefalign.data.vision import TESTED_TEMPLATES
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
                 vision=None, images: tuple[bytes, ...] = ()):
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer.from_config(tokenizer, config.data, vision)
        self.images = images  # the first user turn's (its placeholders, or before its text, as LF's chat)
        self.speakers = speakers
        self.seed = seed
        self.device = device
        self.system = config.data.default_system
        self.generate_kwargs = _generate_kwargs(config, tokenizer, self.renderer)

    def reply(self, speaker: Speaker, user_text: str, *, stream: bool = True) -> str:
        """Append the user turn to `speaker`'s history, generate (streamed to stdout), append and return the reply."""
        from transformers import TextStreamer, set_seed

        if self.images and not speaker.history and IMAGE_PLACEHOLDER not in user_text:
            user_text = IMAGE_PLACEHOLDER * len(self.images) + user_text
        speaker.history.append({"role": "user", "content": user_text})
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + speaker.history
        inputs = {}
        if self.images:  # the image tokens in the prompt, the image inputs beside it (data/vision.py)
            pair = PreferencePair(messages, "", "", RecordSource("--image", 0), images=self.images)
            messages = self.renderer.with_image_tokens(pair)
        input_ids = torch.tensor([self.renderer.prompt_ids(messages)], device=self.device)
        if self.images:
            inputs = {k: v.to(self.device) for k, v in
                      image_inputs(self.renderer.vision, input_ids, [list(self.images)]).items()}
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
                  images: list[str] = ()) -> ChatSession:
    """Load the policy (and, with `compare_reference`, the reference) and set up a `ChatSession`; `images`:
    the paths of the first message's images (`--image`)."""
    import contextlib

    plan = reference_plan(config, "chat") if compare_reference else None
    args = config.training
    tokenizer, vocab = load_run_tokenizer(config)
    vision, pictures = None, ()
    if images:
        vision = load_vision(config.model, config.data, tokenizer)
        if vision is None:
            raise PrefalignError(f"--image: {config.model.model_name_or_path!r} with template: {config.data.template} "
                                 "takes no images; use a vision-language model with its template "
                                 f"({', '.join(TESTED_TEMPLATES)})")
        pictures = tuple(_read_image(path) for path in images)
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
                       vision=vision, images=pictures)


def _read_image(path: str) -> bytes:
    """An --image file's bytes, checked to be a readable image (one line naming the file otherwise)."""
    try:
        data = open(path, "rb").read()
        open_image(data)
    except (OSError, MediaError) as exc:
        raise PrefalignError(f"--image {path}: {str(exc).splitlines()[0]}") from None
    return data


def run_chat(config: RunConfig, *, prompt: str | None = None, compare_reference: bool = False,
             seed: int | None = None, stdin: TextIO | None = None, out: TextIO | None = None,
             images: list[str] = ()) -> list[dict]:
    """One-shot with `prompt`, else read user turns from `stdin` (default sys.stdin) until EOF or `exit`;
    `images`: paths of the first message's images."""
    session = build_session(config, compare_reference=compare_reference, seed=seed, images=images)
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
