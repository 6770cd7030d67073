"""Data held on the device and augmented there, and the step options amp / channels_last, on CPU."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler

from codeq.data.base import DatasetPair
from codeq.data.datasets import CIFAR10_MEAN, CIFAR10_STD
from codeq.data.loaders import ResumableSampler
from codeq.data.on_device import DeviceLoader, cifar_on_device, device_loaders, random_crop, random_flip
from codeq.training.step_settings import StepSettings
from conftest import quick_config, write_config

# The device-side pipeline on every device present (the GPU one where CUDA exists).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class FakeCifar(torch.utils.data.Dataset):
    """What cifar10() hands over: uint8 images [N, 32, 32, 3] and a list of labels."""

    def __init__(self, count: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(1, 256, (count, 32, 32, 3), dtype=np.uint8)  # no zeros: padding is visible
        self.labels = [int(label) for label in rng.integers(0, 10, count)]

    def __len__(self) -> int:
        return len(self.labels)


def shift_of(crop: torch.Tensor, image: torch.Tensor, padding: int = 4) -> tuple[int, int] | None:
    """The (dy, dx) with crop == image shifted by it (zeros where the shift exposes padding), if any."""
    padded = F.pad(image, (padding,) * 4)
    size = image.shape[-1]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            if torch.equal(padded[:, dy: dy + size, dx: dx + size], crop):
                return dy - padding, dx - padding
    return None


def test_random_crop_shifts_each_image_with_zero_padding():
    images = torch.rand(64, 3, 32, 32) + 0.5
    crops = random_crop(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == images.shape
    shifts = [shift_of(crop, image) for crop, image in zip(crops, images)]
    assert all(shift is not None for shift in shifts)
    assert len(set(shifts)) > 20  # 81 possible offsets, drawn per image
    assert any(dy != 0 and dx != 0 for dy, dx in shifts)
    assert all(-4 <= dy <= 4 and -4 <= dx <= 4 for dy, dx in shifts)


def test_random_flip_mirrors_about_half():
    images = torch.rand(200, 3, 8, 8)
    flipped = random_flip(images, torch.Generator().manual_seed(1))
    mirrored = torch.tensor([torch.equal(out, image.flip(2)) for out, image in zip(flipped, images)])
    kept = torch.tensor([torch.equal(out, image) for out, image in zip(flipped, images)])
    assert (mirrored ^ kept).all()
    assert 60 < int(mirrored.sum()) < 140


def test_augmentation_is_deterministic_per_generator_seed():
    images = torch.rand(16, 3, 32, 32)
    first = random_flip(random_crop(images, 4, torch.Generator().manual_seed(5)), torch.Generator().manual_seed(6))
    again = random_flip(random_crop(images, 4, torch.Generator().manual_seed(5)), torch.Generator().manual_seed(6))
    other = random_flip(random_crop(images, 4, torch.Generator().manual_seed(7)), torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)


def normalized(images: np.ndarray) -> torch.Tensor:
    """torchvision's ToTensor + Normalize of uint8 NHWC images."""
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (tensor - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_loaders_follow_the_sampler_and_normalise_like_torchvision(device):
    pair = DatasetPair(FakeCifar(50, 0), FakeCifar(20, 1), 10)
    train, val = device_loaders("cifar10", pair, 32, 8, torch.device(device), seed=3)
    train.sampler.set_epoch(2)
    expected_order = epoch_order(pair.train, 2, 3)
    assert len(train) == len(expected_order) == 7
    for (inputs, labels), indices in zip(train, expected_order, strict=True):
        assert inputs.shape == (len(indices), 3, 32, 32) and inputs.dtype == torch.float32
        assert labels.tolist() == [pair.train.labels[i] for i in indices]
    batches = list(val)
    assert [len(labels) for _, labels in batches] == [8, 8, 4]
    assert {inputs.device.type for inputs, _ in batches} == {device}
    torch.testing.assert_close(torch.cat([inputs for inputs, _ in batches]).cpu(), normalized(pair.val.images))
    torch.testing.assert_close(val.dataset[3][0].cpu(), normalized(pair.val.images[3:4])[0])


def epoch_order(dataset, epoch: int, seed: int, batch_size: int = 8) -> list[list[int]]:
    sampler = ResumableSampler(dataset, 1, 0, seed=seed)
    sampler.set_epoch(epoch)
    return list(BatchSampler(sampler, batch_size, drop_last=False))


@pytest.mark.parametrize("device", DEVICES)
def test_training_batches_are_augmented_crops_of_the_right_images(device):
    pair = DatasetPair(FakeCifar(16, 0), FakeCifar(4, 1), 10)
    train, _ = device_loaders("cifar10", pair, 32, 16, torch.device(device), seed=0)
    train.sampler.set_epoch(0)
    (inputs, _), = list(train)
    assert inputs.device.type == device
    inputs = inputs.cpu()
    indices = epoch_order(pair.train, 0, 0, batch_size=16)[0]
    plain = normalized(pair.train.images[indices])
    padding_value = normalized(np.zeros((1, 1, 1, 3), dtype=np.uint8))[0, :, 0, 0]
    moved = 0
    for out, image in zip(inputs, plain):
        # Undo the normalisation's offset so that padding is zero again, then find the shift (or its mirror).
        centered = out - padding_value.view(3, 1, 1)
        base = image - padding_value.view(3, 1, 1)
        shift = shift_of_close(centered, base)
        assert shift is not None
        moved += shift != (0, 0, False)
    assert len(inputs) == 16 and moved >= 12


def shift_of_close(crop: torch.Tensor, image: torch.Tensor) -> tuple[int, int, bool] | None:
    padded = F.pad(image, (4,) * 4)
    for flip in (False, True):
        candidate = crop.flip(2) if flip else crop
        for dy in range(9):
            for dx in range(9):
                if torch.allclose(padded[:, dy: dy + 32, dx: dx + 32], candidate, atol=1e-5):
                    return dy - 4, dx - 4, flip
    return None


def test_resumed_epoch_draws_the_same_batches():
    pair = DatasetPair(FakeCifar(40, 0), FakeCifar(4, 1), 10)
    whole, _ = device_loaders("cifar10", pair, 32, 8, torch.device("cpu"), seed=9)
    whole.sampler.set_epoch(1)
    full = list(whole)
    resumed, _ = device_loaders("cifar10", pair, 32, 8, torch.device("cpu"), seed=9)
    resumed.sampler.set_epoch(1, start=2 * 8)
    tail = list(resumed)
    assert len(tail) == len(full) - 2
    for (a, la), (b, lb) in zip(full[2:], tail):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_resize_on_device():
    data = cifar_on_device(FakeCifar(4, 0), 48, torch.device("cpu"), augment=True)
    loader = DeviceLoader(data, [[0, 1, 2]], None, seed=0)
    (inputs, labels), = list(loader)
    assert inputs.shape == (3, 3, 48, 48) and labels.shape == (3,)


def test_step_settings_reject_unknown_amp():
    with pytest.raises(ValueError, match="amp"):
        StepSettings("cpu", "fp8")


def test_channels_last_reaches_model_and_batches():
    settings = StepSettings("cpu", None, channels_last=True)
    model = settings.prepare_model(torch.nn.Conv2d(3, 4, 3))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    assert settings.inputs(torch.rand(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    assert settings.inputs(torch.rand(2, 5)).shape == (2, 5)


def test_fp16_steps_go_through_the_grad_scaler():
    from codeq.training.loop import train

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    settings = StepSettings("cpu", "fp16")
    batches = [(torch.randn(4, 12), torch.randint(0, 3, (4,))) for _ in range(3)]
    before = model[1].weight.detach().clone()
    train(batches, model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), 1, "cpu",
          step_settings=settings)
    assert settings.scaler is not None and settings.scaler.get_scale() > 0
    assert not torch.equal(before, model[1].weight) and model[1].weight.dtype == torch.float32


def test_training_runs_with_bf16_channels_last_and_data_on_device(tmp_path):
    from codeq.app.cli import main

    config = quick_config(tmp_path, amp="bf16", channels_last=True, data_on_device=True, img_size=8)
    assert main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    lines = next((tmp_path / "runs").rglob("metrics.jsonl")).read_text().splitlines()
    assert len(lines) == 1 and '"val_acc"' in lines[0]
