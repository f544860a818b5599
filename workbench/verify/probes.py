"""Probes through the OpenAI HTTP API, exactly as users call a served model, and the comparison of its
greedy output with a reference model run in transformers.

A check is "passed", "failed", "incomplete" (it should have run and could not) or "skipped" (the user turned
it off, e.g. --no-reference; the report says so); neither of the last two is a pass (``verdict``). The probes assume nothing about the
model's output: the stop probe takes its stop string from the model's own greedy reply, and the reference
comparison scores the engine's tokens by id, so a reply cut inside a multi-byte character scores exactly.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..prompts import PROMPTS

MAX_TOKENS = 24
# Gates of the reference comparison, by artifact kind. The engine's greedy continuation is scored
# teacher-forced by the reference: the fraction of its tokens that are also the reference's top-1, and
# the largest |logprob difference| of those tokens (nats). Exact greedy text is reported, not gated: one
# near-tie flipped by rounding changes everything after it.
MIN_TOKEN_AGREEMENT = {"full": 0.95, "fp8": 0.9, "int8": 0.9, "int4": 0.8, "fp4": 0.8, "gguf-full": 0.95, "gguf-8bit": 0.9, "gguf-lowbit": 0.8}
MAX_LOGPROB_DELTA = {"full": 0.1, "fp8": 0.5, "int8": 0.5, "int4": 1.5, "fp4": 1.5, "gguf-full": 0.1, "gguf-8bit": 0.5, "gguf-lowbit": 1.5}
TOKEN_ID_PREFIX = "token_id:"


@dataclass
class Check:
    """One verify check's outcome: its name, status (passed, failed, incomplete, skipped), detail, figures and
    seconds."""
    name: str
    status: str  # "passed" | "failed" | "incomplete" | "skipped"
    detail: str = ""
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """The check as the report's JSON records it: its fields by name."""
        return asdict(self)


def verdict(checks: list[dict]) -> str:
    """failed if any check failed or measured a NaN; else incomplete if any did not run (incomplete, or skipped:
    what was not checked is never a pass); else passed."""
    statuses = {"failed" if has_nan(c.get("metrics")) else c["status"] for c in checks}
    return "failed" if "failed" in statuses else "passed" if statuses <= {"passed"} else "incomplete"


