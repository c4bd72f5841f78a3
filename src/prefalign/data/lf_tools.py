"""LLaMA-Factory's tool formats: the text of tool definitions (its format_tools) and of assistant tool calls
(its format_function), per `tool_format` name, as LLaMA-Factory 0.9.5's `data/tool_utils.py` writes them.

A tool format is two functions: `tools(definitions, today)` → the text appended to the system slot's
content, and `calls(calls)` → the text filled into the function slot. `definitions` is a list of tool
definitions (`{"type": "function", "function": {...}}` or bare), `calls` a list of (name, arguments) with
the arguments as LLaMA-Factory holds them: JSON text (`json.dumps(arguments, ensure_ascii=False)`).
`today` ("26 Jul 2024", `%d %b %Y`) is the date llama3's prompt states; LLaMA-Factory writes the day it
encodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

Call = tuple[str, str]  # (name, arguments as JSON text)


def _dumps(value: Any, **kwargs) -> str:
    return json.dumps(value, ensure_ascii=False, **kwargs)


def _bare(tool: dict) -> dict:
    """The function definition itself (LF unwraps {"type": "function", "function": ...})."""
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrapped(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else _dumps(value)


# -- default: ReAct-style "Action: / Action Input:" ---------------------------------------------------

def _tagged_calls(calls: list[Call], head: str, parameter: str, tail: str) -> str:
    """The XML-style calls of several formats, one per line: `head` (with {name}), then `parameter` (with {key}
    and {value}, the value as _value_text writes it) per argument, then `tail`."""
    texts = []
    for name, arguments in calls:
        params = "".join(parameter.format(key=key, value=_value_text(value))
                         for key, value in json.loads(arguments).items())
        texts.append(head.format(name=name) + params + tail)
    return "\n".join(texts)


def _default_tools(tools: list[dict], today: str) -> str:
    text, names = "", []
    for tool in map(_bare, tools):
        params = ""
        for name, param in tool["parameters"]["properties"].items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum") else ""
            items = ", where each item should be {}".format(param["items"].get("type", "")) if param.get("items") else ""
            params += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{params}\n"
        names.append(tool["name"])
    return (f"You have access to the following tools:\n{text}Use the following format if using a tool:\n```\n"
            f"Action: tool name (one of [{', '.join(names)}])\n"
            "Action Input: the input to the tool, in a JSON format representing the kwargs "
            '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n')


def _default_calls(calls: list[Call]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)


# -- glm4 (ChatGLM-4) ------------------------------------------------------------------------------------

def _glm4_tools(tools: list[dict], today: str) -> str:
    text = "".join(f"\n\n## {tool['name']}\n\n{_dumps(tool, indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
                   for tool in map(_bare, tools))
    return ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
            f"你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{text}")


def _glm4_calls(calls: list[Call]) -> str:
    if len(calls) > 1:
        raise ValueError("tool_format glm4 writes one tool call per assistant turn (GLM-4 has no parallel calls)")
    return f"{calls[0][0]}\n{calls[0][1]}"


# -- llama3 (JSON tool calling, tools in the system message) ---------------------------------------------

def _llama3_tools(tools: list[dict], today: str) -> str:
    text = "".join(_dumps(_wrapped(tool), indent=4) + "\n\n" for tool in tools)
    return (f"Cutting Knowledge Date: December 2023\nToday Date: {today}\n\n"
            "You have access to the following functions. To call a function, please respond with JSON for a "
            'function call. Respond in the format {"name": function name, "parameters": dictionary of argument '
            f'name and its value}}. Do not use variables.\n\n{text}')


def _llama3_calls(calls: list[Call]) -> str:
    objects = [{"name": name, "parameters": json.loads(arguments)} for name, arguments in calls]
    return _dumps(objects[0] if len(objects) == 1 else objects)


# -- mistral (v0.3) -----------------------------------------------------------------------------------------

def _mistral_tools(tools: list[dict], today: str) -> str:
    return "[AVAILABLE_TOOLS] " + _dumps([_wrapped(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"


def _mistral_calls(calls: list[Call]) -> str:
    return _dumps([{"name": name, "arguments": json.loads(arguments)} for name, arguments in calls])


# -- qwen (Qwen 2.5 / 3 <tool_call> JSON) and its relatives ling, glm4_moe ------------------------------------

_QWEN_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_QWEN_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
                    '"arguments": <args-json-object>}\n</tool_call>')


def _wrapped_lines(tools: list[dict]) -> str:
    return "".join("\n" + _dumps(_wrapped(tool)) for tool in tools)


def _qwen_tools(tools: list[dict], today: str) -> str:
    return "\n\n" + _QWEN_TOOLS_HEAD + _wrapped_lines(tools) + _QWEN_TOOLS_TAIL


def _ling_tools(tools: list[dict], today: str) -> str:
    return _QWEN_TOOLS_HEAD + _wrapped_lines(tools) + _QWEN_TOOLS_TAIL + "\ndetailed thinking off"


def _qwen_calls(calls: list[Call]) -> str:
    return "\n".join("<tool_call>\n" + _dumps({"name": name, "arguments": json.loads(arguments)}) + "\n</tool_call>"
                     for name, arguments in calls)


def _glm4_moe_tools(tools: list[dict], today: str) -> str:
    return ("\n\n" + _QWEN_TOOLS_HEAD + _wrapped_lines(tools) + "\n</tools>\n\nFor each function call, output the "
            "function name and arguments within the following XML format:\n<tool_call>{function-name}"
            "\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>"
            "\n<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>\n")


def _glm4_moe_calls(calls: list[Call]) -> str:
    return _tagged_calls(calls, "\n<tool_call>{name}", "\n<arg_key>{key}</arg_key>\n<arg_value>{value}</arg_value>", "")


# -- qwen3_5 (Qwen 3.5 XML parameters) ----------------------------------------------------------------------

def _qwen3_5_tools(tools: list[dict], today: str) -> str:
    text = "".join("\n" + _dumps(tool.get("function", tool) if tool.get("type") == "function" else tool)
                   for tool in tools)
    return ("\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>" + text +
            "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
            "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
            "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple "
            "lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
            "- Function calls MUST follow the specified format: "
            "an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
            "- Required parameters MUST be specified\n"
            "- You may provide optional reasoning for your function call in natural language "
            "BEFORE the function call, but NOT after\n"
            "- If there is no function call available, answer the question like normal with your current knowledge "
            "and do not tell the user about function calls\n</IMPORTANT>")


def _qwen3_5_calls(calls: list[Call]) -> str:
    return _tagged_calls(calls, "<tool_call>\n<function={name}>", "\n<parameter={key}>\n{value}\n</parameter>",
                         "\n</function>\n</tool_call>")


# -- minimax1 / minimax2 -------------------------------------------------------------------------------------

def _minimax1_tools(tools: list[dict], today: str) -> str:
    text = "".join(_dumps(_bare(tool)) + "\n" for tool in tools)
    return ("You are provided with these tools:\n<tools>\n" + text + "</tools>\n\nIf you need to call tools, please "
            "respond with <tool_calls></tool_calls> XML tags, and provide tool-name and json-object of arguments, "
            'following the format below:\n<tool_calls>\n{"name": <tool-name-1>, "arguments": <args-json-object-1>}'
            "\n...\n</tool_calls>")


def _minimax1_calls(calls: list[Call]) -> str:
    lines = [_dumps({"name": name, "arguments": json.loads(arguments)}) for name, arguments in calls]
    return "<tool_calls>\n" + "\n".join(lines) + "\n</tool_calls>"


def _minimax2_tools(tools: list[dict], today: str) -> str:
    text = "".join("<tool>" + _dumps(_bare(tool)) + "</tool>\n" for tool in tools)
    return ("\n\n# Tools\n\nYou may call one or more tools to assist with the user query.\n"
            "Here are the tools available in JSONSchema format:\n\n<tools>\n" + text + "</tools>\n\n"
            "When making tool calls, use XML format to invoke tools and pass parameters:\n"
            '\n<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n'
            '<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>')


def _minimax2_calls(calls: list[Call]) -> str:
    return _tagged_calls(calls, '<invoke name="{name}">', '\n<parameter name="{key}">{value}</parameter>',
                         "\n</invoke>")


# -- seed_oss ---------------------------------------------------------------------------------------------

def _seed_oss_tools(tools: list[dict], today: str) -> str:
    return ("system\nYou are Doubao, a helpful AI assistant. You may call one or more functions to assist with the "
            "user query.Tool List:\nYou are authorized to use the following tools (described in JSON Schema format). "
            "Before performing any task, you must decide how to call them based on the descriptions and parameters of "
            "these tools.\n" + _dumps(tools) +
            "\n工具调用请遵循如下格式:\n<seed:tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>"
            "value_1</parameter>\n<parameter=example_parameter_2>This is the value for the second parameter\nthat can "
            "span\nmultiple lines</parameter>\n</function>\n</seed:tool_call>\n")


def _seed_oss_calls(calls: list[Call]) -> str:
    return _tagged_calls(calls, "\n<seed:tool_call>\n<function={name}", "\n<parameter={key}>{value}</parameter>",
                         "\n</function>\n</seed:tool_call>")


# -- lfm2 (Pythonic calls) ---------------------------------------------------------------------------------

def _lfm2_tools(tools: list[dict], today: str) -> str:
    listed = [tool.get("function", tool) if tool.get("type") == "function" else tool for tool in tools]
    return "List of tools: <|tool_list_start|>" + _dumps(listed) + "<|tool_list_end|>"


def _lfm2_calls(calls: list[Call]) -> str:
    texts = []
    for name, arguments in calls:
        parts = [f'{key}="{value}"' if isinstance(value, str) else f"{key}={_dumps(value)}"
                 for key, value in json.loads(arguments).items()]
        texts.append(f"{name}({', '.join(parts)})")
    return f"<|tool_call_start|>[{', '.join(texts)}]<|tool_call_end|>"


# -- gemma4 ---------------------------------------------------------------------------------------------

_Q = '<|"|>'  # Gemma 4's string quote


def _gemma4_tools(tools: list[dict], today: str) -> str:
    declarations = []
    for tool in tools:
        function = tool.get("function", tool) if tool.get("type") == "function" else tool
        text = f"declaration:{function['name']}{{description:{_Q}{function.get('description', '')}{_Q}"
        params = function.get("parameters")
        if params:
            parts = []
            if params.get("properties"):
                props = []
                for name, schema in params["properties"].items():
                    items = []
                    if schema.get("description"):
                        items.append(f"description:{_Q}{schema['description']}{_Q}")
                    if schema.get("type"):
                        items.append(f"type:{_Q}{str(schema['type']).upper()}{_Q}")
                    props.append(f"{name}:{{{','.join(items)}}}")
                parts.append(f"properties:{{{','.join(props)}}}")
            if params.get("required"):
                parts.append("required:[" + ",".join(f"{_Q}{item}{_Q}" for item in params["required"]) + "]")
            if params.get("type"):
                parts.append(f"type:{_Q}{str(params['type']).upper()}{_Q}")
            text += f",parameters:{{{','.join(parts)}}}"
        response = function.get("response")
        if response:
            parts = [f"description:{_Q}{response['description']}{_Q}"] if response.get("description") else []
            kind = str(response.get("type", "")).upper()
            if kind == "OBJECT":
                parts.append(f"type:{_Q}{kind}{_Q}")
            text += f",response:{{{','.join(parts)}}}"
        declarations.append(text + "}")
    return "\n".join(declarations)


def _gemma4_value(value: Any, escape_keys: bool = True) -> str:
    if isinstance(value, str):
        return f"{_Q}{value}{_Q}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ",".join((f"{_Q}{key}{_Q}" if escape_keys else str(key)) + ":" +
                              _gemma4_value(value[key], escape_keys) for key in sorted(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_gemma4_value(item, escape_keys) for item in value) + "]"
    return "null" if value is None else str(value)


def _gemma4_calls(calls: list[Call]) -> str:
    texts = []
    for name, arguments in calls:
        try:
            parsed = json.loads(arguments)
        except (TypeError, json.JSONDecodeError):
            parsed = arguments
        if isinstance(parsed, dict):
            body = ",".join(f"{key}:{_gemma4_value(parsed[key], escape_keys=False)}" for key in sorted(parsed))
        elif isinstance(parsed, str):
            body = parsed
        else:
            body = _gemma4_value(parsed, escape_keys=False)
        texts.append(f"<|tool_call>call:{name}{{{body}}}<tool_call|>")
    return "".join(texts)


# -- the same texts as Jinja, for the chat template export writes -----------------------------------------
# Each is two macros, tools_text(tools) and calls_text(calls) (an assistant message's tool_calls), writing what
# the Python functions above write; tests/data/test_lf_parity.py renders them against LLaMA-Factory's frozen
# texts. No text lives outside expressions (Hugging Face renders with trim_blocks).


def jinja_literal(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


_J_BARE = "(t['function'] if t['type'] == 'function' else t)"
_J_WRAPPED = "(t if t['type'] == 'function' else {'type': 'function', 'function': t})"
_J_CALL = "{%- set f = c['function'] if c['function'] is defined else c -%}"
_NL = jinja_literal("\n")


def _jinja(tools_body: str, calls_body: str) -> tuple[str, str]:
    return ("{%- macro tools_text(tools) -%}" + tools_body + "{%- endmacro -%}",
            "{%- macro calls_text(calls) -%}" + calls_body + "{%- endmacro -%}")


def _j_each_call(text: str, setup: str = "") -> str:
    """`text` (an expression of f, the call's function) for each call, one per line."""
    return ("{%- for c in calls -%}" + _J_CALL + setup + "{%- if not loop.first -%}{{ " + _NL + " }}{%- endif -%}"
            "{{ " + text + " }}{%- endfor -%}")


def _j_text(text: str) -> str:
    return "{{ " + jinja_literal(text) + " }}"


def _j_call_list(key: str) -> str:
    return ("{%- set ns = namespace(items=[]) -%}{%- for c in calls -%}" + _J_CALL +
            "{%- set ns.items = ns.items + [{'name': f['name'], '" + key + "': f['arguments']}] -%}{%- endfor -%}")


_J_DEFAULT_TOOLS = (
    "{%- set ns = namespace(text='', names=[], params='') -%}{%- for t in tools -%}{%- set f = " + _J_BARE + " -%}"
    "{%- set ns.params = '' -%}{%- for name, param in f['parameters']['properties'].items() -%}"
    "{%- set ns.params = ns.params + '  - ' + name + ' (' + (param['type'] or '') + "
    "(', required' if name in (f['parameters']['required'] or []) else '') + '): ' + (param['description'] or '') + "
    "((', should be one of [' + param['enum'] | join(', ') + ']') if param['enum'] else '') + "
    "((', where each item should be ' + (param['items']['type'] or '')) if 'items' in param and param['items'] "
    "else '') + " + _NL + " -%}"  # 'items' tested by key: param['items'] alone would find the dict's method
    "{%- endfor -%}"
    "{%- set ns.text = ns.text + '> Tool Name: ' + f['name'] + " + jinja_literal("\nTool Description: ") + " + "
    "(f['description'] or '') + " + jinja_literal("\nTool Args:\n") + " + ns.params + " + _NL + " -%}"
    "{%- set ns.names = ns.names + [f['name']] -%}{%- endfor -%}"
    "{{ " + jinja_literal("You have access to the following tools:\n") + " + ns.text + " +
    jinja_literal("Use the following format if using a tool:\n```\nAction: tool name (one of [") +
    " + ns.names | join(', ') + " +
    jinja_literal("])\nAction Input: the input to the tool, in a JSON format representing the kwargs "
                  '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n') + " }}")
_J_QWEN_LINES = "{%- for t in tools -%}{{ " + _NL + " + " + _J_WRAPPED + " | tojson }}{%- endfor -%}"
_J_QWEN_CALLS = _j_each_call(jinja_literal("<tool_call>\n") + " + {'name': f['name'], 'arguments': f['arguments']}"
                             " | tojson + " + jinja_literal("\n</tool_call>"))
_SEED_HEAD, _SEED_TAIL = _seed_oss_tools([], "").split("[]")
_LLAMA3_HEAD, _LLAMA3_TAIL = _llama3_tools([], "TODAY").split("TODAY")

JINJA: dict[str, tuple[str, str]] = {
    "default": _jinja(_J_DEFAULT_TOOLS, _j_each_call(
        "'Action: ' + f['name'] + " + jinja_literal("\nAction Input: ") + " + f['arguments'] | tojson")),
    "qwen": _jinja(_j_text("\n\n" + _QWEN_TOOLS_HEAD) + _J_QWEN_LINES + _j_text(_QWEN_TOOLS_TAIL), _J_QWEN_CALLS),
    "ling": _jinja(_j_text(_QWEN_TOOLS_HEAD) + _J_QWEN_LINES + _j_text(_QWEN_TOOLS_TAIL + "\ndetailed thinking off"),
                   _J_QWEN_CALLS),
    "llama3": _jinja(
        "{{ " + jinja_literal(_LLAMA3_HEAD) + " + strftime_now('%d %b %Y') + " + jinja_literal(_LLAMA3_TAIL) + " }}"
        "{%- for t in tools -%}{{ " + _J_WRAPPED + " | tojson(indent=4) + " + jinja_literal("\n\n") + " }}"
        "{%- endfor -%}",
        _j_call_list("parameters") + "{{ (ns.items[0] if ns.items | length == 1 else ns.items) | tojson }}"),
    "mistral": _jinja(
        "{%- set ns = namespace(items=[]) -%}{%- for t in tools -%}{%- set ns.items = ns.items + [" + _J_WRAPPED +
        "] -%}{%- endfor -%}{{ '[AVAILABLE_TOOLS] ' + ns.items | tojson + '[/AVAILABLE_TOOLS]' }}",
        _j_call_list("arguments") + "{{ ns.items | tojson }}"),
    "glm4": _jinja(
        _j_text(_glm4_tools([], "")) + "{%- for t in tools -%}{%- set f = " + _J_BARE + " -%}{{ " +
        jinja_literal("\n\n## ") + " + f['name'] + " + jinja_literal("\n\n") + " + f | tojson(indent=4) + " +
        jinja_literal("\n在调用上述函数时，请使用 Json 格式表示调用的参数。") + " }}{%- endfor -%}",
        "{%- if calls | length > 1 -%}{{ raise_exception('tool_format glm4 writes one tool call per assistant turn "
        "(GLM-4 has no parallel calls)') }}{%- endif -%}" +
        _j_each_call("f['name'] + " + _NL + " + f['arguments'] | tojson")),
    "seed_oss": _jinja(
        "{{ " + jinja_literal(_SEED_HEAD) + " + tools | tojson + " + jinja_literal(_SEED_TAIL) + " }}",
        _j_each_call(jinja_literal("\n<seed:tool_call>\n<function=") + " + f['name'] + ns.params + " +
                     jinja_literal("\n</function>\n</seed:tool_call>"),
                     "{%- set ns = namespace(params='') -%}{%- for key, value in f['arguments'].items() -%}"
                     "{%- set ns.params = ns.params + " + jinja_literal("\n<parameter=") + " + key + '>' + "
                     "(value if value is string else value | tojson) + '</parameter>' -%}{%- endfor -%}")),
}
"""The tool formats the exported chat template writes, as Jinja macros (tools_text, calls_text). The others (gemma4, lfm2, minimax1,
minimax2, qwen3_5, glm4_moe) are not written: the exported template refuses tools for them, naming why."""


@dataclass(frozen=True)
class ToolFormat:
    """One LLaMA-Factory tool format: the definitions' text and the calls' text."""

    tools: Callable[[list[dict], str], str]
    calls: Callable[[list[Call]], str]


TOOL_FORMATS: dict[str, ToolFormat] = {
    "default": ToolFormat(_default_tools, _default_calls),
    "gemma4": ToolFormat(_gemma4_tools, _gemma4_calls),
    "glm4": ToolFormat(_glm4_tools, _glm4_calls),
    "llama3": ToolFormat(_llama3_tools, _llama3_calls),
    "lfm2": ToolFormat(_lfm2_tools, _lfm2_calls),
    "minimax1": ToolFormat(_minimax1_tools, _minimax1_calls),
    "minimax2": ToolFormat(_minimax2_tools, _minimax2_calls),
    "mistral": ToolFormat(_mistral_tools, _mistral_calls),
    "qwen": ToolFormat(_qwen_tools, _qwen_calls),
    "qwen3_5": ToolFormat(_qwen3_5_tools, _qwen3_5_calls),
    "glm4_moe": ToolFormat(_glm4_moe_tools, _glm4_moe_calls),
    "seed_oss": ToolFormat(_seed_oss_tools, _seed_oss_calls),
    "ling": ToolFormat(_ling_tools, _qwen_calls),
}


def today() -> str:
    """The date llama3's tool prompt states, as LLaMA-Factory writes it (the day of encoding)."""
    return datetime.now().strftime("%d %b %Y")
