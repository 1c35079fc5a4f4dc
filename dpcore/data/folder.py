"""ImageFolder layouts: ROOT/{train,test[,val]}/CLASS/* (Kaggle chest_xray, DermNet) or ROOT/CLASS/*.

Files are only listed here, not decoded (that happens once, in `materialize`). Nothing is dropped
silently: files that are not images are listed in split_info["ignored_files"] and warned about.

Copies are found by content (sha256 of the bytes, `base.content_digests`), not by name or count. A copy in two
classes, or in two splits (train and test or val), is an error naming the files: it would give one image two labels,
or score the model on an image it trained on. Copies within one class of one split are allowed, with a warning, and
listed in split_info["duplicate_files"] (the real chest X-ray set has 30 such sets, duplicates of the original data
set); a held-out test split keeps every copy of a file on the side of its first copy. Copies of a flat, one-colour
image (a blank frame, a placeholder) hold nothing to recognise and are only counted (split_info["n_blank_copies"]).
Folders are checked by where they lead: a class folder that is a link to the data folder, to a folder above it, or
to another class folder would read the same images again, and is refused, as is a folder link that loops (an image
link that loops is listed, and reported with the unreadable files when decoded). Names that are not UTF-8 are read
as the file system gives them (surrogate escapes), like any other name.

Optional per-image metadata (sex, age, site, scanner, ... for subgroup metrics): a `metadata.csv` in the
data folder with a `path` column (the image's path relative to the data folder, e.g. `train/mel/a.jpg`,
or its bare file name when that is unique) and any other columns, which become each example's metadata
(empty cells are None; a column whose cells are all numbers is read as numbers). Every image must have a
row and every row must name an image, else loading stops with an error naming the files.
"""
from __future__ import annotations

import csv
import errno
import math
import os
import warnings
from pathlib import Path

import numpy as np

from dpcore.errors import ConfigError, DataError, UnreadableImagesError
from dpcore.data.base import DataSplits, content_digests
from dpcore.data.images import PathImageList, open_image
from dpcore.data.split import finish, stratified_split

METADATA_CSV = "metadata.csv"
KEY_COLUMNS = ("path", "file", "filename", "image")  # the first one present keys the rows
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
SPLIT_NAMES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def check_data_dir(data_dir, dataset: str) -> Path:
    if data_dir is None or str(data_dir) == "":
        raise ConfigError("data_dir", f"data set {dataset!r} needs a data folder", "pass --data-dir PATH")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise ConfigError("data_dir", f"{root} does not exist",
                          "check the path (the data are read in place, never copied)")
    if not root.is_dir():
        raise ConfigError("data_dir", f"{root} is a file, not a folder", f"pass the folder that holds the {dataset} data")
    return root


def _visible(path: Path) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(path) if not e.name.startswith(".")), key=lambda e: e.name)


def _is_dir(e: os.DirEntry) -> bool:
    """`e.is_dir()` following links; a link that loops (or cannot be followed) is a DataError naming it."""
    try:
        return e.is_dir()
    except OSError as exc:
        what = "is a symbolic link that loops" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror})"
        raise DataError(f"{e.path} {what}. Fix: remove the link, or point it at a real folder or file") from None


