"""All `lora_fx::` operator schemas live in this module.

None yet: plain LoRA lowers to aten ops that Inductor already fuses. The DoRA compose and the
block-diagonal LoRA matmul (their issues) register here, each with a Triton kernel, a pure-torch
reference, a CPU kernel, a fake impl, autograd, and an opcheck test.
"""
