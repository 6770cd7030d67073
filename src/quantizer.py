"""The seed's path to CoDeQ's quantizer: ``from src.quantizer import DeadZoneLDZCompander`` keeps working from a
checkout. Every name here is ``codeq``'s own object (``codeq.quantizers``), not a copy."""
from codeq.quantizers import QUANTIZER_REGISTRY, DeadZoneLDZCompander, Quantizer, check_quantizer
from codeq.quantizers.base import BIT_WIDTH_NAMES, distinct_value_bits, layer_readout, nominal_bits
from codeq.quantizers.deadzone import check_nonzero_logit
from codeq.quantizers.percentile import robust_absmax
from codeq.quantizers.ste import clamp_ste, levels, relu_ste, round_ste
from codeq.quantizers.uniform import UniformSymmetric

__all__ = ["BIT_WIDTH_NAMES", "QUANTIZER_REGISTRY", "DeadZoneLDZCompander", "Quantizer", "UniformSymmetric",
           "check_nonzero_logit", "check_quantizer", "clamp_ste", "distinct_value_bits", "layer_readout", "levels",
           "nominal_bits", "relu_ste", "robust_absmax", "round_ste"]
