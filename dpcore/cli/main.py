"""`python -m dpcore ...`: the same engine the app drives, from a terminal.

Every command group is a module of this folder with ``add_commands(subparsers, add_runs_dir) -> {name:
handler(args) -> int}``; `COMMAND_MODULES` lists them in the order `--help` shows them. A new command: a
module with that function, and its name here."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from dpcore.errors import DPCoreError

COMMAND_MODULES = ("dpcore.cli.train", "dpcore.cli.runs", "dpcore.cli.accounting", "dpcore.cli.predict",
                   "dpcore.cli.catalog", "dpcore.cli.experiments", "dpcore.cli.privacy", "dpcore.cli.ledger",
                   "dpcore.cli.fairness", "dpcore.cli.store", "dpcore.cli.resume", "dpcore.cli.calibrate",
                   "dpcore.cli.frontier")
COMMANDS: dict = {}  # name -> handler, filled by build_parser


def _add_runs_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="runs", help="folder of stored runs (default: runs/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpcore", description=(
        "DP-SGD fine-tuning of image classifiers with exact privacy accounting."))
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        COMMANDS.update(importlib.import_module(name).add_commands(sub, _add_runs_dir))
    return parser


def _only_train_under_torchrun(command: str) -> None:
    """Under torchrun every process runs the command: only `train` knows how to share one run among them."""
    from dpcore.privacy.distributed import from_env
    from dpcore.errors import ConfigError

    world = from_env()
    if world is not None and command != "train":
        raise ConfigError("command", f"`{command}` is not spread across processes, and {world.size} copies of it "
                          "would each write the run store and the privacy ledger",
                          f"run `python -m dpcore {command}` without torchrun (only `train` runs under torchrun)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _only_train_under_torchrun(args.command)
        return COMMANDS[args.command](args)
    except DPCoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
