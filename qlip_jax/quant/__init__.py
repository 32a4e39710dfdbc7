"""The quantization core every layer uses: fake quantization with traced bit widths, quantized layers,
quantizer state, registry and BitOPs. The methods that run the model to fit it are in :mod:`qlip_jax.ptq`."""

from qlip_jax.quant.fake_quant import fake_quant, fake_quant_or_float, round_ste
from qlip_jax.quant.layers import QConv, QDense, QMatmul
from qlip_jax.quant.registry import (LayerInfo, Registry, average_act_bits, bitops, build_registry,
                                     init_quant_state, uniform_schedule)
from qlip_jax.quant.state import QuantArgs, QuantConfig, QuantSetup, check_indices

__all__ = ["fake_quant", "fake_quant_or_float", "round_ste", "QConv", "QDense", "QMatmul", "LayerInfo",
           "Registry", "average_act_bits", "bitops", "build_registry", "init_quant_state", "uniform_schedule",
           "QuantArgs", "QuantConfig", "QuantSetup", "check_indices"]
