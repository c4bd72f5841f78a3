"""Print the README's table of template names (Markdown): what each LLaMA-Factory name resolves to."""

from prefalign.data.template_formats import LLAMA_FACTORY_TEMPLATES, Format
from prefalign.data.templates import turn_layout


def _end_of_turn(fmt: Format) -> str:
    end = fmt.end_of_turn or "{eos}"
    written = end in fmt.assistant
    return f"`{end}`" + ("" if written else " (the format writes none after a reply; appended)")


def table() -> str:
    rows = ["| name | renders with | a user turn and its reply | reply ends with |", "|---|---|---|---|"]
    for name, meaning in LLAMA_FACTORY_TEMPLATES.items():
        if isinstance(meaning, Format):
            layout = turn_layout(meaning).replace("|", "\\|")
            rows.append(f"| `{name}` | built-in | `{layout}` | {_end_of_turn(meaning).replace('|', chr(92) + '|')} |")
        else:
            args = ", ".join(f"`{k}: {str(v).lower()}`" for k, v in meaning.kwargs.items())
            rows.append(f"| `{name}` | the tokenizer's own chat template{' with ' + args if args else ''} | "
                        f"{meaning.why} | found by rendering |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
