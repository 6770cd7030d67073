"""The seed's path to the quantization building blocks: ``from src.utils_quantization import UniformSymmetric``
(and ``attach_weight_quantizers``, ``toggle_quantization``, the straight-through estimators, ...) keeps working from a
checkout. Every name here is ``codeq``'s own object (``codeq.attach``, ``codeq.quantizers``), not a copy."""
from codeq.attach import (
    REGEX_PREFIX,
    FakeQuantParametrization,
    attach_weight_quantizers,
    excluded,
    fake_quantization,
    latent_weight,
    owns_weight,
    percentiles_selected_together,
    quantized_layers,
    quantizer_of,
    toggle_quantization,
    weights_quantized_once,
)
from codeq.quantizers.percentile import robust_absmaxes
from codeq.quantizers.ste import clamp_ste, levels, relu_ste, round_ste
from codeq.quantizers.uniform import UniformSymmetric

__all__ = ["REGEX_PREFIX", "FakeQuantParametrization", "UniformSymmetric", "attach_weight_quantizers", "clamp_ste",
           "excluded", "fake_quantization", "latent_weight", "levels", "owns_weight", "percentiles_selected_together",
           "quantized_layers", "quantizer_of", "relu_ste", "robust_absmaxes", "round_ste", "toggle_quantization",
           "weights_quantized_once"]
