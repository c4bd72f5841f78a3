"""What each LLaMA-Factory `template:` name means, as data: its slots, or "the tokenizer's own".

LLaMA-Factory (`src/llamafactory/data/template.py`) defines a chat format by string slots: a
prefix, a system slot, a user slot (which already ends with the assistant header), an assistant
slot and an observation (tool result) slot. The facts below are those slots, written for prefalign
with three markers: `{content}` (the message text), `{bos}` / `{eos}` (the tokenizer's BOS / EOS,
written only where the tokenizer has one) and `{idx}` (the turn number, ChatGLM2's "[Round N]").
`data/templates.py` turns each `Format` into a Jinja chat template.

Names whose LLaMA-Factory template is a reasoning template (thinking markup that depends on the
model's own chat template) are `Own`: they use the tokenizer's chat template with the arguments
the name implies (`qwen3_nothink` → `enable_thinking: false`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Format:
    """The slots of one LLaMA-Factory template (see the module docstring for the markers).

    `system_in_first_user`: the system slot is written inside the first user turn (LLaMA-Factory's
    Llama2Template: Llama 2, Mistral, Gemma), not before it. `observation`: None means the user
    slot. `end_of_turn`: the marker that closes an assistant turn as the slot writes it (LLaMA-Factory's
    stop word, or the model's eos written literally); None means the tokenizer's eos token.
    """

    user: str
    assistant: str = "{content}{eos}"
    system: str = "{content}"
    observation: str | None = None
    prefix: str = ""
    default_system: str = ""
    system_in_first_user: bool = False
    end_of_turn: str | None = None


@dataclass(frozen=True)
class Own:
    """The tokenizer's own chat template, rendered with `kwargs` (e.g. enable_thinking)."""

    kwargs: dict = field(default_factory=dict)
    why: str = ""


# ---------------------------------------------------------------------------------------------
# Slots shared by families

CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
CHATML_ASSISTANT = "{content}<|im_end|>\n"
CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
CHATML_TOOL = "<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n"
QWEN_TOOL = "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
LLAMA3_USER = ("<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
LLAMA3_SYSTEM = "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>"
LLAMA3_TOOL = ("<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
GEMMA_USER = "<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
GEMMA_TOOL = "<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
INTERN_SYSTEM = ("You are an AI assistant whose name is InternLM (书生·浦语).\n"
                 "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
                 "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
                 "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the "
                 "user such as English and 中文.")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n")
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _chatml(**kwargs) -> Format:
    kwargs.setdefault("end_of_turn", "<|im_end|>")
    return Format(user=CHATML_USER, assistant=CHATML_ASSISTANT, system=CHATML_SYSTEM, **kwargs)


def _llama3(**kwargs) -> Format:
    return Format(user=LLAMA3_USER, assistant="{content}<|eot_id|>", system=LLAMA3_SYSTEM, observation=LLAMA3_TOOL,
                  prefix="{bos}", end_of_turn="<|eot_id|>", **kwargs)


def _gemma(**kwargs) -> Format:
    kwargs.setdefault("system", "{content}\n\n")
    return Format(user=GEMMA_USER, assistant="{content}<end_of_turn>\n", observation=GEMMA_TOOL, prefix="{bos}",
                  system_in_first_user=True, end_of_turn="<end_of_turn>", **kwargs)


def _mistral(space: str) -> Format:
    """Mistral's [INST] format; `space` is " " for tokenizer v3 (mistral) and "" for tekken (ministral)."""
    return Format(user=f"[INST]{space}{{content}}[/INST]", assistant=f"{space}{{content}}{{eos}}",
                  system="{content}\n\n", observation=f'[TOOL_RESULTS]{space}{{"content": {{content}}}}[/TOOL_RESULTS]',
                  prefix="{bos}", system_in_first_user=True)


def _glm(user_end: str, assistant: str, **kwargs) -> Format:
    return Format(user=f"<|user|>\n{{content}}<|assistant|>{user_end}", assistant=assistant,
                  system="<|system|>\n{content}", observation=f"<|observation|>\n{{content}}<|assistant|>{user_end}",
                  **kwargs)


def _vicuna() -> Format:
    return Format(user="USER: {content} ASSISTANT:", default_system=VICUNA_SYSTEM)


def _own(why: str, **kwargs) -> Own:
    return Own(kwargs, why)


THINKING = "LLaMA-Factory's reasoning template: the thinking markup is the model's own"
NO_THINKING = "a reasoning model's template with thinking off"

# ---------------------------------------------------------------------------------------------
# Every LLaMA-Factory template name, in its file's order.

LLAMA_FACTORY_TEMPLATES: dict[str, Format | Own] = {
    "alpaca": Format(user="### Instruction:\n{content}\n\n### Response:\n", assistant="{content}{eos}\n\n",
                     default_system=ALPACA_SYSTEM),
    "aquila": Format(user="Human: {content}###Assistant:", assistant="{content}###", system="System: {content}###",
                     default_system="A chat between a curious human and an artificial intelligence assistant. "
                                    "The assistant gives helpful, detailed, and polite answers to the human's questions."),
    "atom": Format(user="{bos}Human: {content}\n{eos}{bos}Assistant:", assistant="{content}\n{eos}"),
    "baichuan": Format(user="<reserved_102>{content}<reserved_103>", assistant="{content}"),
    "baichuan2": Format(user="<reserved_106>{content}<reserved_107>", assistant="{content}"),
    "bailing": Format(user="<role>HUMAN</role>{content}<role>ASSISTANT</role>", assistant="{content}",
                      system="<role>SYSTEM</role>{content}",
                      observation="<role>OBSERVATION</role>{content}<role>ASSISTANT</role>"),
    "bailing_v2": Format(user="<role>HUMAN</role>{content}<|role_end|><role>ASSISTANT</role>",
                         assistant="{content}<|role_end|>", system="<role>SYSTEM</role>{content}<|role_end|>",
                         observation="<role>OBSERVATION</role>\n<tool_response>\n{content}\n</tool_response>"
                                     "<|role_end|><role>ASSISTANT</role>",
                         end_of_turn="<|role_end|>"),
    "belle": Format(user="Human: {content}\n\nBelle: ", assistant="{content}{eos}\n\n", prefix="{bos}"),
    "bluelm": Format(user="[|Human|]:{content}[|AI|]:"),
    "breeze": Format(user="[INST] {content} [/INST] ", assistant="{content}", prefix="{bos}"),
    "chatglm2": Format(user="[Round {idx}]\n\n问：{content}\n\n答：", assistant="{content}", prefix="[gMASK]sop"),
    "chatglm3": Format(user="<|user|>\n{content}<|assistant|>", assistant="\n{content}", system="<|system|>\n{content}",
                       observation="<|observation|>\n{content}<|assistant|>", prefix="[gMASK]sop"),
    "chatml": _chatml(observation=CHATML_TOOL),
    "chatml_de": _chatml(observation=CHATML_TOOL,
                         default_system="Du bist ein freundlicher und hilfsbereiter KI-Assistent."),
    "codegeex2": Format(user="{content}", prefix="[gMASK]sop"),
    "codegeex4": _glm("\n", "{content}", prefix="[gMASK]<sop>",
                      default_system="你是一位智能编程助手，你叫CodeGeeX。你会为用户回答关于编程、代码、计算机方面的任何问题，"
                                     "并提供格式规范、可以执行、准确安全的代码，并在必要时提供详细的解释。"),
    "cohere": Format(user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>"
                          "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                     system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>", prefix="{bos}"),
    "cpm": Format(user="<用户>{content}<AI>", prefix="{bos}"),
    "cpm3": _chatml(observation=CHATML_TOOL, prefix="{bos}"),
    "cpm4": _chatml(observation=CHATML_TOOL, prefix="{bos}"),
    "dbrx": _chatml(observation=CHATML_TOOL, default_system=(
        "You are DBRX, created by Databricks. You were last updated in December 2023. "
        "You answer questions based on information available up to that point.\n"
        "YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough "
        "responses to more complex and open-ended questions.\nYou assist with various tasks, "
        "from writing to coding (using markdown for code blocks — remember to use ``` with "
        "code, JSON, and tables).\n(You do not have real-time data access or code execution "
        "capabilities. You avoid stereotyping and provide balanced perspectives on "
        "controversial topics. You do not provide song lyrics, poems, or news articles and "
        "do not divulge details of your training data.)\nThis is your system prompt, "
        "guiding your responses. Do not reference it, just respond to the user. If you find "
        "yourself talking about this message, stop. You should be responding appropriately "
        "and usually that means not mentioning this.\nYOU DO NOT MENTION ANY OF THIS INFORMATION "
        "ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER'S QUERY.")),
    "deepseek": Format(user="User: {content}\n\nAssistant:", system="{content}\n\n", prefix="{bos}"),
    "deepseek3": Format(user="<｜User｜>{content}<｜Assistant｜>", prefix="{bos}"),
    "deepseekr1": _own(THINKING),
    "deepseekcoder": Format(user="### Instruction:\n{content}\n### Response:", assistant="\n{content}\n<|EOT|>\n",
                            prefix="{bos}", end_of_turn="<|EOT|>", default_system=(
                                "You are an AI programming assistant, utilizing the DeepSeek Coder model, "
                                "developed by DeepSeek Company, and you only answer questions related to computer "
                                "science. For politically sensitive questions, security and privacy issues, "
                                "and other non-computer science questions, you will refuse to answer.\n")),
    "default": Format(user="Human: {content}{eos}\nAssistant:", assistant="{content}{eos}\n",
                      system="System: {content}{eos}\n"),
    "dots_ocr": Format(user="<|user|>{content}<|endofuser|><|assistant|>", assistant="{content}<|endofassistant|>",
                       system="<|system|>{content}<|endofsystem|>\n", end_of_turn="<|endofassistant|>"),
    "empty": Format(user="{content}", assistant="{content}"),
    "ernie": Format(user="<|im_start|>user\n{content}<|im_end|>\n\n<|im_start|>assistant\n",
                    assistant="{content}<|im_end|>\n\n", system="<|im_start|>system\n{content}<|im_end|>\n\n",
                    observation="<|im_start|>tool\n{content}<|im_end|>\n\n<|im_start|>assistant\n",
                    default_system="<global_setting>\nthink_mode=True\n</global_setting>", end_of_turn="<|im_end|>"),
    "ernie_nothink": Format(user="User: {content}\nAssistant: ", assistant="{content}<|end_of_sentence|>",
                            system="{content}\n", prefix="<|begin_of_sentence|>", end_of_turn="<|end_of_sentence|>"),
    "ernie_vl": _own(THINKING),
    "exaone": Format(user="[|user|]{content}\n[|assistant|]", assistant="{content}{eos}\n",
                     system="[|system|]{content}[|endofturn|]\n"),
    "falcon": Format(user="User: {content}\nFalcon:", assistant="{content}\n"),
    "falcon_h1": _chatml(observation=CHATML_TOOL, prefix="{bos}"),
    "fewshot": Format(user="{content}", assistant="{content}\n\n"),
    "gemma": _gemma(),
    "gemma2": _gemma(),
    "gemma3": _gemma(),
    "gemma3n": _gemma(),
    "glm4": _glm("", "\n{content}", prefix="[gMASK]<sop>"),
    "glm4_moe": _own(THINKING),
    "glm4v": _own(THINKING),
    "glm4_5v": _own(THINKING),
    "glmz1": _own(THINKING),
    "gpt_oss": _own(THINKING),
    "granite3": Format(user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n"
                            "<|start_of_role|>assistant<|end_of_role|>",
                       assistant="{content}<|end_of_text|>\n",
                       system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n",
                       end_of_turn="<|end_of_text|>"),
    "granite3_vision": Format(user="<|user|>\n{content}\n<|assistant|>\n", system="<|system|>\n{content}\n",
                              default_system=VICUNA_SYSTEM),
    "granite4": Format(user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n"
                            "<|start_of_role|>assistant<|end_of_role|>",
                       assistant="{content}<|end_of_text|>\n",
                       system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n",
                       observation="<|start_of_role|>tool<|end_of_role|>{content}<|end_of_text|>\n"
                                   "<|start_of_role|>assistant\n",
                       default_system="You are Granite, developed by IBM. You are a helpful AI assistant.",
                       end_of_turn="<|end_of_text|>"),
    "index": Format(user="reserved_0{content}reserved_1", assistant="{content}", system="<unk>{content}"),
    "hunyuan": Format(user="{content}<|extra_0|>", assistant="{content}<|eos|>", system="{content}<|extra_4|>",
                      prefix="<|startoftext|>", end_of_turn="<|eos|>"),
    "intern": Format(user="<|User|>:{content}\n<|Bot|>:", assistant="{content}<eoa>\n", system="<|System|>:{content}\n",
                     prefix="{bos}", default_system=INTERN_SYSTEM, end_of_turn="<eoa>"),
    "intern2": _chatml(prefix="{bos}", default_system=INTERN_SYSTEM),
    "intern_vl": _chatml(prefix="{bos}", default_system="你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"),
    "intern_s1": _chatml(prefix="{bos}"),
    "keye_vl": _own(THINKING),
    "kimi_vl": _own(THINKING),
    "llama2": Format(user="{bos}[INST] {content} [/INST]", system="<<SYS>>\n{content}\n<</SYS>>\n\n",
                     system_in_first_user=True),
    "llama2_zh": Format(user="{bos}[INST] {content} [/INST]", system="<<SYS>>\n{content}\n<</SYS>>\n\n",
                        system_in_first_user=True, default_system="You are a helpful assistant. 你是一个乐于助人的助手。"),
    "llama3": _llama3(),
    "llama4": Format(user="<|header_start|>user<|header_end|>\n\n{content}<|eot|><|header_start|>assistant<|header_end|>\n\n",
                     assistant="{content}<|eot|>", system="<|header_start|>system<|header_end|>\n\n{content}<|eot|>",
                     observation="<|header_start|>ipython<|header_end|>\n\n{content}<|eot|>"
                                 "<|header_start|>assistant<|header_end|>\n\n",
                     prefix="{bos}", end_of_turn="<|eot|>"),
    "mllama": _llama3(),
    "moonlight": Format(user="<|im_user|>user<|im_middle|>{content}<|im_end|><|im_assistant|>assistant<|im_middle|>",
                        assistant="{content}<|im_end|>", system="<|im_system|>system<|im_middle|>{content}<|im_end|>",
                        default_system="You are a helpful assistant provided by Moonshot-AI.", end_of_turn="<|im_end|>"),
    "llava": _vicuna(),
    "llava_next": _vicuna(),
    "llava_next_llama3": _llama3(),
    "llava_next_mistral": _mistral(" "),
    "llava_next_qwen": _chatml(observation=QWEN_TOOL, default_system="You are a helpful assistant."),
    "llava_next_yi": _chatml(),
    "llava_next_video": _vicuna(),
    "llava_next_video_mistral": _mistral(" "),
    "llava_next_video_yi": _chatml(),
    "marco": _chatml(observation=CHATML_TOOL, default_system=(
        "你是一个经过良好训练的AI助手，你的名字是Marco-o1.由阿里国际数字商业集团的AI Business创造.\n## 重要！！！！！\n"
        "当你回答问题时，你的思考应该在<Thought>内完成，<Output>内输出你的结果。\n"
        "<Thought>应该尽可能是英文，但是有2个特例，一个是对原文中的引用，另一个是是数学应该使用markdown格式，"
        "<Output>内的输出需要遵循用户输入的语言。\n")),
    "mimo": _own(THINKING),
    "mimo_v2": _own(THINKING),
    "mimo_vl": _own(THINKING),
    "minicpm_v": _chatml(default_system="You are a helpful assistant."),
    "minicpm_o": _chatml(default_system="You are a helpful assistant. You can accept audio and text input and output "
                                        "voice and text."),
    "minimax1": Format(user="<beginning_of_sentence>user name=user\n{content}<end_of_sentence>\n"
                            "<beginning_of_sentence>ai name=assistant\n",
                       assistant="{content}<end_of_sentence>\n",
                       system="<beginning_of_sentence>system ai_setting=assistant\n{content}<end_of_sentence>\n",
                       observation="<beginning_of_sentence>tool name=tools\n{content}<end_of_sentence>\n"
                                   "<beginning_of_sentence>ai name=assistant\n",
                       default_system="You are a helpful assistant.", end_of_turn="<end_of_sentence>"),
    "minimax2": _own(THINKING),
    "ministral": _mistral(""),
    "mistral": _mistral(" "),
    "mistral_small": Format(user="[INST]{content}[/INST]", system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]",
                            observation='[TOOL_RESULTS]{"content": {content}}[/TOOL_RESULTS]', prefix="{bos}"),
    "ministral3": _mistral(""),
    "olmo": Format(user="<|user|>\n{content}<|assistant|>\n", prefix="{eos}"),
    "openchat": Format(user="GPT4 Correct User: {content}{eos}GPT4 Correct Assistant:", prefix="{bos}"),
    "openchat-3.6": Format(user="<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n{content}<|eot_id|>"
                                "<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n", prefix="{bos}"),
    "opencoder": _chatml(observation=CHATML_TOOL, default_system="You are OpenCoder, created by OpenCoder Team."),
    "orion": Format(user="Human: {content}\n\nAssistant: {eos}", prefix="{bos}"),
    "paligemma": Format(user="{content}\n", prefix="{bos}", system_in_first_user=True),
    "paligemma_chat": _gemma(system="{content}"),
    "phi": Format(user="<|user|>\n{content}<|end|>\n<|assistant|>\n", assistant="{content}<|end|>\n",
                  system="<|system|>\n{content}<|end|>\n", end_of_turn="<|end|>"),
    # LLaMA-Factory's phi_small prefix slot holds the set {"<|endoftext|>"}, which its formatter renders as nothing.
    "phi_small": Format(user="<|user|>\n{content}<|end|>\n<|assistant|>\n", assistant="{content}<|end|>\n",
                        system="<|system|>\n{content}<|end|>\n", end_of_turn="<|end|>"),
    "phi4": Format(user="<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>",
                   assistant="{content}<|im_end|>", system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
                   end_of_turn="<|im_end|>"),
    "pixtral": _mistral(""),
    "qwen": _chatml(observation=QWEN_TOOL, default_system=QWEN_SYSTEM),
    "qwen3": _own(THINKING, enable_thinking=True),
    "qwen3_nothink": _own(NO_THINKING, enable_thinking=False),
    "qwen2_audio": _chatml(default_system="You are a helpful assistant."),
    "qwen2_omni": _chatml(observation=QWEN_TOOL, default_system="You are a helpful assistant."),
    "qwen3_omni": _own(THINKING, enable_thinking=True),
    "qwen3_omni_nothink": _own(NO_THINKING, enable_thinking=False),
    "qwen2_vl": _chatml(observation=QWEN_TOOL, default_system="You are a helpful assistant."),
    "qwen3_vl": _own(THINKING, enable_thinking=True),
    "qwen3_vl_nothink": _own(NO_THINKING, enable_thinking=False),
    "sailor": Format(user="<|im_start|>question\n{content}<|im_end|>\n<|im_start|>answer\n",
                     assistant=CHATML_ASSISTANT, system=CHATML_SYSTEM, end_of_turn="<|im_end|>", default_system=(
                         "You are an AI assistant named Sailor created by Sea AI Lab. "
                         "Your answer should be friendly, unbiased, faithful, informative and detailed.")),
    "seed_coder": Format(user="{bos}user\n{content}{eos}{bos}assistant\n", system="{bos}system\n{content}{eos}",
                         default_system=(
                             "You are an AI programming assistant, utilizing the Seed-Coder model, developed by "
                             "ByteDance Seed, and you only answer questions related to computer science. For "
                             "politically sensitive questions, security and privacy issues, and other non-computer "
                             "science questions, you will refuse to answer.\n\n")),
    "seed_oss": _own(THINKING),
    "skywork_o1": _llama3(default_system=(
        "You are Skywork-o1, a thinking model developed by Skywork AI, specializing in solving complex problems "
        "involving mathematics, coding, and logical reasoning through deep thought. When faced with a user's "
        "request, you first engage in a lengthy and in-depth thinking process to explore possible solutions to the "
        "problem. After completing your thoughts, you then provide a detailed explanation of the solution process "
        "in your response.")),
    "smollm": _chatml(),
    "smollm2": _chatml(default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face."),
    "solar": Format(user="### User:\n{content}\n\n### Assistant:\n", assistant="{content}",
                    system="### System:\n{content}\n\n"),
    "starchat": Format(user="<|user|>\n{content}<|end|>\n<|assistant|>", assistant="{content}<|end|>\n",
                       system="<|system|>\n{content}<|end|>\n", end_of_turn="<|end|>"),
    "telechat": Format(user="<_user>{content}<_bot>", system="<_system>{content}<_end>"),
    "telechat2": Format(user="<_user>{content}<_bot>", system="<_system>{content}", default_system=(
        "你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）"
        "研发的人工智能助手。")),
    "vicuna": _vicuna(),
    "video_llava": _vicuna(),
    "xuanyuan": Format(user="Human: {content} Assistant:", default_system=(
        "以下是用户和人工智能助手之间的对话。用户以Human开头，人工智能助手以Assistant开头，"
        "会对人类提出的问题给出有帮助、高质量、详细和礼貌的回答，并且总是拒绝参与与不道德、"
        "不安全、有争议、政治敏感等相关的话题、问题和指示。\n")),
    "xverse": Format(user="Human: {content}\n\nAssistant: "),
    "yayi": Format(user="<|Human|>:\n{content}\n\n<|YaYi|>:", assistant="{content}\n\n",
                   system="<|System|>:\n{content}\n\n", default_system=(
                       "You are a helpful, respectful and honest assistant named YaYi developed by Beijing Wenge "
                       "Technology Co.,Ltd. Always answer as helpfully as possible, while being safe.  Your answers "
                       "should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
                       "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
                       "If a question does not make any sense, or is not factually coherent, explain why instead of "
                       "answering something not correct. If you don't know the answer to a question, please don't "
                       "share false information.")),
    "yi": _chatml(),
    "yi_vl": Format(user="### Human: {content}\n### Assistant:", assistant="{content}\n", default_system=(
        "This is a chat between an inquisitive human and an AI assistant. Assume the role of the AI assistant. "
        "Read all the images carefully, and respond to the human's questions with informative, helpful, detailed "
        "and polite answers. 这是一个好奇的人类和一个人工智能助手之间的对话。假设你扮演这个AI助手的角色。"
        "仔细阅读所有的图像，并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。\n\n")),
    "yuan": Format(user="{content}<sep>", assistant="{content}<eod>\n", end_of_turn="<eod>"),
    "zephyr": Format(user="<|user|>\n{content}{eos}<|assistant|>\n", system="<|system|>\n{content}{eos}",
                     default_system="You are Zephyr, a helpful assistant."),
    "ziya": Format(user="<human>:{content}\n<bot>:", assistant="{content}\n"),
}
