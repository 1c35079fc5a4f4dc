"""CIFAR-10 through torchvision (a standard, non-medical baseline), cached under ~/.cache/dpcore/cifar10."""
from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dpcore.errors import OfflineError
from dpcore.data.base import DataSplits
from dpcore.data.images import ArrayImageList
from dpcore.data.split import finish

DEFAULT_CACHE = Path("~/.cache/dpcore/cifar10")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


@contextmanager
def _socket_timeout(seconds: float):
    """torchvision's downloader sets no timeout; without one a dead network can hang a run for minutes."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _torchvision_cifar(root: Path, train: bool):
    from torchvision.datasets import CIFAR10

    try:
        return CIFAR10(root=str(root), train=train, download=False)  # already cached: no network touched
    except RuntimeError:
        pass
    try:
        with _socket_timeout(15):
            return CIFAR10(root=str(root), train=train, download=True)
    except Exception as e:
        raise OfflineError(
            f"CIFAR-10 is not in {root} and could not be downloaded from {URL} ({type(e).__name__}: {e}). "
            f"Fix: on a machine with internet, download that file and unpack it so that {root}/cifar-10-batches-py/ "
            "exists (or copy that folder there), or pass --cache-dir pointing to a folder that holds it") from e


def load_cifar10(*, cache_dir=None) -> DataSplits:
    root = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE.expanduser()
    tr, te = _torchvision_cifar(root, True), _torchvision_cifar(root, False)
    train = ArrayImageList(np.asarray(tr.data), np.asarray(tr.targets), "cifar10:train")
    test = ArrayImageList(np.asarray(te.data), np.asarray(te.targets), "cifar10:test")
    return finish(DataSplits(
        name="cifar10", class_names=list(tr.classes), train=train, test=test,
        train_metadata=[{} for _ in range(len(train))], test_metadata=[{} for _ in range(len(test))],
        split_info={"method": "official CIFAR-10 train/test split", "root": str(root)},
    ))