def _scan_class(class_dir: Path, root: Path, ignored: list[str]) -> list[str]:
    """Image files anywhere below one class folder (like torchvision's ImageFolder), sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            dirnames.remove(d)  # os.walk would not enter it either; say so rather than drop it silently
            ignored.append(str((Path(dirpath) / d).relative_to(root)) + "/ (a link to a folder: not followed)")
        for f in sorted(filenames):
            if f.startswith("."):
                continue  # .DS_Store, ._AppleDouble, editor swap files
            p = Path(dirpath) / f
            if is_image_file(f):
                found.append(str(p))
            else:
                ignored.append(str(p.relative_to(root)))
    if not found:
        raise DataError(f"class folder {class_dir} holds no image files (extensions: {', '.join(IMAGE_EXTENSIONS)}). "
                        "Fix: add images, or remove the folder if the class is not wanted")
    return found


def _scan_classes(parent: Path, root: Path, ignored: list[str]) -> dict[str, list[str]]:
    """{class name: image paths} for the class folders directly under `parent`; loose files there are ignored."""
    classes: dict[str, list[str]] = {}
    for e in _visible(parent):
        if _is_dir(e):
            classes[e.name] = _scan_class(Path(e.path), root, ignored)
        else:
            ignored.append(str(Path(e.path).relative_to(root)))
    if not classes:
        raise DataError(f"{parent} has no class folders. Fix: arrange the images as {parent}/CLASS_NAME/image.jpg")
    return classes


def _as_list(classes: dict[str, list[str]], class_names: list[str], where: Path) -> PathImageList:
    unknown = sorted(set(classes) - set(class_names))
    if unknown:
        raise DataError(f"{where} has class folder(s) {unknown} that train/ does not have (train classes: "
                        f"{class_names}). Fix: rename them to match train/, or add them to train/")
    paths = [p for c in class_names for p in classes.get(c, [])]
    labels = [i for i, c in enumerate(class_names) for _ in classes.get(c, [])]
    return PathImageList(paths, labels)


def _refuse_aliased_folders(root: Path, scanned: list[tuple[Path, dict[str, list[str]]]]) -> None:
    """Class folders must be distinct real folders: one that leads to the data folder (or above it), or to the same
    place as another class folder (or inside it), would read the same images again under another label or split."""
    top = root.resolve()
    seen: list[tuple[Path, Path]] = []
    for parent, classes in scanned:
        for name in classes:
            folder = parent / name
            real = folder.resolve()
            if real == top or top.is_relative_to(real):
                raise DataError(f"class folder {folder} leads to {real}, the data folder itself or a folder above it: "
                                "every image would be read again as a class of its own. Fix: remove the link "
                                f"{folder}, or point it at a folder of that class's images")
            for other, other_real in seen:
                if real == other_real or real.is_relative_to(other_real) or other_real.is_relative_to(real):
                    raise DataError(f"class folders {other} and {folder} lead to the same images ({other_real} and "
                                    f"{real}): each image would count twice, under two labels or in two splits. "
                                    "Fix: remove the link, or give each class its own folder")
            seen.append((folder, real))


def _check_copies(root: Path, parts: list[tuple[str, PathImageList]], info: dict) -> list[list[str | None]]:
    """The sha256 of every image of each part; byte-identical copies across classes or splits are a DataError,
    copies within one class of one split a warning recorded in info["duplicate_files"]."""
    digests = [content_digests(lst) for _, lst in parts]
    where: dict[str, list[tuple[str, int, str]]] = {}
    for (split, lst), ds in zip(parts, digests):
        for path, label, d in zip(lst.paths, lst.labels, ds):
            if d is not None:
                where.setdefault(d, []).append((split, int(label), path))
    groups = [g for g in where.values() if len(g) > 1]
    blank = [g for g in groups if _blank(g[0][2])]
    if blank:  # copies of one flat colour: nothing to recognise or memorise, so neither refused nor grouped
        info["n_blank_copies"] = sum(len(g) - 1 for g in blank)
        flat = {p for g in blank for _, _, p in g}
        digests = [[None if p in flat else d for p, d in zip(lst.paths, ds)] for (_, lst), ds in zip(parts, digests)]
        groups = [g for g in groups if g not in blank]
    if not groups:
        return digests

    def rel(path: str) -> str:
        return Path(path).relative_to(root).as_posix()

    crossing = [g for g in groups if len({(split, label) for split, label, _ in g}) > 1]
    if crossing:
        shown = "; ".join(" = ".join(rel(p) for _, _, p in g[:3]) + (" = ..." if len(g) > 3 else "")
                          for g in crossing[:5])
        more = f" and {len(crossing) - 5} more" if len(crossing) > 5 else ""
        raise DataError(f"{len(crossing)} image(s) under {root} have byte-identical copies (same sha256) in another "
                        f"class or split: {shown}{more}. A copy in two classes gives one image two labels; a copy in "
                        "train and test scores the model on an image it trained on (and shows a training image as "
                        "a test image). Fix: delete all but one copy of each (sha256sum lists them), or keep the "
                        "copies in one class of one split")
    info["duplicate_files"] = [[rel(p) for _, _, p in g] for g in groups]
    info["n_duplicate_files"] = sum(len(g) - 1 for g in groups)
    shown = "; ".join(" = ".join(rel(p) for _, _, p in g[:3]) for g in groups[:3])
    warnings.warn(f"{len(groups)} set(s) of byte-identical images within one class and split under {root} (e.g. "
                  f"{shown}): each copy counts as an image of its own, so image-level DP protects the image behind "
                  "them only as a group of copies; all are listed in split_info['duplicate_files']", stacklevel=4)
    return digests


def _blank(path: str) -> bool:
    """Whether an image is one flat colour (a blank frame, a placeholder): its copies identify no one."""
    try:
        return all(lo == hi for lo, hi in open_image(path).getextrema())
    except UnreadableImagesError:
        return False  # reported when it is decoded for training


def _split_keeping_copies(labels: np.ndarray, digests: list[str | None], test_fraction: float, seed: int, what: str,
                          class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`stratified_split` over distinct contents, each copy on the side of its first: no image in train and test.
    Without copies it is `stratified_split` itself, so the split is the one a data set without copies always had."""
    first: dict[str, int] = {}
    rep = np.array([first.setdefault(d, i) if d is not None else i for i, d in enumerate(digests)], dtype=np.int64)
    distinct = np.unique(rep)
    if len(distinct) == len(rep):
        return stratified_split(labels, test_fraction, seed, what, class_names)
    _, te = stratified_split(labels[distinct], test_fraction, seed, what, class_names)
    on_test = np.isin(rep, distinct[te])
    return np.flatnonzero(~on_test), np.flatnonzero(on_test)


