"""The data model of a LLaMA-Factory template, and the names prefalign keeps from earlier LLaMA-Factory releases.

LLaMA-Factory (`src/llamafactory/data/template.py`) defines a chat format by formatters, each a list
of slot elements: text (with `{{content}}`, and `{{idx}}` for the turn number, filled in), a token
named by its string (`{"token": "<|user|>"}`: its id, never re-tokenized) or the tokenizer's BOS /
EOS token (`{"bos_token"}` / `{"eos_token"}`). It encodes each element on its own and concatenates
the ids (data/lf_encoding.py does the same). `data/lf_templates.py` holds LLaMA-Factory's current
templates, generated from its code; `OLDER_TEMPLATES` below holds names it has since dropped, as
prefalign kept them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Token:
    """A token named by its string: its id (`convert_tokens_to_ids`), never the text re-tokenized."""

    text: str


@dataclass(frozen=True)
class Special:
    """The tokenizer's BOS or EOS token (`attribute` is "bos_token" / "eos_token"); nothing where it has none."""

    attribute: str


BOS = Special("bos_token")
EOS = Special("eos_token")
Slot = tuple  # of str | Token | Special


@dataclass(frozen=True)
class LFTemplate:
    """One LLaMA-Factory template: its formatters' slots and its rules.

    `user` ends with the assistant header; `system` receives the system text (the record's, else
    `default_system`) before the first turn, or inside the first user turn for `rules: llama2`
    (LLaMA-Factory's Llama2Template); `observation` (a tool result) defaults to `user`; `function`
    (an assistant tool call) to `assistant`; `prefix` starts the conversation (a BOS, ChatGLM's
    [gMASK]). `stop_words` stop generation; with `replace_eos` the first one becomes the
    tokenizer's EOS. `efficient_eos`: the assistant slot writes no EOS, and LLaMA-Factory's pairwise
    processor appends one to each response. `rules`: "plain", "llama2", "reasoning" (thinking
    handled by LLaMA-Factory's ReasoningTemplate: an empty thought block is written where a reply
    has none) or "reasoning_closing_only" (GLM-4.7: the empty block is the closing word alone).
    `tool_format` names LLaMA-Factory's text of tool definitions (appended to the system slot's
    content) and of tool calls (filled into `function`), data/lf_tools.py; `tools`, where set, is a
    plain slot the definitions' JSON fills instead (phi4_mini). `mm_plugin` names what LLaMA-Factory
    uses for images.
    """

    user: Slot
    assistant: Slot = ("{{content}}", EOS)
    system: Slot = ("{{content}}",)
    observation: Slot | None = None
    function: Slot | None = None
    prefix: Slot = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    rules: str = "plain"
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    tool_format: str = "default"
    tools: Slot | None = None
    mm_plugin: str = ""

    @property
    def reasoning(self) -> bool:
        return self.rules.startswith("reasoning")

    @property
    def end_of_turn(self) -> str | None:
        """The token that ends an assistant turn: the stop word that becomes the EOS (`replace_eos`) or that
        the assistant slot writes; None: the tokenizer's EOS."""
        if self.replace_eos and self.stop_words:
            return self.stop_words[0]
        written = "".join(e if isinstance(e, str) else getattr(e, "text", "") for e in self.assistant)
        return next((word for word in self.stop_words if word in written), None)


