"""The teacher-forced comparison's own arithmetic, no engine: the figures, the gates, the held-out blocks, and how
llama-cpp-python's echo (0.3.36) lines up with the positions the reference scored. The engines' side runs in
the engine tests (test_readback, test_reference_kernels, the example release)."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.verify.forced import (FORCED_GATES, FORCED_POSITIONS, GATE_NAMES, TOP_K, EnginePosition, ForcedMismatch,
                                     ForcedReference, _coarse_kl, ask_llamacpp, compare, forced_blocks, judge, token_texts)


def _reference(positions: int = 6, vocab: int = 20, seed: int = 0) -> tuple[ForcedReference, torch.Tensor]:
    logprobs = torch.randn(positions, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).log_softmax(-1)
    targets = torch.arange(positions) % vocab
    top = logprobs.topk(TOP_K)
    ref = ForcedReference([("", [0, *targets.tolist()])], logprobs[torch.arange(positions), targets],
                          logprobs[torch.arange(positions), targets], logprobs.argmax(-1), top.indices, top.values)
    return ref, logprobs


def _engine(logprobs: torch.Tensor, targets) -> list[EnginePosition]:
    return [EnginePosition(float(row[t]), {int(i): float(v) for v, i in zip(*row.topk(TOP_K))}) for row, t in zip(logprobs, targets)]


def test_an_engine_equal_to_the_reference_passes_every_gate():
    ref, logprobs = _reference()
    metrics = compare(ref, _engine(logprobs, ref.blocks[0][1][1:]))
    assert metrics["mean_logprob_delta"] == 0 and metrics["top1_agreement"] == 1.0 and abs(metrics["mean_topk_kl"]) < 1e-9
    assert judge(metrics, dict(zip(GATE_NAMES, FORCED_GATES["fp8"]))) == []


def test_a_shifted_engine_misses_the_gates_and_a_nan_misses_every_gate_it_is_in():
    ref, logprobs = _reference()
    moved = compare(ref, _engine((logprobs * 1.5).log_softmax(-1), ref.blocks[0][1][1:]))
    assert moved["mean_logprob_delta"] > 0.1 and moved["mean_topk_kl"] > 0.01
    assert len(judge(moved, dict(zip(GATE_NAMES, FORCED_GATES["fp8"])))) >= 2
    nan = dict(moved, mean_logprob_delta=math.nan, mean_topk_kl=math.nan)
    assert sum(m.startswith(("mean |Δlogprob| nan", "top-k KL nan")) for m in judge(nan, dict(zip(GATE_NAMES, (9, 9, 0, 9))))) == 2


def test_the_coarse_kl_is_never_negative_and_is_zero_for_the_same_distribution():
    ref, logprobs = _reference()
    for i in range(len(logprobs)):
        same = _engine(logprobs[i:i + 1], [0])[0]
        assert abs(_coarse_kl(ref.top_ids[i].tolist(), ref.top_logprob[i], same)) < 1e-9
        other = _engine(torch.roll(logprobs[i:i + 1], 1, dims=-1), [0])[0]
        assert _coarse_kl(ref.top_ids[i].tolist(), ref.top_logprob[i], other) > 0


class _Echo:
    """llama-cpp-python 0.3.36's echo of a prompt, built as its code builds it: the evaluated positions' rows
    paired with the prompt's tokens (less a leading BOS), every token equal to its BOS id left out, the first
    entry's values set to None. Row i holds -(i + 1) for every token, so each entry says which row it came from."""

    def __init__(self, ids, bos_id, generated=99):
        self.ids, self.bos_id, self.generated = ids, bos_id, generated

    def post(self, path, body):
        tokens = (self.ids[1:] if self.ids[0] == self.bos_id else self.ids) + [self.generated]
        rows = range(len(self.ids))  # the generated token is not evaluated: zip stops at the prompt's rows
        listed = [(t, -(r + 1.0)) for t, r in zip(tokens, rows) if t != self.bos_id]
        values = [None] + [v for _, v in listed[1:]]
        tops = [None] + [{f"t{t}": v} for t, v in listed[1:]]
        return {"choices": [{"logprobs": {"tokens": [f"t{t}" for t, _ in listed], "token_logprobs": values, "top_logprobs": tops}}]}


def test_llamacpp_echo_after_a_bos_gives_position_i_the_row_of_position_i():
    ids = [1, 5, 6, 7, 8]  # BOS, then four tokens: positions 0..3 predict 5..8
    got = ask_llamacpp(_Echo(ids, bos_id=1), "text", ids, TOP_K, bos_id=1)
    assert [p.target_logprob for p in got] == [None, -2.0, -3.0, -4.0]


def test_llamacpp_echo_without_a_bos_skips_the_tokens_equal_to_its_bos_id():
    ids = [5, 11, 6, 7, 8]  # no BOS; 11 is llama.cpp's default BPE BOS id, dropped from the echo
    got = ask_llamacpp(_Echo(ids, bos_id=11), "text", ids, TOP_K, bos_id=11)
    # entry for token j is row j: position j (its logprob of its own token); position 1 (token 11) gets nothing
    assert [p.target_logprob for p in got] == [None, None, -3.0, -4.0]


def test_llamacpp_echo_of_another_tokenization_is_not_compared():
    with pytest.raises(ForcedMismatch, match="echoed 4 tokens"):
        ask_llamacpp(_Echo([1, 5, 6, 7], bos_id=1), "text", [1, 5, 6, 7, 8, 9], TOP_K, bos_id=1)


def test_held_out_blocks_are_whole_texts_of_at_least_2048_positions(tokenizer):
    blocks = forced_blocks(tokenizer)
    assert sum(len(ids) - 1 for _, ids in blocks) >= FORCED_POSITIONS
    for text, ids in blocks:
        assert ids == tokenizer(text).input_ids and text.endswith("\n")


@pytest.mark.parametrize("piece, text", [("\u0120for", " for"), ("\u010a", "\n"), ("\u2581for", " for"), ("<0x0A>", "\n")])
def test_token_text_is_the_tokens_bytes_as_llamacpp_names_them(piece, text):
    class Tok:
        def __len__(self):
            return 300

        def convert_ids_to_tokens(self, ids):
            return ["\u0120x"] * len(ids) if isinstance(ids, list) else piece

    assert token_texts(Tok())(5) == text
