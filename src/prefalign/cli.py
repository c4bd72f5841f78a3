"""`prefalign COMMAND CONFIG.yaml [key=value ...]`: turns argv into calls; no logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys

from prefalign.errors import PrefalignError, unwritable_error


def _load(ns):
    """The config of a command; the demo model is built first when the config asks for it (build_demo_model).

    The demo (a tokenizer, a tiny Llama and its SFT warm-up) is not part of any command: only the CLI
    asks for it, so the DPO path never imports it.
    """
    from prefalign.config import load_config

    config = load_config(ns.config, ns.overrides)
    if config.model.build_demo_model:
        from prefalign.demo import ensure_demo_model

        ensure_demo_model(config.model.model_name_or_path)
    return config


def _train(ns) -> None:
    from prefalign.train.workflow import run_train

    run_train(_load(ns))


def _data(ns) -> None:
    from prefalign.data.inspect import run_data

    run_data(_load(ns))


def _eval(ns) -> None:
    from prefalign.evaluate import run_eval

    run_eval(_load(ns))


def _export(ns) -> None:
    from prefalign.export import run_export

    run_export(_load(ns))


def _chat(ns) -> None:
    from prefalign.chat import run_chat

    run_chat(_load(ns), prompt=ns.prompt, compare_reference=ns.compare_reference,
             seed=ns.seed)


def _plot(ns) -> None:
    from prefalign.report import plot_metrics

    for path in plot_metrics(ns.output_dir):
        print(path)


def _report(ns) -> None:
    from prefalign.report import rebuild_report

    for path in rebuild_report(ns.output_dir):
        print(path)


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the file")


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--prompt", help="answer this one message and exit (default: read messages from stdin)")
    p.add_argument("--compare-reference", action="store_true",
                   help="also print the reference's answer (adapter disabled, or ref_model), same seed")
    p.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")


def _output_dir_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="a training run's output_dir")


# name -> (function, help, how its arguments are declared; default: CONFIG.yaml [key=value ...])
COMMANDS = {
    "train": (_train, "Align a model with preference data (DPO and its variants)."),
    "data": (_data, "Load and encode the data as training would; print counts, lengths and examples."),
    "eval": (_eval, "Score a policy against its reference on preference pairs, without training."),
    "export": (_export, "Merge the LoRA adapter into its base and save a standalone model."),
    "chat": (_chat, "Chat with the model (one-shot with --prompt, else from stdin).", _chat_arguments),
    "plot": (_plot, "Plot the logged metrics of a run as PNGs in its output dir.", _output_dir_arguments),
    "report": (_report, "Write report.html and the README.md model card of a finished run.", _output_dir_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefalign",
        description="Align a causal language model with human preferences: DPO and its variants. "
                    "Commands take CONFIG.yaml and key=value overrides (plot and report take an output dir).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, *arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        (arguments[0] if arguments else _config_arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # argparse leaves key=value after an option (`chat cfg.yaml --seed 1 a=b`) unparsed: they are overrides.
    if extra and hasattr(ns, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        ns.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        COMMANDS[ns.command][0](ns)
    except PrefalignError as exc:
        print(f"prefalign {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a full or read-only disk is the user's to fix; anything else is a bug
        error = unwritable_error(exc)
        if error is None:
            raise
        print(f"prefalign {ns.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefalign: interrupted", file=sys.stderr)
        return 130
    return 0