def drop_test_copies(splits: DataSplits) -> DataSplits:
    """A re-split (``split="grouped"``) may put two copies of one image with different owner ids on both sides:
    those test items are left out (the model trained on them), recorded and warned about; the owners stay apart."""
    train_d = set(content_digests(splits.train)) - {None}
    test_d = content_digests(splits.test)
    drop = [i for i, d in enumerate(test_d) if d in train_d and not _blank(splits.test.source(i))]
    if not drop:
        return splits
    dropped = set(drop)
    keep = [i for i in range(len(test_d)) if i not in dropped]
    info = dict(splits.split_info)
    info["test_copies_of_train_dropped"] = [splits.test.source(i) for i in drop]
    warnings.warn(f"{len(drop)} test image(s) are byte-identical to training images after the re-split and are left "
                  f"out of the test split: {', '.join(info['test_copies_of_train_dropped'][:5])}", stacklevel=3)
    meta = splits.test_metadata
    return finish(DataSplits(
        name=splits.name, class_names=splits.class_names, train=splits.train, test=splits.test.subset(keep),
        train_metadata=splits.train_metadata, test_metadata=[meta[i] for i in keep] if meta else meta,
        split_info=info, privacy_unit=splits.privacy_unit, val=splits.val, val_metadata=splits.val_metadata))


