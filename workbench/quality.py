"""Numbers against the source model: next-token logits of two models on the same tokens."""

from __future__ import annotations

import math

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
    """Logits of a transformers/peft causal LM on token blocks, in float32."""
    model.eval()
    return torch.cat([model(input_ids=b).logits.float() for b in blocks.split(batch)])


@torch.inference_mode()
def compare_with_reference(reference_logits: torch.Tensor, candidate, blocks: torch.Tensor, batch: int = 2) -> dict[str, float]:
    """A model against stored reference logits on the same token blocks, batch by batch (memory: the stored
    float32 logits and a few batches, not every logit in float64 at once): perplexity of both, mean
    KL(reference || candidate), top-1 agreement, max relative error."""
    candidate.eval()
    sums = {"kl": 0.0, "top1": 0, "nll_ref": 0.0, "nll_cand": 0.0, "max_diff": 0.0, "max_ref": 0.0}
    for start in range(0, blocks.shape[0], batch):
        chunk = blocks[start:start + batch]
        ref = reference_logits[start:start + batch].double()
        cand = candidate(input_ids=chunk).logits.double()
        log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
        sums["kl"] += float((log_p.exp() * (log_p - log_q)).sum())
        sums["top1"] += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        target = chunk[:, 1:, None]
        sums["nll_ref"] -= float(log_p[:, :-1].gather(-1, target).sum())
        sums["nll_cand"] -= float(log_q[:, :-1].gather(-1, target).sum())
        sums["max_diff"] = max(sums["max_diff"], float((ref - cand).abs().max()))
        sums["max_ref"] = max(sums["max_ref"], float(ref.abs().max()))
    positions, predicted = blocks.numel(), blocks.shape[0] * (blocks.shape[1] - 1)
    return {
        "ppl_source": math.exp(sums["nll_ref"] / predicted),
        "ppl_quantized": math.exp(sums["nll_cand"] / predicted),
        "mean_kl": sums["kl"] / positions,
        "top1_agreement": sums["top1"] / positions,
        "max_rel_error": sums["max_diff"] / max(sums["max_ref"], 1e-30),
    }
