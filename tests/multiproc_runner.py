"""Runs several `prefalign` command lines, one after another, in each process of one torchrun launch.

The multi-process tests start it (`torchrun ... multiproc_runner.py JSON`), so that the launcher's
start-up (seconds per launch on a small machine) is paid once for several runs. JSON is a list of
argument lists, as `prefalign` takes them.
"""

import json
import sys

from prefalign.cli import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            sys.exit(code)
