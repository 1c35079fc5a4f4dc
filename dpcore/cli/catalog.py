"""`python -m dpcore backbones | datasets`: what is registered."""
from __future__ import annotations

def add_commands(subparsers, add_runs_dir) -> dict:
    for name, helptext in (("backbones", "registered backbones"), ("datasets", "registered data sets")):
        s = subparsers.add_parser(name, help=helptext)
        add_runs_dir(s)

    return {"backbones": _cmd_backbones, "datasets": _cmd_datasets}


def _cmd_backbones(args) -> int:
    import models

    for name in models.list_models():
        spec = models.get_spec(name)
        print(f"{name:<40} {spec.description}")
    return 0


def _cmd_datasets(args) -> int:
    from dpcore.data import DATASETS

    for name, info in DATASETS.items():
        print(f"{name:<16} {info.description}")
    return 0
