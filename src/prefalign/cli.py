"""`prefalign COMMAND CONFIG.yaml [key=value ...]`: turns argv into calls; no logic of its own."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from prefalign import distributed
from prefalign.errors import PrefalignError, unwritable_error


def _load(ns):
    """The config of a command; the demo model is built first when the config asks for it (build_demo_model).

    The demo (a tokenizer, a tiny Llama and its SFT warm-up) is not part of any command: only the CLI
    asks for it, so the DPO path never imports it. A command run from the command line (one per
    process) hides the optional engines its config does not use before any model library is imported.
    """
    from prefalign.config import build_config
    from prefalign.config.loader import read_values
    from prefalign.config.scale import hide_unused_engines

    values = read_values(ns.config, ns.overrides)
    if ns.own_process:
        hide_unused_engines(values)
    config = build_config(values, command=ns.command)
    if config.model.build_demo_model:
        from pathlib import Path

        from prefalign.demo import check_demo_model_path, ensure_demo_model

        check_demo_model_path(config.model.model_name_or_path)
        with config.training.main_process_first(desc="the demo model"):  # the other processes wait, then read it
            if not (Path(config.model.model_name_or_path) / "config.json").is_file():
                print(f"Building the demo model at {config.model.model_name_or_path} (build_demo_model: true; "
                      "first run only)", flush=True)
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
             seed=ns.seed, images=ns.image, videos=ns.video)


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


def _parallel_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="run in N processes on this machine (starts torchrun; one per GPU, or CPU processes)")


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--prompt", help="answer this one message and exit (default: read messages from stdin)")
    p.add_argument("--compare-reference", action="store_true",
                   help="also print the reference's answer (adapter disabled, or ref_model), same seed")
    p.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image the first message is about (repeat for several; a vision-language model and "
                        "template); the message's <image> placeholders place them, else they go before its text")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video the first message is about (repeat for several; Qwen2-VL, Qwen2.5-VL, Qwen3-VL; "
                        "needs PyAV and torchvision); its <video> placeholders place them, else they go before its text")


def _output_dir_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="a training run's output_dir")


# name -> (function, help, how its arguments are declared; default: CONFIG.yaml [key=value ...])
# Under a launcher, train and eval run in every process; the other commands in the main one only.
COMMANDS = {
    "train": (_train, "Align a model with preference data (DPO and its variants).", _parallel_arguments),
    "data": (_data, "Load and encode the data as training would; print counts, lengths and examples."),
    "eval": (_eval, "Score a policy against its reference on preference pairs, without training.",
             _parallel_arguments),
    "export": (_export, "Merge the LoRA adapter into its base and save a standalone model."),
    "chat": (_chat, "Chat with the model (one-shot with --prompt, else from stdin).", _chat_arguments),
    "plot": (_plot, "Plot the logged metrics of a run as PNGs in its output dir.", _output_dir_arguments),
    "report": (_report, "Write report.html and the README.md model card of a finished run.", _output_dir_arguments),
}


def resume_command(ns, checkpoint: str) -> str:
    """The command line that continues an interrupted run: the same config and overrides, from `checkpoint`.

    Under a launcher, the same number of processes: `--nproc N` on one machine (what prefalign's own
    `--nproc` launcher and a one-machine torchrun or accelerate launch started); on several machines,
    each machine's launcher runs it again.
    """
    from pathlib import Path

    kept = [o for o in ns.overrides if o.partition("=")[0].strip() != "resume_from_checkpoint"]
    command = ["prefalign", ns.command, ns.config, *kept, f"resume_from_checkpoint={Path(checkpoint).resolve()}"]
    nproc, several_machines = distributed.launcher_processes()
    if several_machines:
        return f"your launcher, on every machine, with: {shlex.join(command[1:])}"
    return shlex.join(command + (["--nproc", str(nproc)] if nproc > 1 else []))


def _say(line: str) -> None:
    """Print `line` to stderr as the run's last line, on a line of its own.

    Progress bars still open (the Trainer's, a save's) are closed first: each ends its own line, and
    none is redrawn after the message (an open bar is redrawn when it is garbage-collected at exit).
    """
    tqdm = sys.modules.get("tqdm.std")  # imported by whatever drew a bar; no bar without it
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


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


def _without_nproc(argv: list[str]) -> list[str]:
    """argv minus `--nproc N` / `--nproc=N` (the processes torchrun starts must not start more)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # argparse leaves key=value after an option (`chat cfg.yaml --seed 1 a=b`) unparsed: they are overrides.
    if extra and hasattr(ns, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        ns.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(ns, "nproc", 1) > 1 and not distributed.under_launcher():
        return distributed.launch(ns.nproc, _without_nproc(list(sys.argv[1:] if argv is None else argv)))
    if getattr(ns, "nproc", 1) < 1:
        parser.error(f"--nproc {ns.nproc}: give at least 1 process")
    ns.own_process = argv is None  # the command line's one command (not a test's or a runner's call)
    main_process = distributed.is_main_process()
    if not main_process and not hasattr(ns, "nproc"):
        return 0  # a command that does not run in parallel: the main process does it alone
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from prefalign.train.signals import Interrupted

    try:
        COMMANDS[ns.command][0](ns)
    except Interrupted as exc:  # exit status 128 + signal number (130 SIGINT, 143 SIGTERM), as a shell reports it
        if main_process:  # one resume command for the whole run; every process stopped after the same step
            resume = f"; resume with: {resume_command(ns, exc.checkpoint)}" if exc.checkpoint else ""
            _say(f"prefalign {ns.command}: {exc}{resume}")
        return exc.exit_code
    except PrefalignError as exc:
        _say(f"prefalign {ns.command}: error: {exc}")
        return 2
    except Exception as exc:  # a full or read-only disk is the user's to fix; anything else is a bug
        error = unwritable_error(exc)
        if error is None:
            raise
        _say(f"prefalign {ns.command}: error: {error}")
        return 2
    except KeyboardInterrupt:
        _say("prefalign: interrupted")
        return 130
    return 0
