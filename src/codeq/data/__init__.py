"""Data sets and their loaders: the registry (``DATASET_REGISTRY``), CIFAR-10/100, scikit-learn's digits and image
folders (ImageFolder layout, ImageNet), and the loaders a training run uses (``codeq.data.loaders``)."""
from __future__ import annotations

from codeq.data import datasets, image_folders  # noqa: F401 (importing them registers their data sets)
from codeq.data.base import DATASET_REGISTRY, DatasetPair, declared_classes, load_dataset

__all__ = ["DATASET_REGISTRY", "DatasetPair", "declared_classes", "load_dataset"]
