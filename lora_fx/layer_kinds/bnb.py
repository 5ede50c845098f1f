"""bitsandbytes quantized linears (QLoRA): `Linear4bit` (nf4, fp4) and `Linear8bitLt`.

The base op is the library's own and takes many forms in a graph: an `autograd.Function`
(Dynamo's `autograd_function_apply` higher-order op) while gradients flow, `bitsandbytes::gemm_4bit`
or `gemv_4bit` (weights repacked for the CPU) without them, a dequantize-then-`linear` for 8-bit
training on the CPU. lora_fx reads none of them: a quantized layer is a *module boundary* site.
The adapter reads the module's input and is added to its output, which is exactly what PEFT's
bitsandbytes layers compute (`result = base_layer(x); result + lora_B(lora_A(dropout(x))) *
scaling`, the adapter's output rounded to the result's dtype first). So every quantization
detail (compute dtype, nested statistics, CPU packing) stays the base layer's business.

Adapters are fp32, as PEFT's (made in the default dtype; its cast to the base weight's dtype skips
integer weights). Merging into a quantized weight is refused (see `merge_blocker`).
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from .base import LayerKind

# The 4-bit data types bitsandbytes quantizes to; a layer reporting another is refused by name.
QUANT_TYPES_4BIT = ("nf4", "fp4")

_MERGE_REFUSAL = (
    "its base weight is quantized ({bits}); merging would dequantize, add the adapter and quantize again, "
    "rounding the sum to the quantization grid (the merged layer would not compute what the adapter was "
    "trained to). lora_fx refuses instead: load the base model unquantized (e.g. torch_dtype=torch.bfloat16), "
    "load this adapter into it, and merge there")


class QuantizedLinearKind(LayerKind):
    """Common to bitsandbytes' linears: a module-boundary site of a linear layer."""

    linear_family = True  # PEFT's "all-linear" takes them (they subclass nn.Linear)
    module_boundary = True
    rounds_delta_first = True
    bits = ""

    def parse(self, node):
        return None  # never an op site: found by its module call (find_targets.boundary_sites)

    def describe_module(self, module):
        return dict(in_features=module.in_features, out_features=module.out_features,
                    weight_dtype=torch.float32)

    def check(self, layer, r, cfg):
        if cfg.use_dora:
            return (f"DoRA on a quantized base ({self.bits}, class {layer.class_name}) is not supported yet: it "
                    "needs the dequantized weight's column norms")
        return None

    def merge_blocker(self, layer):
        return _MERGE_REFUSAL.format(bits=self.bits)

    def apply_base(self, b, layer, x, weight):
        raise NotImplementedError(f"{self.name}: the base op is the quantized module's own")


def _gemm_4bit_twin():
    from ..kernels import ops  # noqa: F401  (registers lora_fx::gemm_4bit)

    return torch.ops.lora_fx.gemm_4bit.default


class Linear4bitKind(QuantizedLinearKind):
    name = "linear4bit"
    module_classes = ("bitsandbytes.nn.modules.Linear4bit",)
    bits = "bitsandbytes 4-bit"
    # bitsandbytes calls its bare 4-bit op when the input does not require grad, as it never does
    # while Dynamo traces the frozen base; the twin adds the input's gradient.
    gradient_twins = MappingProxyType({"bitsandbytes::gemm_4bit": _gemm_4bit_twin})
    gradientless_ops = MappingProxyType({"bitsandbytes::gemv_4bit": (
        "bitsandbytes repacked its 4-bit weight for CPU inference (on the first eval call whose input needs no "
        "gradient, on AVX512-BF16 CPUs), and the packed matmul has no gradient: the adapters before it would get a "
        "wrong one. Run inference under torch.no_grad(); to train, load the model again (the repacking is one-way)")})

    def describe_module(self, module):
        info = super().describe_module(module)
        state = getattr(module.weight, "quant_state", None)
        quant_type = getattr(state, "quant_type", None) or getattr(module.weight, "quant_type", None)
        if quant_type not in QUANT_TYPES_4BIT:
            info["unsupported"] = (f"its 4-bit quant type is {quant_type!r}; lora_fx supports bitsandbytes' "
                                   f"{' and '.join(QUANT_TYPES_4BIT)}")
        return info


_INT8_NO_GRADIENT = (
    "bitsandbytes' 8-bit inference kernels (MatMul8bitLt: int8 quantization of the input, int8 matmul) were traced "
    "without a gradient, as they are whenever the frozen base runs them: the adapters before this layer would get "
    "a wrong one. lora_fx trains through 8-bit layers only on bitsandbytes' CPU training path (model.train() on "
    "the CPU); run inference under torch.no_grad(), or train on a 4-bit base")


class Linear8bitKind(QuantizedLinearKind):
    name = "linear8bit"
    module_classes = ("bitsandbytes.nn.modules.Linear8bitLt",)
    bits = "bitsandbytes 8-bit"
    # bitsandbytes' CUDA path (training included) and its CPU eval path quantize the input and run
    # an int8 matmul, with no autograd formula once Dynamo inlines them; no twin yet, so refused.
    gradientless_ops = MappingProxyType({op: _INT8_NO_GRADIENT for op in (
        "bitsandbytes::int8_vectorwise_quant", "bitsandbytes::int8_double_quant", "bitsandbytes::int8_scaled_mm",
        "bitsandbytes::int8_mixed_scaled_mm", "bitsandbytes::int8_linear_matmul")})
