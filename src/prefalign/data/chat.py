"""Turn a preference pair into token ids with the run's chat template: one place for both rule sets.

A built-in (LLaMA-Factory) template encodes slot by slot as LLaMA-Factory does (data/lf_encoding.py).
The tokenizer's own chat template (`template` unset) renders text, and the boundary is found by
rendering, never by guessing: the prompt rendered with the generation prompt must be a prefix of the
prompt rendered with the reply, as text and as tokens. Two documented rules cover templates that
refuse that:

- a system turn the template cannot render (it raises, as Gemma 2's own template does) is folded
  into the first user turn ("system\\n\\nuser", as LLaMA-Factory's gemma template writes it) with
  `on_unsupported_system: fold` (the default), counted; `error` refuses the record;
- a template whose prompt is not a prefix of prompt + reply (Mistral-Nemo style: the system text
  sits in the last user turn only) is refused with `on_prompt_not_prefix: error` (the default);
  `append` keeps the prompt as rendered with the generation prompt and appends the reply as the
  template writes it in the whole conversation, up to and including its end-of-turn token.

Every refusal is a `PairError` naming the record, field and stage, which `on_bad_record: skip` skips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

from prefalign.contracts import Message, PreferencePair
from prefalign.data.lf_encoding import LFEncoder, UnsupportedRecord
from prefalign.data.templates import (LF_TEMPLATE_ARGUMENTS, TemplateChoice, end_of_turn_token, resolve_template,
                                      stop_token_ids)
from prefalign.data.media import MediaError, video_refusal
from prefalign.data.vision import TESTED_TEMPLATES, VideoError, VisionProcessor
from prefalign.errors import ConfigError, PairError


@dataclass(frozen=True)
class RenderedPair:
    """A pair as text: the prompt (ending with the assistant header) and each response up to and
    including its end-of-turn token; whether its system turn was folded or its replies appended."""

    prompt: str
    chosen: str
    rejected: str
    folded_system: bool = False
    appended: bool = False


@dataclass(frozen=True)
class ChatRenderer:
    """Renders conversations with one chat template for one tokenizer.

    `template` is the config's name (None: the tokenizer's own); `template_kwargs` are the config's
    chat-template arguments (chat_template_kwargs and enable_thinking), under each record's own;
    `tool_format` LLaMA-Factory's (a built-in template's tool definitions and calls; None: its own).
    """

    tokenizer: object
    template: str | None
    template_kwargs: dict = field(default_factory=dict)
    on_unsupported_system: str = "fold"
    on_prompt_not_prefix: str = "error"
    tool_format: str | None = None
    vision: VisionProcessor | None = None

    @classmethod
    def from_config(cls, tokenizer, data_args, vision: VisionProcessor | None = None) -> "ChatRenderer":
        """The renderer of a config's DataArguments: training, eval and chat all build it here; `vision`: the
        template's image processing (modeling/load.load_vision), None for a text-only model or template."""
        return cls(tokenizer, data_args.template, template_arguments(data_args),
                   data_args.on_unsupported_system, data_args.on_prompt_not_prefix, data_args.tool_format, vision)

    def __post_init__(self):
        choice = self.choice
        if choice.builtin is not None:
            extra = sorted(set(self.template_kwargs) - set(LF_TEMPLATE_ARGUMENTS))
            if extra:
                raise ConfigError(
                    f"chat_template_kwargs {', '.join(extra)} are arguments of a tokenizer's own chat template, but "
                    f"template: {self.template} encodes with LLaMA-Factory's slots, which read only enable_thinking; "
                    "remove them, or leave template unset to use the tokenizer's own template")
            self.lf_encoder  # noqa: B018 - refuses here a template that would add tokens to the tokenizer
        elif not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                "template: the tokenizer has no chat template of its own; set template: to a built-in one "
                "(e.g. chatml, llama3, qwen, mistral, gemma, empty)"
            )

    @property
    def choice(self) -> TemplateChoice:
        return resolve_template(self.template)

    @cached_property
    def lf_encoder(self) -> LFEncoder | None:
        """LLaMA-Factory's encoder for a built-in template (None for the tokenizer's own); LLaMA-Factory's
        default for enable_thinking is true."""
        builtin = self.choice.builtin
        if builtin is None:
            return None
        return LFEncoder(builtin.name, builtin.lf, self.tokenizer, self.template_kwargs.get("enable_thinking", True),
                         tool_format=self.tool_format)

    @property
    def name(self) -> str:
        return self.choice.description

    @property
    def kwargs(self) -> dict:
        """The template arguments every record is rendered with (a record's own go on top)."""
        return dict(self.template_kwargs)

    @cached_property
    def end_of_turn(self) -> str:
        """Found once per renderer (for the tokenizer's own template, by a probe rendering)."""
        return end_of_turn_token(self.tokenizer, self.template, self.template_kwargs)

    @property
    def identity(self) -> str:
        """Everything about the rendering that changes the encoded data (for cache keys)."""
        return json.dumps([self.template, self.kwargs, self.on_unsupported_system, self.on_prompt_not_prefix]
                          + ([self.tool_format] if self.tool_format else [])
                          + ([self.vision.identity] if self.vision is not None else []), sort_keys=True, default=str)

    @property
    def stop_ids(self) -> list[int]:
        """The token ids generation stops at (LLaMA-Factory's stop words too, for a built-in template)."""
        ids = stop_token_ids(self.tokenizer, self.end_of_turn)
        if self.lf_encoder is not None:
            ids += [i for i in self.lf_encoder.stop_token_ids if i not in ids]
        return ids

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The ids a reply to `messages` is generated after (chat), by the same rules as training's prompts."""
        if self.lf_encoder is not None:
            return self.lf_encoder.encode_prompt(messages)
        text = self.render(messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes every special token

    def encode_lf(self, pair: PreferencePair) -> tuple[list[int], list[int], list[int]]:
        """(prompt, chosen, rejected) ids of a pair under a built-in template, as LLaMA-Factory encodes them;
        a record's own enable_thinking goes on top of the config's."""
        encoder = self.lf_encoder
        own = pair.template_kwargs or {}
        extra = sorted(set(own) - set(LF_TEMPLATE_ARGUMENTS))
        if extra:
            raise PairError("render", str(pair.source), "chat_template_kwargs",
                            f"{', '.join(extra)} are arguments of a tokenizer's own chat template; {self.name} "
                            "reads only enable_thinking")
        if "enable_thinking" in own:
            encoder = encoder.thinking(own["enable_thinking"])
        prompt = self.with_image_tokens(pair) if pair.images or pair.videos else pair.prompt
        try:
            return encoder.encode_pair(prompt, pair.reply_message("chosen"), pair.reply_message("rejected"),
                                       pair.tools)
        except UnsupportedRecord as exc:
            raise PairError("render", str(pair.source), "prompt", str(exc)) from None

    def media_refusal(self, pair: PreferencePair) -> PairError | None:
        """Why this renderer cannot encode `pair`'s media, as the PairError to raise (stage render): any video
        this run cannot encode (data/vision.VisionProcessor.video_refusal: PyAV or torchvision missing, a family
        whose videos are not encoded), and images (or videos) unless a built-in vision template with the model's
        image processor writes them (a tokenizer's own template never does: its image slots are not
        LLaMA-Factory's); None when it can."""
        if pair.videos:
            refused = video_refusal() if self.vision is None else self.vision.video_refusal()
            if refused:
                return PairError("render", str(pair.source), "videos", refused)
        mm_plugin = self.choice.builtin.lf.mm_plugin if self.choice.builtin is not None else ""
        if (pair.images or pair.videos) and (self.vision is None or self.vision.plugin.name != mm_plugin):
            return PairError("render", str(pair.source), "images",
                             f"{self.name} has no image slots for this model; use template: "
                             f"{', '.join(TESTED_TEMPLATES)} with a vision-language model of that family")
        return None

    def with_image_tokens(self, pair: PreferencePair) -> list[Message]:
        """The pair's prompt with each `<image>` (`<video>`) placeholder expanded to its image's (video's) tokens
        (data/vision.py)."""
        refusal = self.media_refusal(pair)
        if refusal is not None:
            raise refusal
        try:
            return self.vision.expand(pair.prompt, pair.images, pair.videos)
        except VideoError as exc:
            raise PairError("render", str(pair.source), "videos", str(exc).splitlines()[0]) from None
        except (MediaError, OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise PairError("render", str(pair.source), "images", str(exc).splitlines()[0]) from None

    def render(self, messages: list[Message], *, add_generation_prompt: bool, tools: str | None = None,
               record_kwargs: dict | None = None) -> str:
        """`messages` as text; `tools` is a JSON list of tool definitions (bare ones are wrapped as
        {"type": "function", "function": ...}, the form Hugging Face chat templates read), `record_kwargs`
        a record's own chat_template_kwargs."""
        kwargs = {**self.kwargs, **(record_kwargs or {})}
        if tools:
            kwargs["tools"] = [tool if "type" in tool else {"type": "function", "function": tool}
                               for tool in json.loads(tools)]
        builtin = self.choice.builtin  # its slots' text: for display, never for training's ids
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=builtin.jinja if builtin is not None else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )

    def _render_pair(self, pair: PreferencePair, messages: list[Message], field: str, **kwargs) -> str:
        from jinja2 import TemplateError

        try:
            return self.render(messages, tools=pair.tools, record_kwargs=pair.template_kwargs, **kwargs)
        except TemplateError as exc:  # e.g. a role the template does not support
            hint = ("; set on_unsupported_system: fold to fold it into the first user turn"
                    if _has_system(messages) and self.on_unsupported_system == "error" else "")
            raise PairError("render", str(pair.source), field,
                            f"{self.name} cannot render this conversation: {exc}{hint}") from None

    def _prompt(self, pair: PreferencePair) -> tuple[list[Message], str, bool]:
        """The prompt messages to use, the rendered prompt, and whether the system turn was folded."""
        try:
            return pair.prompt, self._render_pair(pair, pair.prompt, "prompt", add_generation_prompt=True), False
        except PairError:
            if not (_has_system(pair.prompt) and self.on_unsupported_system == "fold"):
                raise
        folded = fold_system(pair.prompt)
        return folded, self._render_pair(pair, folded, "prompt", add_generation_prompt=True), True

    def split(self, pair: PreferencePair) -> RenderedPair:
        """Render a pair with the tokenizer's own template: the prompt with the generation prompt, and each
        reply after it."""
        messages, prompt_text, folded = self._prompt(pair)
        end_of_turn = self.end_of_turn
        replies, appended = [], False
        for field in ("chosen", "rejected"):
            reply = getattr(pair, field)
            full = self._render_pair(pair, messages + [pair.reply_message(field)], field, add_generation_prompt=False)
            if full.startswith(prompt_text):
                response = full[len(prompt_text):]
            elif self.on_prompt_not_prefix == "append":
                response = _reply_as_written(full, reply, pair, field, self.name)
                appended = True
            else:
                raise PairError(
                    "prefix", str(pair.source), field,
                    f"with {self.name}, the rendered prompt is not a prefix of the rendered prompt + reply, so the "
                    "prompt/response boundary is undefined; use a template whose generation prompt matches its "
                    "assistant turn, or set on_prompt_not_prefix: append")
            replies.append(_cut_after_end_of_turn(response, reply, end_of_turn))
        return RenderedPair(prompt_text, replies[0], replies[1], folded, appended)


def template_arguments(data_args) -> dict:
    """The config's chat-template arguments: `chat_template_kwargs`, then `enable_thinking` if set."""
    kwargs = dict(data_args.chat_template_kwargs or {})
    if data_args.enable_thinking is not None:
        kwargs["enable_thinking"] = data_args.enable_thinking
    return kwargs


def _has_system(messages: list[Message]) -> bool:
    return bool(messages) and messages[0]["role"] == "system"


def fold_system(messages: list[Message]) -> list[Message]:
    """The conversation with its leading system message joined into the next turn: "system\\n\\nuser"."""
    system, first, rest = messages[0], messages[1], messages[2:]
    return [{**first, "content": system["content"] + "\n\n" + first["content"]}, *rest]


def _reply_as_written(full: str, reply: str, pair: PreferencePair, field: str, name: str) -> str:
    """The reply as the template writes it at the end of `full`, from its first character on."""
    at = full.rfind(reply.strip())
    if not reply.strip() or at < 0:
        raise PairError("prefix", str(pair.source), field,
                        f"with {name}, the prompt is not a prefix of prompt + reply and the reply text is not in "
                        "the rendering, so on_prompt_not_prefix: append cannot place it")
    return full[at:]


def _cut_after_end_of_turn(response: str, reply: str, end_of_turn: str) -> str:
    """Keep the response up to and including the first end-of-turn token after the reply text."""
    start = response.find(reply.strip()) + len(reply.strip()) if reply.strip() in response else 0
    at = response.find(end_of_turn, start)
    if at < 0:  # the template does not close the turn with a token (e.g. `empty`): append it
        return response + end_of_turn
    return response[: at + len(end_of_turn)]
