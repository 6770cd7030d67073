"""The data-set interface and registry.

A data set is ``fn(data_dir: str, img_size: int) -> (train_dataset, val_dataset, num_classes)``
whose items are ``(image: float tensor [3, img_size, img_size], label: int)``. A builder may
declare ``num_classes`` up front (``DATASET_REGISTRY.register("name", num_classes=10)``), which
lets ``--dry-run`` build the model without reading any data.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from torch.utils.data import Dataset

from codeq.errors import RegistrationError
from codeq.registry import Registry


class DatasetPair(NamedTuple):
    """What a data set builder returns: training and validation sets and the number of classes."""

    train: Dataset
    val: Dataset
    num_classes: int


def check_dataset(name: str, builder: Any) -> None:
    parameters = list(inspect.signature(builder).parameters) if callable(builder) else []
    if parameters[:2] != ["data_dir", "img_size"]:
        raise RegistrationError("data set", name, "does not take (data_dir, img_size)",
                                "a data set is fn(data_dir: str, img_size: int) -> (train, val, num_classes)")


DATASET_REGISTRY: Registry[Callable[..., DatasetPair]] = Registry("data set", check=check_dataset)


def declared_classes(name: str) -> int | None:
    """The number of classes data set ``name`` declares without loading, or None."""
    return getattr(DATASET_REGISTRY[name], "num_classes", None)


def load_dataset(name: str, data_dir: str, img_size: int) -> DatasetPair:
    """Data set ``name`` built from ``data_dir`` at ``img_size``.

    Raises:
        ValueError: the builder returned something other than (train, val, num_classes), or a number of classes
            other than the one it declares.
        OSError, RuntimeError: the builder's own errors for missing or unreadable files.
    """
    result = DATASET_REGISTRY[name](data_dir, img_size)
    if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[2], int)):
        raise ValueError(f"data set {name!r} returned {type(result).__name__}, not (train, val, num_classes)")
    pair = DatasetPair(*result)
    declared = declared_classes(name)
    if declared is not None and declared != pair.num_classes:
        raise ValueError(f"data set {name!r} declares {declared} classes but returned {pair.num_classes}")
    return pair
