"""Render a preference pair with a chat template and find the prompt/response boundary.

The boundary is found by rendering, never by guessing: the prompt rendered with the generation
prompt must be a prefix of the prompt rendered with the reply, as text and as tokens; anything
else is an error naming the template and the record, because training on a misplaced boundary
silently teaches the wrong tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.contracts import Message, PreferencePair
from prefalign.data.templates import end_of_turn_token, get_template
from prefalign.errors import ConfigError, DataError


@dataclass(frozen=True)
class ChatRenderer:
    """Renders conversations with one chat template for one tokenizer."""

    tokenizer: object
    template: str | None  # a built-in template's name, or None for the tokenizer's own

    def __post_init__(self):
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                "template: the tokenizer has no chat template of its own; set template: to a built-in one "
                "(chatml, llama3, qwen, mistral, gemma, alpaca, vicuna, empty)"
            )
        if self.template is not None:
            # Markup tokens the model never saw would be split into pieces: a silent mis-rendering.
            vocab = self.tokenizer.get_vocab()
            missing = [t for t in get_template(self.template).special_tokens if t.startswith("<") and t not in vocab]
            if missing:
                raise ConfigError(
                    f"template: {self.template} writes {', '.join(missing)}, which this tokenizer does not have as "
                    "tokens; the model was not trained on that format. Leave template unset to use the "
                    "tokenizer's own chat template, or pick the template the model was fine-tuned with"
                )

    @property
    def jinja(self) -> str | None:
        return get_template(self.template).jinja if self.template else None

    @property
    def name(self) -> str:
        return self.template or "the tokenizer's own chat template"

    @property
    def end_of_turn(self) -> str:
        return end_of_turn_token(self.tokenizer, self.template)

    def render(self, messages: list[Message], *, add_generation_prompt: bool, tools: str | None = None) -> str:
        kwargs = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.jinja,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )

    def _render_pair(self, pair: PreferencePair, messages: list[Message], field: str, **kwargs) -> str:
        from jinja2 import TemplateError

        try:
            return self.render(messages, tools=pair.tools, **kwargs)
        except TemplateError as exc:  # e.g. a role the template does not support
            raise DataError(f"{pair.source}, field {field}: {self.name} cannot render this conversation: {exc}") from None

    def split(self, pair: PreferencePair) -> tuple[str, str, str]:
        """Return (prompt_text, chosen_text, rejected_text).

        prompt_text ends with the assistant header; each response text runs up to and including
        the end-of-turn token (what a template writes after it, e.g. a newline, is not trained).
        """
        prompt_text = self._render_pair(pair, pair.prompt, "prompt", add_generation_prompt=True)
        replies = []
        for field in ("chosen", "rejected"):
            reply = getattr(pair, field)
            full = self._render_pair(pair, pair.prompt + [{"role": "assistant", "content": reply}], field,
                                     add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise DataError(
                    f"{pair.source}, field {field}: with {self.name}, the rendered prompt is not a prefix of "
                    "the rendered prompt + reply, so the prompt/response boundary is undefined; "
                    "use a template whose generation prompt matches its assistant turn"
                )
            response = full[len(prompt_text):]
            replies.append(_cut_after_end_of_turn(response, reply, self.end_of_turn))
        return prompt_text, replies[0], replies[1]


def _cut_after_end_of_turn(response: str, reply: str, end_of_turn: str) -> str:
    """Keep the response up to and including the first end-of-turn token after the reply text."""
    start = response.find(reply.strip()) + len(reply.strip()) if reply.strip() in response else 0
    at = response.find(end_of_turn, start)
    if at < 0:  # the template does not close the turn with a token (e.g. `empty`): append it
        return response + end_of_turn
    return response[: at + len(end_of_turn)]