def load_folder(data_dir, *, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    root = check_data_dir(data_dir, "folder")
    ignored: list[str] = []
    entries = _visible(root)
    dirs = [e for e in entries if _is_dir(e)]
    root_files = [e.name for e in entries if not _is_dir(e)]
    splits: dict[str, Path] = {}
    for d in dirs:
        role = SPLIT_NAMES.get(d.name.lower())
        if role in splits:
            raise DataError(f"{root} has two folders for the {role} split ({splits[role].name}/ and {d.name}/). "
                            "Fix: keep one")
        if role:
            splits[role] = Path(d.path)
    info: dict = {"root": str(root)}

    if splits:
        if "train" not in splits:
            raise DataError(f"{root} has {', '.join(sorted(p.name + '/' for p in splits.values()))} but no train/ "
                            "folder. Fix: add train/CLASS/ folders, or point --data-dir at a folder of class folders")
        ignored += [d.name + "/" for d in dirs if d.name.lower() not in SPLIT_NAMES]
        ignored += [f for f in root_files if is_image_file(f)]  # loose images beside train/ are not read
        train_classes = _scan_classes(splits["train"], root, ignored)
        where = "train/"
    else:
        _refuse_parent_folder(root, dirs)
        ignored += [f for f in root_files if is_image_file(f)]
        train_classes = _scan_classes(root, root, ignored)
        where = ""
    class_names = sorted(train_classes)
    if len(class_names) < 2:
        raise DataError(f"{root / where} has a single class folder {class_names}; a classifier needs at least two. "
                        "Fix: add a folder per class")
    train = _as_list(train_classes, class_names, root / where)

    val = val_classes = test_classes = None
    if "val" in splits:
        val_classes = _scan_classes(splits["val"], root, ignored)
        val = _as_list(val_classes, class_names, splits["val"])
    if "test" in splits:
        test_classes = _scan_classes(splits["test"], root, ignored)
    _refuse_aliased_folders(root, [(splits.get(role, root), classes) for role, classes in
                                   (("train", train_classes), ("val", val_classes), ("test", test_classes)) if classes])
    listed = [("train", train)] + ([("val", val)] if val is not None else [])
    if "test" in splits:
        test = _as_list(test_classes, class_names, splits["test"])
        listed.append(("test", test))
        info["method"] = "official folders"
        info["folders"] = sorted(f"{p.name}/" for p in splits.values())
    digests = _check_copies(root, listed, info)
    if "test" not in splits:
        tr, te = _split_keeping_copies(train.labels, digests[0], test_fraction, seed, f"folder {root}", class_names)
        train, test = train.subset(tr), train.subset(te)
        origin = "from train/" if splits else "from the class folders"
        info.update(method=f"stratified held-out {origin}, seed={seed}", seed=seed, test_fraction=test_fraction)
        if val is not None:
            info["folders"] = ["train/", f"{splits['val'].name}/"]

    missing = [c for c, k in zip(class_names, np.bincount(test.labels, minlength=len(class_names))) if k == 0]
    if missing:
        info["classes_missing_from_test"] = missing
        warnings.warn(f"test split of {root} has no images of class(es) {missing}; their accuracy cannot be measured",
                      stacklevel=3)
    info["ignored_files"] = ignored
    info["n_ignored_files"] = len(ignored)
    meta_path = root / METADATA_CSV
    if meta_path.is_file() and METADATA_CSV in ignored:
        ignored.remove(METADATA_CSV)  # read below, not ignored
        info["n_ignored_files"] = len(ignored)
    parts = [("train", train), ("test", test)] + ([("val", val)] if val is not None else [])
    metadata = {name: [{} for _ in range(len(lst))] for name, lst in parts}
    if meta_path.is_file():
        metadata, info["metadata"] = read_metadata_csv(meta_path, root, dict(parts))
    not_read = [f for f in root_files if not is_image_file(f) and f != METADATA_CSV]
    if not_read:
        info["root_files_not_read"] = not_read  # README, checksums, ...
    if ignored:
        shown = ", ".join(ignored[:5]) + (f", ... ({len(ignored) - 5} more)" if len(ignored) > 5 else "")
        warnings.warn(f"{len(ignored)} file(s)/folder(s) under {root} were not read as images: {shown}. "
                      f"Only {', '.join(IMAGE_EXTENSIONS)} files inside class folders are used; "
                      "the full list is in split_info['ignored_files']", stacklevel=3)
    return finish(DataSplits(
        name="folder", class_names=class_names, train=train, test=test,
        train_metadata=metadata["train"], test_metadata=metadata["test"],
        split_info=info, val=val, val_metadata=metadata.get("val"),
    ))


def _number(v: str) -> float | None:
    try:
        x = float(v)
    except ValueError:
        return None
    return None if math.isnan(x) else x


def _listing(items: list[str], k: int = 10) -> str:
    return ", ".join(items[:k]) + (f", ... ({len(items) - k} more)" if len(items) > k else "")


def read_metadata_csv(path: Path, root: Path, lists: dict[str, PathImageList]
                      ) -> tuple[dict[str, list[dict]], dict]:
    """One metadata dict per image of each split, from ROOT/metadata.csv (see the module docstring)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or []) if c and c.strip()]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k and k.strip()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} cannot be read as a CSV file ({type(e).__name__}: {e}). "
                        "Fix: save it as UTF-8 CSV with a header row") from e
    key = next((c for c in KEY_COLUMNS if c in fields), None)
    if key is None:
        raise DataError(f"{path} has no column naming the image (columns: {fields}). Fix: add a 'path' column "
                        "with each image's path relative to the data folder, e.g. train/mel/img_001.jpg")
    columns = [c for c in fields if c != key]
    if not columns:
        raise DataError(f"{path} has only the {key!r} column. Fix: add metadata columns (e.g. sex, age)")
    rel = {name: [Path(p).relative_to(root).as_posix() for p in lst.paths] for name, lst in lists.items()}
    all_rel = [r for rs in rel.values() for r in rs]
    by_name: dict[str, list[str]] = {}
    for r in all_rel:
        by_name.setdefault(r.rsplit("/", 1)[-1], []).append(r)
    known = set(all_rel)
    table: dict[str, dict[str, str]] = {}
    unknown, ambiguous, duplicate, empty_key = [], [], [], 0
    for row in rows:
        k = row.get(key, "").replace("\\", "/")
        k = k.removeprefix("./")
        if not k:
            empty_key += 1
            continue
        if k not in known:
            hits = by_name.get(k, [])
            if len(hits) > 1:
                ambiguous.append(k)
                continue
            if not hits:
                unknown.append(k)
                continue
            k = hits[0]
        if k in table:
            duplicate.append(k)
        table[k] = row
    problems = []
    if empty_key:
        problems.append(f"{empty_key} row(s) with an empty {key!r}")
    if unknown:
        problems.append(f"{len(unknown)} row(s) name files that are not images of the data set: {_listing(unknown)}")
    if ambiguous:
        problems.append(f"{len(ambiguous)} bare file name(s) match several images (give the relative path): "
                        f"{_listing(ambiguous)}")
    if duplicate:
        problems.append(f"{len(duplicate)} image(s) have more than one row: {_listing(duplicate)}")
    missing = [r for r in all_rel if r not in table]
    if missing:
        problems.append(f"{len(missing)} of {len(all_rel)} image(s) have no row: {_listing(missing)}")
    if problems:
        raise DataError(f"{path} does not match the images under {root}: " + "; ".join(problems) + ". Fix: one row "
                        f"per image, keyed by its path relative to {root} (column {key!r}); leave a cell empty "
                        f"where a value is unknown, or remove {METADATA_CSV} to train without metadata")
    numeric = [c for c in columns
               if any(table[r].get(c) for r in all_rel) and all(_number(table[r][c]) is not None
                                                                 for r in all_rel if table[r].get(c))]

    def value(row: dict[str, str], c: str):
        v = row.get(c) or None
        return _number(v) if v is not None and c in numeric else v

    out = {name: [{c: value(table[r], c) for c in columns} for r in rs] for name, rs in rel.items()}
    return out, {"file": str(path), "key": key, "columns": columns, "numeric_columns": numeric}


def _refuse_parent_folder(root: Path, dirs: list[os.DirEntry]) -> None:
    """A zip often unpacks to ROOT/chest_xray/train/...: reading that as one class would be silently wrong."""
    for d in dirs:
        inner = {e.name.lower() for e in _visible(Path(d.path)) if _is_dir(e)}
        if inner & {"train", "test"}:
            raise ConfigError("data_dir", f"{root} is a parent folder: the data set is in {d.path} (it holds "
                              f"{'/, '.join(sorted(inner & {'train', 'test'}))}/)", f"pass --data-dir {d.path}")
