"""Image folders: ``dataset: imagefolder`` (any data set in torchvision's ImageFolder layout) and ``dataset: imagenet``
(ILSVRC-2012 in that layout, 1000 classes).

``data_dir`` holds ``train/`` and ``val/``, each with one folder per class (sub-folders allowed) of images in
any format PIL reads. Classes are the ``train/`` folder names in sorted order (torchvision's, so the indices of
ImageNet's sorted synset folders are those of torchvision's and timm's ImageNet heads); ``val/`` may hold fewer
classes but none that ``train/`` lacks. Training images get ``RandomResizedCrop(img_size)`` and a horizontal flip,
validation images ``Resize(round(img_size / 0.875))`` and ``CenterCrop(img_size)``; both are normalised with
ImageNet's mean and standard deviation.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from codeq.data.base import DATASET_REGISTRY, DatasetPair
from codeq.errors import DataError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CLASSES = 1000
# Validation resizes to img_size / CROP_FRACTION and crops the centre img_size: 256 -> 224, the usual ImageNet test.
CROP_FRACTION = 0.875
SPLITS = ("train", "val")
# A split of at most this many files has each file's header read when it loads, so an unreadable file stops the run
# before it starts (about a second); larger ones (ImageNet's 1.28 M) are checked as their images are read.
HEADER_CHECK_LIMIT = 20_000
LAYOUT = "train/ and val/, each with one folder per class"


def image_extensions() -> frozenset[str]:
    """The file extensions PIL reads (lower case, with the dot)."""
    from PIL import Image

    Image.init()
    return frozenset(extension.lower() for extension in Image.registered_extensions())


def read_image(path: str, header_only: bool = False) -> object:
    """The image at ``path`` as an RGB PIL image; with ``header_only`` only its header is read (None returned).

    Raises:
        DataError: PIL cannot read it (the message names the file).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            return None if header_only else image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path} ({type(error).__name__}: {error}); delete or replace it") from None


def class_folders(split: Path) -> list[str]:
    """The class folder names of ``split``, sorted.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: it holds no class folders (images directly in it are named as such).
    """
    if not split.is_dir():
        raise FileNotFoundError(f"no {split.name}/ folder at {split} (an image folder holds {LAYOUT})")
    entries = [entry for entry in os.scandir(split) if not entry.name.startswith(".")]
    classes = sorted(entry.name for entry in entries if entry.is_dir())
    if not classes:
        loose = sum(entry.is_file() for entry in entries)
        found = f"{loose} files but no class folders" if loose else "no class folders"
        raise ValueError(f"{split} holds {found}; sort its images into one folder per class (README, ImageNet)")
    return classes


def class_images(folder: Path, extensions: frozenset[str]) -> list[str]:
    """The image files under class folder ``folder`` (sub-folders included), sorted; hidden files are skipped.

    Raises:
        ValueError: it holds no image file.
    """
    files = sorted(os.path.join(directory, name) for directory, _, names in os.walk(folder, followlinks=True)
                   for name in names if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions)
    if not files:
        raise ValueError(f"class folder {folder} holds no images (files PIL reads, e.g. .jpg or .png)")
    return files


class ImageFolderSplit(Dataset):
    """One split of an image folder: ``(transform(image), class index)`` per file, read when accessed.

    Args:
        split: the split's folder (``data_dir/train``).
        classes: every class name, in index order; the split may lack some.
        transform: PIL image -> float tensor [3, img_size, img_size].

    Raises:
        FileNotFoundError, ValueError: the folder is missing, holds no class folders, a class folder holds no image,
            or it has a class folder ``classes`` lacks.
        DataError: a file PIL does not recognise (only for splits of at most HEADER_CHECK_LIMIT files).
    """

    def __init__(self, split: Path, classes: list[str], transform: Callable) -> None:
        present = class_folders(split)
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise ValueError(f"{split} has class folders that train/ lacks: {', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''}")
        if len(present) < len(classes):
            log.warning("%s has images of %d of the %d classes", split, len(present), len(classes))
        extensions = image_extensions()
        index = {name: number for number, name in enumerate(classes)}
        self.samples = [(path, index[name]) for name in present for path in class_images(split / name, extensions)]
        self.classes, self.transform = classes, transform
        if len(self.samples) <= HEADER_CHECK_LIMIT:
            for path, _ in self.samples:
                read_image(path, header_only=True)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(read_image(path)), label


def transforms_for(img_size: int) -> tuple[Callable, Callable]:
    """The training and validation transforms of ImageNet-style data at ``img_size``."""
    from torchvision import transforms

    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = transforms.Compose([transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip(), *normalize])
    val = transforms.Compose([transforms.Resize(round(img_size / CROP_FRACTION)), transforms.CenterCrop(img_size),
                              *normalize])
    return train, val


@DATASET_REGISTRY.register("imagefolder")
def image_folder(data_dir: str, img_size: int) -> DatasetPair:
    """``data_dir/train`` and ``data_dir/val`` in torchvision's ImageFolder layout; the classes are train/'s folders."""
    root = Path(data_dir)
    classes = class_folders(root / SPLITS[0])
    train_transform, val_transform = transforms_for(img_size)
    return DatasetPair(ImageFolderSplit(root / SPLITS[0], classes, train_transform),
                       ImageFolderSplit(root / SPLITS[1], classes, val_transform), len(classes))


@DATASET_REGISTRY.register("imagenet", num_classes=IMAGENET_CLASSES)
def imagenet(data_dir: str, img_size: int) -> DatasetPair:
    """ILSVRC-2012 as ``data_dir/train/<synset>/*.JPEG`` and ``data_dir/val/<synset>/*.JPEG`` (README: ImageNet)."""
    classes = class_folders(Path(data_dir) / SPLITS[0])
    if len(classes) != IMAGENET_CLASSES:
        raise ValueError(f"ImageNet's train/ under {data_dir} has {len(classes)} class folders, not "
                         f"{IMAGENET_CLASSES} (one per synset, n01440764 ... n15075141); use dataset: imagefolder "
                         f"for other data")
    return image_folder(data_dir, img_size)
