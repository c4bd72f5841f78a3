"""`prefalign COMMAND CONFIG.yaml [key=value ...]`: turns argv into calls; no logic of its own."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from prefalign.errors import PrefalignError


def _train(ns) -> None:
    from prefalign.config import load_config
    from prefalign.train.workflow import run_train

    run_train(load_config(ns.config, ns.overrides))


def _data(ns) -> None:
    from prefalign.config import load_config
    from prefalign.data.inspect import run_data

    run_data(load_config(ns.config, ns.overrides))


COMMANDS = {
    "train": (_train, "Align a model with preference data (DPO and its variants)."),
    "data": (_data, "Load and encode the data as training would; print counts, lengths and examples."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        COMMANDS[ns.command][0](ns)
    except PrefalignError as exc:
        print(f"prefalign {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        print(f"prefalign {ns.command}: error: cannot write {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefalign: interrupted", file=sys.stderr)
        return 130
    return 0
