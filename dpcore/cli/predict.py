"""`python -m dpcore predict`: a stored run's (calibrated) class probabilities for image files."""
from __future__ import annotations

import json


def add_commands(subparsers, add_runs_dir) -> dict:
    p = subparsers.add_parser("predict", help="class probabilities of a stored run for image files")
    add_runs_dir(p)
    p.add_argument("--run", required=True, help="run id (see `runs --ids`)")
    p.add_argument("images", nargs="+", help="image files (png, jpg, ...)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    return {"predict": _cmd_predict}


def _cmd_predict(args) -> int:
    from dpcore.analysis.predict import load_run, read_image_file
    from dpcore.store.runs import RunStore

    images = [read_image_file(path) for path in args.images]  # checked like uploads, before the model loads
    loaded = load_run(RunStore(args.runs_dir), args.run)
    probs = loaded.predict_proba(images)
    if args.json:
        print(json.dumps([{"image": p, "probabilities": dict(zip(loaded.class_names, map(float, row)))}
                          for p, row in zip(args.images, probs)], indent=2))
        return 0
    names = loaded.class_names
    width = max(len(p) for p in args.images)
    print(f"{'image':<{width}}  {'predicted':<12} " + " ".join(f"{n[:10]:>10}" for n in names))
    for path, row in zip(args.images, probs):
        print(f"{path:<{width}}  {names[int(row.argmax())][:12]:<12} " + " ".join(f"{v:>10.4f}" for v in row))
    return 0