def has_nan(value) -> bool:
    """A NaN anywhere in a check's figures (nested dicts and lists included)."""
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(has_nan(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_nan(v) for v in value)
    return False


def reference_estimate(model_dir: Path, prompts: tuple[str, ...], max_tokens: int):
    """Peak memory and time of a Reference: one walk per generated token, then one teacher-forced walk."""
    from ..checkpoint import Checkpoint
    from ..runner import estimate

    from .forced import FORCED_BLOCK_TOKENS, FORCED_POSITIONS

    tokens = len(prompts) * (PROMPT_TOKENS_GUESS + max_tokens) + FORCED_POSITIONS + 2 * FORCED_BLOCK_TOKENS
    return estimate(Checkpoint(model_dir), tokens, passes=2, walks=max_tokens + 2)


PROMPT_TOKENS_GUESS = 32  # for the estimate: the probes' prompts are short


class Reference:
    """The reference model, run layer by layer (runner.py): its greedy continuations of the prompts (with
    the logprob of each token) and teacher-forced scoring of another model's tokens."""

    def __init__(self, model_dir: Path, dtype: str = "auto", prompts: tuple[str, ...] = PROMPTS, max_tokens: int = MAX_TOKENS,
                 adapter: Path | None = None, cancel=None, forced: bool = False):
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        from ..checkpoint import Checkpoint
        from ..runner import LayerRunner
        from ..safety import remote_code_trusted

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_trusted())
        compute = Checkpoint(model_dir).dtype if dtype == "auto" else getattr(torch, dtype)
        # an adapter is folded in on the fly in float32: peft's unmerged forward pass, as trained
        self.runner = LayerRunner(model_dir, adapter=adapter, dtype=compute, cancel=cancel)
        try:
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:  # no generation_config.json
            eos = self.runner.config.eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [self.tok.eos_token_id]
        self.max_tokens = max_tokens
        generated = self._generate(list(prompts))
        self._generated = dict(zip(prompts, generated))  # (ids incl. a final EOS, their logprobs)
        self.greedy_ids = {p: [t for t in ids if t not in self.eos_ids] for p, (ids, _) in self._generated.items()}
        self.forced = self._forced() if forced else None

    def _forced(self):
        """The held-out blocks of the teacher-forced comparison, scored (verify/forced.py)."""
        from .forced import forced_blocks

        return self.forced_on(forced_blocks(self.tok))

    def forced_on(self, blocks: list[tuple[str, list[int]]]):
        """``blocks`` (text, ids) scored teacher-forced: also for the ids an engine that takes text made of them."""
        from .forced import forced_reference

        return forced_reference(self.runner, blocks)

    def prompt_ids(self, prompt: str) -> list[int]:
        """``prompt``'s token ids from the reference's tokenizer, with the special tokens it adds (e.g. BOS)."""
        return self.tok(prompt).input_ids

    def _generate(self, prompts: list[str]) -> list[tuple[list[int], list[float]]]:
        """Greedy continuations of all prompts at once: one walk through the layers per new token, each
        prompt with its own KV cache."""
        from transformers import DynamicCache

        from ..quality import VocabStats

        torch, runner = self.torch, self.runner
        caches = [DynamicCache(config=runner.config) for _ in prompts]
        pending = [torch.tensor([self.prompt_ids(p)]) for p in prompts]
        out: list[tuple[list[int], list[float]]] = [([], []) for _ in prompts]
        active = list(range(len(prompts)))
        with torch.inference_mode():
            for _ in range(self.max_tokens):
                if not active:
                    break
                streams = [runner.stream(pending[i], caches[i]) for i in active]
                runner.walk(streams)
                stats = VocabStats(len(active))
                for start, (block,) in runner.logits(runner.normed(torch.cat([s.hidden[:, -1] for s in streams]))):
                    stats.add(start, block.double())
                logprobs = (stats.max - stats.lse).tolist()
                for j, i in enumerate(list(active)):
                    token = int(stats.argmax[j])
                    out[i][0].append(token)
                    out[i][1].append(logprobs[j])
                    pending[i] = torch.tensor([[token]])
                    if token in self.eos_ids:
                        active.remove(i)
        return out

    def text_ids(self, prompt: str, text: str) -> list[int]:
        """Token ids for an engine that returns only text: the reference's own greedy ids when the text is
        its greedy text, else the text re-tokenized after the prompt (which may merge tokens the engine
        generated apart)."""
        own = self.greedy_ids.get(prompt)
        if own is not None and text == self.continuation_text(prompt, own):
            return own
        before = self.prompt_ids(prompt)
        after = self.tok(prompt + text).input_ids
        return after[len(before):] if after[:len(before)] == before else self.tok(text, add_special_tokens=False).input_ids

    def continuation_text(self, prompt: str, ids: list[int]) -> str:
        """``ids`` decoded after the prompt, as an engine's detokenizer does: a SentencePiece decoder drops
        the leading space of a text decoded on its own ("▁Hello" alone is "Hello", after a prompt " Hello")."""
        before = self.prompt_ids(prompt)
        head, whole = (self.tok.decode(before + ids[:n], skip_special_tokens=True) for n in (0, len(ids)))
        return whole[len(head):] if whole.startswith(head) else self.tok.decode(ids, skip_special_tokens=True)

    def score(self, pairs: list[tuple[str, list[int]]]) -> list[tuple[int, list[float]]]:
        """Per (prompt, ids): how many of ``ids`` are the reference's top-1 after the prompt and the ids
        before them, and the reference's logprob of each id. Ids that are the reference's own greedy
        continuation are scored from its generation; the rest in one teacher-forced walk."""
        from ..quality import VocabStats

        torch, runner = self.torch, self.runner
        results: list[tuple[int, list[float]] | None] = []
        forced = []
        for prompt, ids in pairs:
            own_ids, own_lp = self._generated.get(prompt, ([], []))
            if list(ids) == own_ids[: len(ids)]:
                results.append((len(ids), own_lp[: len(ids)]))
            else:
                results.append(None)
                forced.append((len(results) - 1, self.prompt_ids(prompt), list(ids)))
        if not forced:
            return results
        with torch.inference_mode():
            streams = [runner.stream(torch.tensor([p + ids])) for _, p, ids in forced]
            runner.walk(streams)
            hidden = torch.cat([s.hidden[0, len(p) - 1: len(p) + len(ids) - 1] for s, (_, p, ids) in zip(streams, forced)])
            targets = torch.tensor([t for _, _, ids in forced for t in ids], dtype=torch.long)
            stats = VocabStats(len(targets), targets)
            for start, (block,) in runner.logits(runner.normed(hidden)):
                stats.add(start, block.double())
        agree, logprobs, at = (stats.argmax == targets).tolist(), stats.target_logprob().tolist(), 0
        for index, _, ids in forced:
            results[index] = (sum(agree[at: at + len(ids)]), logprobs[at: at + len(ids)])
            at += len(ids)
        return results


