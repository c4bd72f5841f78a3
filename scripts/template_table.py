"""Print the README's table of template names (Markdown): the rules and slots each LLaMA-Factory name encodes with."""

from prefalign.data.templates import BUILTIN_TEMPLATES


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _ends(template) -> str:
    if template.lf.efficient_eos:
        return "`<eos>` (appended: efficient_eos)"
    return f"`{_cell(template.end_of_turn or '<eos>')}`"


def table() -> str:
    rows = ["| name | encoded with | a user turn and its reply | reply ends with |", "|---|---|---|---|"]
    for name, template in BUILTIN_TEMPLATES.items():
        rows.append(f"| `{name}` | {_cell(template.rules)} | `{_cell(template.description)}` | {_ends(template)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
