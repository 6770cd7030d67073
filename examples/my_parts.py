"""A complete CoDeQ-train plugin: one quantizer, one model, one loss term and one data set.

Use it from any config with ``plugins: [examples/my_parts.py]``; nothing in the project changes.
"""
import torch
from torch import nn
from torch.utils.data import TensorDataset

from codeq import LOSS_REGISTRY, MODEL_REGISTRY, QUANTIZER_REGISTRY
from codeq.attach import latent_weight
from codeq.data import DATASET_REGISTRY
from codeq.quantizers.ste import round_ste


@QUANTIZER_REGISTRY.register("pow2")
class PowerOfTwo(nn.Module):
    """Weights rounded to signed powers of two below max|w|, the smallest ``2^levels``-fold range kept, the rest
    zero. Only ``__init__`` and ``forward`` are written: reports read its bit-width from its distinct values and
    exports store a codebook."""

    def __init__(self, levels: int = 7) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        self.levels = levels

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        top = torch.log2(weight.detach().abs().max().clamp_min(1e-30)).floor()
        exponent = round_ste(torch.log2(weight.abs().clamp_min(1e-30)))
        kept = (exponent.detach() > top - self.levels) & (weight != 0)
        # The value passes gradients to the weight straight through; only the rounding of the exponent is skipped.
        value = weight + (torch.sign(weight) * 2 ** exponent.clamp(max=top) - weight).detach()
        return torch.where(kept, value, torch.zeros_like(weight))


@MODEL_REGISTRY.register("tiny_cnn")
def tiny_cnn(num_classes: int, img_size: int, width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, num_classes),
    )


@LOSS_REGISTRY.register("l1")
def l1(model: nn.Module, scale: float = 1.0) -> torch.Tensor:
    """scale * mean |w| over the weights of every Conv2d and Linear. A quantized layer's ``weight`` is computed from
    its latent weight and is no parameter, so the term reads ``latent_weight(module)``, which trains either way."""
    weights = [latent_weight(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return scale * sum(w.abs().mean() for w in weights) / len(weights)


@DATASET_REGISTRY.register("blobs")
def blobs(data_dir: str, img_size: int) -> tuple[TensorDataset, TensorDataset, int]:
    """Four classes of noisy constant colour images, made up on the spot (``data_dir`` is not read)."""
    generator = torch.Generator().manual_seed(0)
    colours = torch.randn(4, 3, 1, 1, generator=generator)

    def split(count: int) -> TensorDataset:
        labels = torch.randint(0, 4, (count,), generator=generator)
        images = colours[labels] + 0.8 * torch.randn(count, 3, img_size, img_size, generator=generator)
        return TensorDataset(images, labels)

    return split(256), split(128), 4
