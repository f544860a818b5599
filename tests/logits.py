"""Test helpers: whole-model logits of small models, and their comparison (the workbench itself compares
models through the layer runner's per-position statistics, workbench/quality.py, never holding logits)."""

from __future__ import annotations

import torch


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Compare logits of shape [..., vocab] computed on the same input tokens.

    max_rel_error: max |ref - cand| over all logits, divided by max |ref| (a scale-free worst case).
    top1_agreement: fraction of positions whose argmax token is the same.
    mean_kl: mean KL(ref || cand) of the next-token distributions, in nats.
    """
    ref = reference.double().reshape(-1, reference.shape[-1])
    cand = candidate.double().reshape(-1, candidate.shape[-1])
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    return {
        "max_rel_error": float((ref - cand).abs().max() / ref.abs().max().clamp_min(1e-30)),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).double().mean()),
        "mean_kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
    }


@torch.inference_mode()
def model_logits(model, blocks: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Logits of a transformers/peft causal LM on token blocks, in float32 (tests compare small models)."""
    model.eval()
    return torch.cat([model(input_ids=b).logits.float() for b in blocks.split(batch)])
