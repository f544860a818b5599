"""Numbers against the source model: next-token logits of two models on the same tokens."""

from __future__ import annotations

import math

import torch


@torch.inference_mode()
def compare_final_hidden(runner, reference: torch.Tensor, candidate: torch.Tensor, blocks: torch.Tensor) -> dict[str, float]:
    """Quality figures of a candidate against the reference on token ``blocks`` from both models' final
    normed hidden states [positions, hidden], through the runner's (shared, unquantized) lm_head a block of
    rows at a time: perplexity of both, mean KL(reference || candidate), top-1 agreement, max relative
    logit error."""
    stats = PairStats(blocks.numel(), next_token_targets(blocks))
    for start, (a, b) in runner.logits(reference, candidate):
        stats.add(start, a, b)
    return stats.report()


class VocabStats:
    """Per-position statistics of next-token distributions seen one vocabulary block at a time: the
    log-sum-exp (kept online, its running max and sum in float64), the argmax, and the logit of each position's
    target id (-1: none). A block's own sums are taken in float32 (float64 on 4096 x 128k logits cost twice the
    lm_head's matmul here); they only add terms of at most 1 each, so float32's relative 1e-7 is what it costs."""

    def __init__(self, positions: int, targets: torch.Tensor | None = None):
        self.max = torch.full((positions,), -math.inf, dtype=torch.float64)
        self.sum = torch.zeros(positions, dtype=torch.float64)
        self.argmax = torch.zeros(positions, dtype=torch.long)
        self.targets = targets if targets is not None else torch.full((positions,), -1, dtype=torch.long)
        self.target_logit = torch.full((positions,), math.nan, dtype=torch.float64)

    def add(self, start: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in float32 logits [positions, block] of ids start..; returns (the previous running max, exp(logits
        less the new running max) in float32, which the caller may reuse)."""
        block_max, block_arg = logits.max(-1)
        before = self.max
        self.argmax = torch.where(block_max > before, block_arg + start, self.argmax)
        self.max = torch.maximum(before, block_max.double())
        weights = torch.exp(logits - self.max.float()[:, None])
        self.sum = self.sum * torch.exp(before - self.max) + weights.sum(-1, dtype=torch.float64)
        inside = (self.targets >= start) & (self.targets < start + logits.shape[1])
        rows = inside.nonzero().squeeze(-1)
        self.target_logit[rows] = logits[rows, self.targets[rows] - start].double()
        return before, weights

    @property
    def lse(self) -> torch.Tensor:
        """Each position's log-sum-exp over the blocks folded in so far (the softmax's normalizer, in log)."""
        return self.max + torch.log(self.sum)

    def target_logprob(self) -> torch.Tensor:
        """Each position's log-probability of its target id; NaN where it has none."""
        return self.target_logit - self.lse


class PairStats:
    """A reference and a candidate model on the same positions, one vocabulary block at a time: each one's
    VocabStats, KL(reference || candidate) and the largest |logit difference|, never the whole logits."""

    def __init__(self, positions: int, targets: torch.Tensor | None = None):
        self.ref, self.cand = VocabStats(positions, targets), VocabStats(positions, targets)
        self.weighted_diff = torch.zeros(positions, dtype=torch.float64)  # sum exp(a - max_a) * (a - b)
        self.max_diff = self.max_ref = 0.0

    def add(self, start: int, ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> None:
        """Fold in both models' float32 logits [positions, block] of ids start..: their VocabStats, the KL sum
        rescaled to the reference's new running max, and the largest |logit| and |difference|."""
        a, b = ref_logits.float(), cand_logits.float()
        before, weights = self.ref.add(start, a)
        self.cand.add(start, b)
        diff = a - b
        self.weighted_diff = self.weighted_diff * torch.exp(before - self.ref.max) + \
            (weights * diff).sum(-1, dtype=torch.float64)
        self.max_diff = max(self.max_diff, float(diff.abs().max()))
        self.max_ref = max(self.max_ref, float(a.abs().max()))

    def kl(self) -> torch.Tensor:
        """KL(reference || candidate) per position, from the blocks folded in so far."""
        return self.weighted_diff / self.ref.sum - self.ref.lse + self.cand.lse

    def report(self) -> dict[str, float]:
        """Perplexity of both over the positions with a target, mean KL, top-1 agreement, max relative error."""
        scored = self.ref.targets >= 0
        predicted = int(scored.sum())
        return {
            "ppl_source": math.exp(float(-self.ref.target_logprob()[scored].sum()) / predicted),
            "ppl_quantized": math.exp(float(-self.cand.target_logprob()[scored].sum()) / predicted),
            "mean_kl": float(self.kl().mean()),
            "top1_agreement": float((self.ref.argmax == self.cand.argmax).double().mean()),
            "max_rel_error": self.max_diff / max(self.max_ref, 1e-30),
        }


def next_token_targets(blocks: torch.Tensor) -> torch.Tensor:
    """Per position of token blocks [n, tokens], flattened: the id that follows it, -1 at each block's end."""
    targets = torch.full_like(blocks, -1)
    targets[:, :-1] = blocks[:, 1:]
    return targets.reshape(-1)