# Names LLaMA-Factory 0.9.5 no longer defines, kept so configs that use them still load: their slots as
# prefalign wrote them (efficient_eos where the assistant slot wrote no end token).
OLDER_TEMPLATES: dict[str, LFTemplate] = {
    'aquila': LFTemplate(
        user=('Human: {{content}}###Assistant:',),
        assistant=('{{content}}###',),
        system=('System: {{content}}###',),
        default_system="A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.",
        efficient_eos=True),
    'atom': LFTemplate(
        user=(BOS, 'Human: {{content}}\n', EOS, BOS, 'Assistant:'),
        assistant=('{{content}}\n', EOS)),
    'baichuan': LFTemplate(
        user=('<reserved_102>{{content}}<reserved_103>',),
        assistant=('{{content}}',),
        efficient_eos=True),
    'baichuan2': LFTemplate(
        user=('<reserved_106>{{content}}<reserved_107>',),
        assistant=('{{content}}',),
        efficient_eos=True),
    'belle': LFTemplate(
        user=('Human: {{content}}\n\nBelle: ',),
        assistant=('{{content}}', EOS, '\n\n'),
        prefix=(BOS,)),
    'bluelm': LFTemplate(
        user=('[|Human|]:{{content}}[|AI|]:',),
        assistant=('{{content}}', EOS)),
    'chatglm2': LFTemplate(
        user=('[Round {{idx}}]\n\n问：{{content}}\n\n答：',),
        assistant=('{{content}}',),
        prefix=('[gMASK]sop',),
        efficient_eos=True),
    'codegeex2': LFTemplate(
        user=('{{content}}',),
        assistant=('{{content}}', EOS),
        prefix=('[gMASK]sop',)),
    'codegeex4': LFTemplate(
        user=('<|user|>\n{{content}}<|assistant|>\n',),
        assistant=('{{content}}',),
        system=('<|system|>\n{{content}}',),
        observation=('<|observation|>\n{{content}}<|assistant|>\n',),
        prefix=('[gMASK]<sop>',),
        default_system='你是一位智能编程助手，你叫CodeGeeX。你会为用户回答关于编程、代码、计算机方面的任何问题，并提供格式规范、可以执行、准确安全的代码，并在必要时提供详细的解释。',
        efficient_eos=True),
    'cpm': LFTemplate(
        user=('<用户>{{content}}<AI>',),
        assistant=('{{content}}', EOS),
        prefix=(BOS,)),
    'cpm3': LFTemplate(
        user=('<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n',),
        assistant=('{{content}}<|im_end|>\n',),
        system=('<|im_start|>system\n{{content}}<|im_end|>\n',),
        observation=('<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n',),
        prefix=(BOS,),
        stop_words=('<|im_end|>',)),
    'intern': LFTemplate(
        user=('<|User|>:{{content}}\n<|Bot|>:',),
        assistant=('{{content}}<eoa>\n',),
        system=('<|System|>:{{content}}\n',),
        prefix=(BOS,),
        default_system='You are an AI assistant whose name is InternLM (书生·浦语).\n- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as English and 中文.',
        stop_words=('<eoa>',)),
    'marco': LFTemplate(
        user=('<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n',),
        assistant=('{{content}}<|im_end|>\n',),
        system=('<|im_start|>system\n{{content}}<|im_end|>\n',),
        observation=('<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n',),
        default_system='你是一个经过良好训练的AI助手，你的名字是Marco-o1.由阿里国际数字商业集团的AI Business创造.\n## 重要！！！！！\n当你回答问题时，你的思考应该在<Thought>内完成，<Output>内输出你的结果。\n<Thought>应该尽可能是英文，但是有2个特例，一个是对原文中的引用，另一个是是数学应该使用markdown格式，<Output>内的输出需要遵循用户输入的语言。\n',
        stop_words=('<|im_end|>',)),
    'orion': LFTemplate(
        user=('Human: {{content}}\n\nAssistant: ', EOS),
        assistant=('{{content}}', EOS),
        prefix=(BOS,)),
    'skywork_o1': LFTemplate(
        user=('<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',),
        assistant=('{{content}}<|eot_id|>',),
        system=('<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>',),
        observation=('<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',),
        prefix=(BOS,),
        default_system="You are Skywork-o1, a thinking model developed by Skywork AI, specializing in solving complex problems involving mathematics, coding, and logical reasoning through deep thought. When faced with a user's request, you first engage in a lengthy and in-depth thinking process to explore possible solutions to the problem. After completing your thoughts, you then provide a detailed explanation of the solution process in your response.",
        stop_words=('<|eot_id|>',)),
    'telechat': LFTemplate(
        user=('<_user>{{content}}<_bot>',),
        assistant=('{{content}}', EOS),
        system=('<_system>{{content}}<_end>',)),
    'xverse': LFTemplate(
        user=('Human: {{content}}\n\nAssistant: ',),
        assistant=('{{content}}', EOS)),
    'yayi': LFTemplate(
        user=('<|Human|>:\n{{content}}\n\n<|YaYi|>:',),
        assistant=('{{content}}\n\n',),
        system=('<|System|>:\n{{content}}\n\n',),
        default_system="You are a helpful, respectful and honest assistant named YaYi developed by Beijing Wenge Technology Co.,Ltd. Always answer as helpfully as possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.",
        efficient_eos=True),
    'ziya': LFTemplate(
        user=('<human>:{{content}}\n<bot>:',),
        assistant=('{{content}}\n',),
        efficient_eos=True),
}
