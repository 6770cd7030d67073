"""Weight quantizers: the interface they fit, their registry, CoDeQ's dead-zone quantizer and the uniform baseline.

``QUANTIZER_REGISTRY`` maps the names a config (or ``codeq.prepare``) uses to quantizer classes and checks each
class when it is added (``check_quantizer``); plugins add their own.
"""
from __future__ import annotations

from torch import nn

from codeq.quantizers.base import Quantizer, check_quantizer, layer_readout, nominal_bits
from codeq.quantizers.deadzone import DeadZoneLDZCompander
from codeq.quantizers.uniform import UniformSymmetric
from codeq.registry import Registry

QUANTIZER_REGISTRY: Registry[type[nn.Module]] = Registry(
    "quantizer", {"uniform": UniformSymmetric, "deadzone": DeadZoneLDZCompander}, check=check_quantizer)

__all__ = ["QUANTIZER_REGISTRY", "DeadZoneLDZCompander", "Quantizer", "UniformSymmetric", "check_quantizer",
           "layer_readout", "nominal_bits"]
