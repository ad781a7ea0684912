"""The ebm_fast command line: ebm-fast COMMAND [options] (ebm-fast COMMAND -h for its options)."""

from __future__ import annotations

import argparse
import importlib
import sys

# COMMAND -> the module that implements it: add_arguments(parser) declares its options,
# main(args) runs it and returns the exit status, the first line of its docstring is its help.
# A new subcommand is one line here.
COMMANDS = {
    "demo": "ebm_fast.experiments.demo",
    "study": "ebm_fast.experiments.study",
    "build": "ebm_fast.commands.build",
    "info": "ebm_fast.commands.info",
    "bench": "ebm_fast.commands.bench",
    "train": "ebm_fast.commands.train",
    "check-gpu": "ebm_fast.commands.gpu_check",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebm-fast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or name).strip().splitlines()[0]
        command = subparsers.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(COMMANDS[args.command]).main(args)


if __name__ == "__main__":
    sys.exit(main())
