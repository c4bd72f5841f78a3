"""Print the README's config reference (Markdown) from the documented fields of the argument groups."""

import dataclasses
import typing

from prefalign.config.args import (
    DataArguments, ExportArguments, FinetuningArguments, GenerationArguments, ModelArguments,
)

TITLES = {
    ModelArguments: "Model",
    DataArguments: "Data",
    FinetuningArguments: "Fine-tuning and preference",
    ExportArguments: "Export",
    GenerationArguments: "Chat generation",
}


def reference() -> str:
    out = []
    for cls, title in TITLES.items():
        hints = typing.get_type_hints(cls)
        out += [f"#### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "").replace(" | ", " or ")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, list):  # shown as it may be written: a comma-separated list
                default = ",".join(str(v) for v in default)
            out.append(f"| `{f.name}` | {kind} | `{default}` | {f.metadata['help']} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference())
