"""Extract every field and default of LLaMA-Factory's argument dataclasses into tests/fixtures/llamafactory/lf_defaults.json.

Reads LF's source without importing or installing it:
    pip download llamafactory==0.9.5 --no-deps -d /tmp/lfwheel && unzip -q /tmp/lfwheel/*.whl -d /tmp/lfwheel/x
    python scripts/lf_defaults.py /tmp/lfwheel/x/llamafactory
Enum defaults (`AttentionFunction.AUTO`) are written as their values ("auto"), arithmetic (`768 * 768`) as its result.
"""

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "llamafactory" / "lf_defaults.json"
# The argument files of a training config (evaluation_args.py is `llamafactory-cli eval`'s benchmark runner).
FILES = ("model_args.py", "data_args.py", "finetuning_args.py", "training_args.py", "generating_args.py")


def enum_values(source: Path) -> dict[str, object]:
    """`Class.MEMBER` -> value for every enum-like class of LF's extras/constants.py."""
    values = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name):
                    try:
                        values[f"{node.name}.{item.targets[0].id}"] = ast.literal_eval(item.value)
                    except ValueError:
                        pass
    return values


def evaluate(node: ast.expr, enums: dict[str, object]):
    text = ast.unparse(node)
    if text in enums:
        return enums[text]
    if isinstance(node, ast.BinOp):  # e.g. 768 * 768
        return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})  # noqa: S307 - numbers only
    return ast.literal_eval(node)


def fields(tree: ast.Module, enums: dict[str, object]) -> dict[str, dict[str, object]]:
    """Each dataclass of the module -> {field: default} of its config keys (init fields), in source order."""
    classes = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        found = {}
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            default = None
            if isinstance(item.value, ast.Call):  # field(default=...)
                if any(k.arg == "init" and ast.literal_eval(k.value) is False for k in item.value.keywords):
                    continue  # set by LF itself (compute_dtype, model_max_length, ...): not a config key
                for keyword in item.value.keywords:
                    if keyword.arg == "default":
                        default = evaluate(keyword.value, enums)
                    elif keyword.arg == "default_factory":
                        raise SystemExit(f"{node.name}.{item.target.id}: default_factory is not handled")
            elif item.value is not None:
                default = evaluate(item.value, enums)
            found[item.target.id] = default
        if found:
            classes[node.name] = found
    return classes


def main(package: Path) -> None:
    enums = enum_values(package / "extras" / "constants.py")
    classes = {}
    for name in FILES:
        classes.update(fields(ast.parse((package / "hparams" / name).read_text()), enums))
    version = ast.literal_eval(next(
        n.value for n in ast.parse((package / "extras" / "env.py").read_text()).body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "VERSION"))
    OUT.write_text(json.dumps({"release": version, "classes": classes}, indent=1) + "\n")
    print(f"{OUT}: {sum(len(v) for v in classes.values())} fields of {len(classes)} classes (LLaMA-Factory {version})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
