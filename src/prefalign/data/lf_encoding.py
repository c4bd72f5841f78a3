"""Encode conversations with a LLaMA-Factory template exactly as LLaMA-Factory's DPO stage does.

LLaMA-Factory never tokenizes a whole rendered conversation: it fills each slot element of its
template (data/template_formats.py) and encodes the elements one by one (text with
`tokenizer.encode(..., add_special_tokens=False)`, a named token by its id, BOS / EOS by the
tokenizer's ids), then concatenates the ids. The prompt is every message before the reply; the
response is the reply's assistant slot. No token can merge across that boundary, so there is no
prefix check to fail. The rules, as LLaMA-Factory 0.9.5 applies them (template.py, pairwise.py):

- turn 0 starts with the prefix slot, then the system slot with the record's system text or the
  template's default system, followed by the tool definitions as the tool format writes them
  (data/lf_tools.py; the slot is written for tools even with no system text); `llama2` rules
  write the system slot's text inside the first user turn instead; the user slot gets the turn
  number `{{idx}}` (= message index // 2);
- a tool result is an observation message (the observation slot); an assistant turn with tool calls
  is a function message: its text, then the calls as the tool format writes them, in the function
  slot (`tool_format` set: LLaMA-Factory's default function slot, content then EOS); a chosen or
  rejected reply that calls tools is a function message too (the response is its function slot),
  as LLaMA-Factory's pairwise processor encodes a ShareGPT `function_call` reply;
- the tokenizer is fixed first (`fixed_tokenizer`, data/vocab.py): `replace_eos` makes the first stop
  word the EOS, the other stop words become special tokens, a missing EOS becomes `<|endoftext|>`;
  a token that adds to the vocabulary is resized into the models as LLaMA-Factory does (vocab.py);
- `efficient_eos`: each response gets the EOS id appended;
- reasoning templates: a history reply loses its thought block (unless preserve_thinking); with
  enable_thinking false the reply loses it too; a reply with no thought words gets the empty
  thought block, in the prompt (untrained) when enable_thinking is not true, else at the start of
  the response (trained).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from functools import cached_property

from prefalign.contracts import Message
from prefalign.data.lf_tools import TOOL_FORMATS, today
from prefalign.data.template_formats import EOS, LFTemplate, Special, Token
from prefalign.data.vocab import fixed_copy
from prefalign.errors import ConfigError

_LF_ROLES = {"user": "user", "assistant": "assistant", "tool": "observation"}


class UnsupportedRecord(ValueError):
    """A record these rules do not encode (a role LLaMA-Factory has no slot for, parallel calls glm4 cannot
    write); the message says why."""


@dataclass
class LFEncoder:
    """LLaMA-Factory's encoding of `template` (named `name`) with `tokenizer`.

    `enable_thinking` / `preserve_thinking` are LLaMA-Factory's data arguments of the same names
    (its defaults: true / false); only reasoning templates read them. `tool_format` is LLaMA-Factory's
    data argument too (None: the template's own). `today`: the date llama3's tool prompt states
    (None: today, as LLaMA-Factory writes it).
    """

    name: str
    template: LFTemplate
    tokenizer: object
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    tool_format: str | None = None
    today: str | None = None
    _fixed: object = field(default=None, repr=False)
    _eos: int | None = field(default=None, repr=False)

    def __post_init__(self):
        self._fixed, self._eos = fixed_tokenizer(self.name, self.template, self.tokenizer)

    def thinking(self, enable_thinking: bool | None) -> "LFEncoder":
        """The same encoder with another enable_thinking (a record's own), sharing the fixed tokenizer."""
        other = copy.copy(self)
        other.enable_thinking = enable_thinking
        other.__dict__.pop("stop_token_ids", None)
        return other

    # -- what LLaMA-Factory's get_template_and_fix_tokenizer changes ---------------------------

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @cached_property
    def stop_token_ids(self) -> list[int]:
        """LLaMA-Factory's stop ids: the (possibly replaced) EOS and every stop word."""
        ids = [self._eos]
        for word in self.template.stop_words:
            token_id = self._fixed.convert_tokens_to_ids(word)
            if token_id not in ids:
                ids.append(token_id)
        return [i for i in ids if i is not None]

    # -- encoding ---------------------------------------------------------------------------------

    def encode_pair(self, prompt: list[Message], chosen: Message, rejected: Message, tools: str | None = None
                    ) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, chosen ids, rejected ids) as LLaMA-Factory's pairwise processor makes them
        (before truncation) for two assistant replies (each may call tools); the prompt is the one
        encoded with the chosen reply."""
        system, messages, definitions = self._split(prompt, tools)
        prompt_ids, chosen_ids = self._encode_oneturn(messages + [_lf_message(chosen)], system, definitions)
        _, rejected_ids = self._encode_oneturn(messages + [_lf_message(rejected)], system, definitions)
        if self.template.efficient_eos:
            chosen_ids, rejected_ids = chosen_ids + [self.eos_token_id], rejected_ids + [self.eos_token_id]
        return prompt_ids, chosen_ids, rejected_ids

    def encode_prompt(self, prompt: list[Message], tools: str | None = None) -> list[int]:
        """The ids generation continues from: LLaMA-Factory's chat encodes the prompt with an empty reply."""
        system, messages, definitions = self._split(prompt, tools)
        return self._encode_oneturn(messages + [{"role": "assistant", "content": ""}], system, definitions)[0]

    def _split(self, prompt: list[Message], tools: str | None) -> tuple[str, list[dict], list[dict] | None]:
        """The system text, the messages in LLaMA-Factory's roles (a tool result an observation, an assistant
        tool call a function message holding its calls), and the tool definitions."""
        system, messages = "", []
        for at, message in enumerate(prompt):
            role = message["role"]
            if role == "system" and at == 0:
                system = message["content"]
                continue
            if role not in _LF_ROLES:
                raise UnsupportedRecord(f"template: {self.name} has no {role} turns after the first message")
            messages.append(_lf_message(message))
        return system, messages, json.loads(tools) if tools else None

    def _encode_oneturn(self, messages: list[dict], system: str, tools: list[dict] | None
                        ) -> tuple[list[int], list[int]]:
        template = self.template
        if not template.reasoning:
            encoded = self._encode(messages, system, tools)
            return [i for ids in encoded[:-1] for i in ids], encoded[-1]
        messages = [dict(m) for m in messages]
        if not self.preserve_thinking:
            for i in range(1, len(messages) - 2, 2):
                messages[i]["content"] = self._remove_thought(messages[i]["content"])
        if self.enable_thinking is False:
            messages[-1]["content"] = self._remove_thought(messages[-1]["content"])
        encoded = self._encode(messages, system, tools)
        prompt_ids, response_ids = [i for ids in encoded[:-1] for i in ids], encoded[-1]
        reply = messages[-1]["content"]
        opening, closing = template.thought_words
        if opening.strip() not in reply and closing.strip() not in reply:
            empty = self._ids([self._empty_thought()])
            if not self.enable_thinking:
                prompt_ids = prompt_ids + empty
            else:
                response_ids = empty + response_ids
        return prompt_ids, response_ids

    def _empty_thought(self) -> str:
        opening, closing = self.template.thought_words
        return closing if self.template.rules == "reasoning_closing_only" else opening + closing

    def _remove_thought(self, content: str) -> str:
        opening, closing = self.template.thought_words
        pattern = re.compile(f"{re.escape(opening)}(.*?){re.escape(closing)}", re.DOTALL)
        return pattern.sub("", content).lstrip("\n")

    def _encode(self, messages: list[dict], system: str, tools: list[dict] | None) -> list[list[int]]:
        """Each message's ids (turn 0 with the prefix and the system slot), as LLaMA-Factory's _encode."""
        template = self.template
        system = system or template.default_system
        llama2 = template.rules == "llama2"
        encoded = []
        for i, message in enumerate(messages):
            elements, system_text = [], ""
            if i == 0:
                elements += list(template.prefix)
                if system or tools:
                    filled = _fill(template.system, content=system + (self._tools_text(tools) if tools else ""))
                    if llama2:
                        system_text = filled[0]
                    else:
                        elements += filled
            role, content = message["role"], message["content"]
            if role == "user":
                elements += (_fill(template.user, content=system_text + content) if llama2
                             else _fill(template.user, content=content, idx=str(i // 2)))
            elif role == "assistant":
                elements += _fill(template.assistant, content=content)
            elif role == "function":
                elements += _fill(self.function_slot, content=content + self._calls_text(message["calls"]))
            else:  # observation
                elements += _fill(template.observation or template.user, content=content)
            encoded.append(self._ids(elements))
        return encoded

    # -- tools (LLaMA-Factory's format_tools / format_function) -------------------------------------

    @property
    def active_tool_format(self) -> str | None:
        """The tool format that writes definitions and calls: the tool_format setting, else the template's
        (None: the template's plain tools slot writes the definitions' JSON)."""
        if self.tool_format is None and self.template.tools is not None:
            return None
        return self.tool_format or self.template.tool_format

    @property
    def function_slot(self):
        """The slot of an assistant tool call: the template's, or with tool_format set LLaMA-Factory's default
        (the content, then EOS unless efficient_eos), as its get_template_and_fix_tokenizer replaces it."""
        if self.tool_format is not None:
            return ("{{content}}",) if self.template.efficient_eos else ("{{content}}", EOS)
        return self.template.function or self.template.assistant

    def _tools_text(self, tools: list[dict]) -> str:
        fmt = self.active_tool_format
        if fmt is None:
            return _fill(self.template.tools, content=json.dumps(tools, ensure_ascii=False))[0]
        return TOOL_FORMATS[fmt].tools(tools, self.today or today()) if tools else ""

    def _calls_text(self, calls: list[tuple[str, str]]) -> str:
        try:
            return TOOL_FORMATS[self.active_tool_format or self.template.tool_format].calls(calls)
        except ValueError as exc:
            raise UnsupportedRecord(f"template: {self.name}: {exc}") from None

    def _ids(self, elements) -> list[int]:
        tokenizer, ids = self._fixed, []
        for element in elements:
            if isinstance(element, str):
                if element:
                    ids += tokenizer.encode(element, add_special_tokens=False)
            elif isinstance(element, Token):
                token_id = tokenizer.convert_tokens_to_ids(element.text)
                if token_id is None:  # no such token and no unknown token to stand for it
                    raise UnsupportedRecord(
                        f"template: {self.name} writes the token {element.text!r}, which this tokenizer does not have "
                        "(nor an unknown token); use the template of the model's family, or the tokenizer's own "
                        "(leave template unset)")
                ids.append(token_id)
            elif isinstance(element, Special):
                token_id = self._eos if element.attribute == "eos_token" else tokenizer.bos_token_id
                if token_id is not None:
                    ids.append(token_id)
        return ids


def _lf_message(message: Message) -> dict:
    """A message in LLaMA-Factory's roles: an assistant message with tool calls is a function message
    holding its text and its calls as (name, arguments JSON)."""
    if message.get("tool_calls"):
        calls = [(call["function"]["name"], json.dumps(call["function"]["arguments"], ensure_ascii=False))
                 for call in message["tool_calls"]]
        return {"role": "function", "content": message["content"], "calls": calls}
    return {"role": _LF_ROLES[message["role"]], "content": message["content"]}


def _fill(slot, **values: str) -> list:
    """The slot with each `{{key}}` in its text elements replaced once, in LLaMA-Factory's order (content, then idx)."""
    out = []
    for element in slot:
        if isinstance(element, str):
            for key, value in values.items():
                element = element.replace("{{" + key + "}}", value, 1)
        out.append(element)
    return out


def fixed_tokenizer(name: str, template: LFTemplate, tokenizer) -> tuple[object, int | None]:
    """The tokenizer to encode with and the EOS id, after LLaMA-Factory's fix_special_tokens (data/vocab.py).

    A run's tokenizer is fixed in place when it is loaded (`vocab.extend_tokenizer`), so this is that
    tokenizer; one given unfixed (the parity checks) is fixed in a copy."""
    tokenizer = fixed_copy(tokenizer, template)
    return tokenizer, tokenizer.eos_token_id