class Client:
    """Minimal OpenAI-API client over urllib (no dependency): JSON requests and SSE streams."""

    def __init__(self, base_url: str, model: str, request_extra: dict | None = None, timeout: float = 120.0):
        self.base_url, self.model, self.extra, self.timeout = base_url, model, request_extra or {}, timeout

    def get(self, path: str) -> dict:
        """The JSON reply to a GET of ``path``; an HTTP error raises urllib's HTTPError."""
        with urllib.request.urlopen(self.base_url + path, timeout=self.timeout) as r:
            return json.loads(r.read())

    def _request(self, path: str, body: dict) -> urllib.request.Request:
        payload = {"model": self.model, **self.extra, **body}
        return urllib.request.Request(self.base_url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})

    def post(self, path: str, body: dict) -> dict:
        """The JSON reply to ``body`` (with the model and the extra request fields) at ``path``; an HTTP error
        raises RuntimeError with its code and the start of its body."""
        try:
            with urllib.request.urlopen(self._request(path, body), timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"HTTP {exc.code} from {path}: {exc.read().decode(errors='replace')[:300]}") from None

    def stream(self, path: str, body: dict) -> list[dict]:
        """``body`` sent with ``stream: true``: the JSON chunks of the server-sent events, up to [DONE]."""
        chunks = []
        with urllib.request.urlopen(self._request(path, {**body, "stream": True}), timeout=self.timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunks.append(json.loads(data))
        return chunks


@dataclass
class Probing:
    """What the probes need besides the server: the artifact's own facts and the user's choices."""

    kind: str
    prompts: tuple[str, ...] = PROMPTS
    max_tokens: int = MAX_TOKENS
    eos_ids: tuple[int, ...] = ()  # the artifact's end-of-sequence ids (generation_config, config or GGUF)
    token_ids: str | None = None  # how this engine returns token ids (engines.py; None: it returns text only)
    reference: Reference | None = None
    no_reference: bool = False  # the user turned the comparison off (--no-reference)
    missing_reference: str = ""  # why there is no reference, when the user did not turn it off
    gates: dict = field(default_factory=dict)
    generate_extra: dict = field(default_factory=dict)  # sent with native /generate requests (e.g. an adapter's name)
    forced: str | None = None  # how this engine returns prompt logprobs (verify/forced.py ASK; None: it does not)
    engine_bos: int | None = None  # the BOS id llama.cpp holds for a GGUF (its echo of a prompt drops that id)
    tokenize: object = None  # the engine's tokenize endpoint (engines.TokenizeEndpoint), for what it makes of a text

    def min_agreement(self) -> float:
        """The token agreement with the reference a pass needs: the user's min_token_agreement gate, else the
        default for the artifact's kind."""
        return self.gates.get("min_token_agreement", MIN_TOKEN_AGREEMENT[self.kind])


def stop_string(text: str) -> tuple[str, int] | None:
    """A two-character stop string from the second half of a greedy reply, and where it first occurs; the
    engine must stop right before it."""
    for start in (*range(max(1, len(text) // 2), len(text) - 1), *range(1, max(1, len(text) // 2))):
        candidate = text[start:start + 2]
        if text.find(candidate) == start:
            return candidate, start
    return None


def _ask_tokens(client: Client, probing: Probing, prompt: str) -> tuple[list[int] | None, list[float], str, int]:
    """The engine's greedy reply: (its token ids, or None when the engine returns text only; the logprob of
    each token; the text; how many tokens the engine says it made). An engine that returns token ids is given
    the reference's prompt ids, so that this compares the model's math alone (the tokenizer check compares the
    engine's tokenizer)."""
    ids = probing.reference.prompt_ids(prompt) if probing.token_ids and probing.reference is not None else None
    if probing.token_ids == "generate":  # SGLang's native API
        given = {"input_ids": ids} if ids else {"text": prompt}
        r = client.post("/generate", {**given, "return_logprob": True, **probing.generate_extra,
                                      "sampling_params": {"max_new_tokens": probing.max_tokens, "temperature": 0}})
        logprobs = [float(entry[0]) for entry in r["meta_info"]["output_token_logprobs"]]
        return [int(i) for i in r["output_ids"]], logprobs, r["text"], len(logprobs)
    extra = {"return_tokens_as_token_ids": True} if probing.token_ids == "openai" else {}
    body = {"prompt": ids or prompt, "max_tokens": probing.max_tokens, "temperature": 0, "logprobs": 1, **extra}
    choice = client.post("/v1/completions", body)["choices"][0]
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens") or []
    values = [x for x in (logprobs.get("token_logprobs") or []) if x is not None]
    ids = None
    if tokens and all(isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) for t in tokens):
        ids = [int(t[len(TOKEN_ID_PREFIX):]) for t in tokens]
    return ids, values, choice.get("text", ""), len(tokens)


class EndpointUnanswered(Exception):
    """An engine endpoint a check needs (its tokenizer's) answered 5xx: the check could not run, by the
    engine's failure, not the artifact's."""


def guarded(name: str, fn) -> Check:
    """Run one probe, timed; a probe that breaks is a failed check with the reason (incomplete when an endpoint
    it needs did not answer), never an exception."""
    t0 = time.perf_counter()
    try:
        result = fn()
    except EndpointUnanswered as exc:
        result = Check(name, "incomplete", str(exc))
    except Exception as exc:  # noqa: BLE001 - whatever broke is the probe's finding
        result = Check(name, "failed", f"{type(exc).__name__}: {exc}")
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def reference_check(client: Client, probing: Probing, name: str = "reference") -> Check:
    """The engine's greedy tokens for the probing's prompts, scored by its reference model."""
    if probing.reference is None:
        if probing.no_reference:
            return Check(name, "skipped", "not run: --no-reference")
        return Check(name, "incomplete", probing.missing_reference or "no reference model")
    check = _compare(probing, lambda prompt: _ask_tokens(client, probing, prompt))
    check.name = name
    return check


def run_probes(client: Client, probing: Probing) -> list[Check]:
    """The base probes against one running server; each probe's failure is recorded, never raised."""
    from .forced import forced_check

    replies: dict[str, str] = {}  # the completion probe's greedy reply to each prompt: streaming and stop compare with it
    return [guarded("models", lambda: _probe_models(client)),
            guarded("completion", lambda: _probe_completion(client, probing, replies)),
            guarded("streaming", lambda: _probe_streaming(client, probing, replies)),
            guarded("stop", lambda: _probe_stop(client, probing, replies)),
            guarded("eos", lambda: _probe_eos(client, probing)),
            guarded("reference", lambda: reference_check(client, probing)),
            *([guarded("teacher-forced", lambda: forced_check(client, probing))] if probing.forced else [])]


def _greedy(client: Client, probing: Probing, prompt: str, **kw) -> dict:
    body = {"prompt": prompt, "max_tokens": probing.max_tokens, "temperature": 0, **kw}
    return client.post("/v1/completions", body)["choices"][0]


def _probe_models(client: Client) -> Check:
    ids = [m.get("id") for m in client.get("/v1/models").get("data", [])]
    return Check("models", "passed" if client.model in ids else "failed", f"served: {ids}")


def _probe_completion(client: Client, probing: Probing, replies: dict[str, str]) -> Check:
    """Every prompt answered; the replies are kept in ``replies``."""
    for prompt in probing.prompts:
        replies[prompt] = _greedy(client, probing, prompt).get("text", "")
    empty = [p for p, text in replies.items() if not text]
    return Check("completion", "failed" if empty else "passed",
                 f"{len(replies) - len(empty)}/{len(replies)} prompts answered: {replies[probing.prompts[0]][:60]!r}")


def _probe_streaming(client: Client, probing: Probing, replies: dict[str, str]) -> Check:
    """The first prompt streamed (SSE) gives the same text as its non-streamed reply."""
    prompt = probing.prompts[0]
    if prompt not in replies:
        return Check("streaming", "incomplete", "no non-streamed reply to compare with (the completion probe broke)")
    chunks = client.stream("/v1/completions", {"prompt": prompt, "max_tokens": probing.max_tokens, "temperature": 0})
    text = "".join(c["choices"][0].get("text", "") for c in chunks if c.get("choices"))
    ok = text == replies[prompt]
    return Check("streaming", "passed" if ok else "failed", f"{len(chunks)} SSE chunks" + ("" if ok else f": {text!r} != {replies[prompt]!r}"))


def _probe_stop(client: Client, probing: Probing, replies: dict[str, str]) -> Check:
    """A stop string taken from a reply ends that reply right before it."""
    found = next(((p, stop_string(t)) for p, t in replies.items() if stop_string(t)), None)
    if found is None:
        return Check("stop", "incomplete", "no greedy reply long enough to take a stop string from")
    prompt, (stop, at) = found
    choice = _greedy(client, probing, prompt, stop=[stop])
    expected = replies[prompt][:at]
    ok = choice.get("finish_reason") == "stop" and choice.get("text") == expected
    return Check("stop", "passed" if ok else "failed",
                 f"stop {stop!r} (from the model's own reply): finish_reason={choice.get('finish_reason')}, "
                 f"{choice.get('text')!r}" + ("" if ok else f", expected {expected!r}"))


def _probe_eos(client: Client, probing: Probing) -> Check:
    if not probing.eos_ids:
        return Check("eos", "incomplete", "the artifact names no EOS token (generation_config, config or GGUF metadata)")
    # forcing the EOS token first must end generation at once: proves the engine knows the EOS id
    eos = probing.eos_ids[0]
    r = client.post("/v1/completions", {"prompt": probing.prompts[-1], "max_tokens": 16, "temperature": 0,
                                        "logit_bias": {str(eos): 100}})
    choice, tokens = r["choices"][0], r.get("usage", {}).get("completion_tokens")
    ok = choice.get("finish_reason") == "stop" and (tokens or 0) <= 1
    return Check("eos", "passed" if ok else "failed", f"EOS id {eos}: finish_reason={choice.get('finish_reason')} after {tokens} token(s)")


def _compare(probing: Probing, ask) -> Check:
    """Teacher-forced agreement of the engine's greedy tokens with the reference, and their logprob deltas."""
    ref = probing.reference
    min_agree = probing.min_agreement()
    max_delta = probing.gates.get("max_logprob_delta", MAX_LOGPROB_DELTA[probing.kind])
    equal = agree = scored = 0
    deltas: list[float] = []
    unmatched = []  # prompts whose engine tokens could not be identified, so no logprob was compared
    from_text = 0  # replies the engine gave as text only, re-tokenized by the reference
    answers = []
    for prompt in probing.prompts:
        ids, engine_lp, text, made = ask(prompt)
        by_id = ids is not None
        from_text += not by_id
        answers.append((prompt, ids if by_id else ref.text_ids(prompt, text), engine_lp, by_id, made))
    scores = ref.score([(prompt, ids) for prompt, ids, *_ in answers])
    for (prompt, ids, engine_lp, by_id, made), (a, ref_lp) in zip(answers, scores):
        equal += [i for i in ids if i not in ref.eos_ids] == ref.greedy_ids.get(prompt)
        agree, scored = agree + a, scored + len(ids)
        if len(engine_lp) == len(ids) and (by_id or len(ids) == made):
            deltas += [abs(x - y) for x, y in zip(engine_lp, ref_lp)]
        else:
            unmatched.append(prompt)
    token_agreement = agree / max(scored, 1)
    worst = max(deltas, key=lambda d: math.inf if math.isnan(d) else d) if deltas else None  # a NaN is the worst
    metrics = {"greedy_token_agreement": equal / len(probing.prompts), "token_agreement": round(token_agreement, 4),
               "tokens_scored": scored, "max_logprob_delta": round(worst, 5) if deltas else None,
               "logprob_gate_prompts": len(probing.prompts) - len(unmatched), "scored_by": "text" if from_text else "token id"}
    agreement_ok = token_agreement >= min_agree
    delta_ok = not deltas or worst <= max_delta  # False for a NaN
    detail = (f"{agree}/{scored} tokens are the reference's top-1 (min {min_agree:.0%} for {probing.kind}), "
              f"max |Δlogprob| {metrics['max_logprob_delta']} (max {max_delta}), "
              f"{equal}/{len(probing.prompts)} greedy replies equal")
    if unmatched:
        detail += (f"; logprob gate not applied to {len(unmatched)}/{len(probing.prompts)} prompts "
                   "(the engine returned text whose tokens could not be identified)")
    if not (agreement_ok and delta_ok):
        return Check("reference", "failed", detail, metrics)
    if not deltas:
        return Check("reference", "incomplete", detail, metrics)
    return Check("reference", "passed", detail, metrics)
