"""The registry path plugins were documented with: ``from src.data import DATASET_REGISTRY``. Every name here is
``codeq``'s own object (``codeq.data``), not a copy."""
from codeq.data import DATASET_REGISTRY, DatasetPair, declared_classes, load_dataset
from codeq.data.datasets import CIFAR10, CIFAR100, cifar10, cifar100, digits
from codeq.data.loaders import ResumableSampler, StridedBatchSampler, build_loaders

__all__ = ["CIFAR10", "CIFAR100", "DATASET_REGISTRY", "DatasetPair", "ResumableSampler", "StridedBatchSampler",
           "build_loaders", "cifar10", "cifar100", "declared_classes", "digits", "load_dataset"]
