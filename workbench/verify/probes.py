"""Probes through the OpenAI HTTP API, exactly as users call a served model, and the comparison of its
greedy output with a reference model run in transformers."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPTS = (
    "import os\nimport sys\n\n\ndef main(",
    "class Parser:\n    def __init__(self",
    "    for i in range(",
    "# Copyright",
)
CHAT_MESSAGES = [{"role": "user", "content": "Write a function that parses a file."}]
MAX_TOKENS = 24
# Gates of the reference comparison, by artifact kind. The engine's greedy continuation is scored
# teacher-forced by the reference: the fraction of its tokens that are also the reference's top-1, and
# the largest |logprob difference| of those tokens (nats). Exact greedy text is reported, not gated: one
# near-tie flipped by rounding changes everything after it.
MIN_TOKEN_AGREEMENT = {"full": 0.95, "fp8": 0.9, "int8": 0.9, "int4": 0.8, "gguf-full": 0.95, "gguf-8bit": 0.9, "gguf-lowbit": 0.8}
MAX_LOGPROB_DELTA = {"full": 0.1, "fp8": 0.5, "int8": 0.5, "int4": 1.5, "gguf-full": 0.1, "gguf-8bit": 0.5, "gguf-lowbit": 1.5}


@dataclass
class Check:
    name: str
    status: str  # "passed" | "failed" | "skipped"
    detail: str = ""
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class Reference:
    """The reference model in transformers: its greedy continuations of PROMPTS, its chat prompt length,
    its EOS id, and teacher-forced scoring of another model's continuation."""

    def __init__(self, model_dir: Path, dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..hf import quiet_transformers

        quiet_transformers()
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [self.tok.eos_token_id]
        self.eos_token_id = self.eos_ids[0]
        with torch.inference_mode():
            self._greedy_ids = {p: self._greedy(p) for p in PROMPTS}
        self.texts = [self.tok.decode(self._greedy_ids[p], skip_special_tokens=True) for p in PROMPTS]
        chat = self.tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=True)
        self.chat_prompt_tokens = len(chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "input_ids") else chat)

    def _greedy(self, prompt: str) -> list[int]:
        ids = self.tok(prompt, return_tensors="pt").input_ids
        out = self.model.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS, pad_token_id=self.tok.pad_token_id)
        return [int(t) for t in out[0, ids.shape[1]:] if int(t) not in self.eos_ids]

    def score(self, prompt: str, continuation: str) -> tuple[int, int, list[float]]:
        """(tokens that are the reference's top-1, tokens scored, the reference's logprob of each) for a
        continuation: the reference's own greedy tokens when the text is its greedy text, else the text
        re-tokenized (which may merge tokens the engine generated apart)."""
        torch = self.torch
        prompt_ids = self.tok(prompt).input_ids
        own = self._greedy_ids.get(prompt)
        if own is not None and continuation == self.tok.decode(own, skip_special_tokens=True):
            ids = prompt_ids + own
        else:
            ids = prompt_ids + self.tok(continuation, add_special_tokens=False).input_ids
        with torch.inference_mode():
            logp = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        positions = range(len(prompt_ids), len(ids))
        agree = sum(int(logp[j - 1].argmax()) == ids[j] for j in positions)
        return agree, len(positions), [float(logp[j - 1, ids[j]]) for j in positions]


class Client:
    """Minimal OpenAI-API client over urllib (no dependency): JSON requests and SSE streams."""

    def __init__(self, base_url: str, model: str, request_extra: dict | None = None, timeout: float = 120.0):
        self.base_url, self.model, self.extra, self.timeout = base_url, model, request_extra or {}, timeout

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base_url + path, timeout=self.timeout) as r:
            return json.loads(r.read())

    def _request(self, path: str, body: dict) -> urllib.request.Request:
        payload = {"model": self.model, **self.extra, **body}
        return urllib.request.Request(self.base_url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})

    def post(self, path: str, body: dict) -> dict:
        try:
            with urllib.request.urlopen(self._request(path, body), timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"HTTP {exc.code} from {path}: {exc.read().decode(errors='replace')[:300]}") from None

    def stream(self, path: str, body: dict) -> list[dict]:
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


def _greedy(client: Client, prompt: str, **kw) -> dict:
    return client.post("/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **kw})


def run_probes(client: Client, reference: Reference | None, kind: str, gates: dict | None = None) -> list[Check]:
    """All probes against one running server; each probe's failure is recorded, never raised.
    ``gates`` may override min_token_agreement and max_logprob_delta of the kind's defaults."""
    min_agree = (gates or {}).get("min_token_agreement", MIN_TOKEN_AGREEMENT[kind])
    max_delta = (gates or {}).get("max_logprob_delta", MAX_LOGPROB_DELTA[kind])
    checks: list[Check] = []

    def probe(name):
        def wrap(fn):
            t0 = time.perf_counter()
            try:
                result = fn()
            except Exception as exc:  # a probe that breaks is a failed check, with the reason
                result = Check(name, "failed", f"{type(exc).__name__}: {exc}")
            result.seconds = round(time.perf_counter() - t0, 3)
            checks.append(result)
            return result
        return wrap

    @probe("models")
    def _models():
        ids = [m.get("id") for m in client.get("/v1/models").get("data", [])]
        ok = client.model in ids
        return Check("models", "passed" if ok else "failed", f"served: {ids}")

    completion = {}

    @probe("completion")
    def _completion():
        r = _greedy(client, PROMPTS[0])
        completion.update(r["choices"][0])
        tokens = r.get("usage", {}).get("completion_tokens", 0)
        ok = bool(completion.get("text")) and tokens > 0
        return Check("completion", "passed" if ok else "failed", f"{tokens} tokens: {completion.get('text', '')[:60]!r}")

    @probe("chat")
    def _chat():
        r = client.post("/v1/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0})
        prompt_tokens = r.get("usage", {}).get("prompt_tokens")
        content = r["choices"][0]["message"].get("content")
        if reference is not None and prompt_tokens != reference.chat_prompt_tokens:
            return Check("chat", "failed", f"prompt has {prompt_tokens} tokens, the chat template gives {reference.chat_prompt_tokens}")
        ok = isinstance(content, str) and r["choices"][0].get("finish_reason") in ("stop", "length")
        return Check("chat", "passed" if ok else "failed", f"{prompt_tokens} prompt tokens (chat template applied): {str(content)[:60]!r}")

    @probe("streaming")
    def _streaming():
        if not completion:
            return Check("streaming", "skipped", "no non-streamed completion to compare with")
        chunks = client.stream("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
        text = "".join(c["choices"][0].get("text", "") for c in chunks if c.get("choices"))
        ok = text == completion["text"]
        return Check("streaming", "passed" if ok else "failed", f"{len(chunks)} SSE chunks" + ("" if ok else f": {text!r} != {completion['text']!r}"))

    @probe("stop")
    def _stop():
        r = client.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 64, "temperature": 0, "stop": ["\n"]})
        choice = r["choices"][0]
        ok = choice.get("finish_reason") == "stop" and "\n" not in choice.get("text", "")
        return Check("stop", "passed" if ok else "failed", f"finish_reason={choice.get('finish_reason')}, {len(choice.get('text', ''))} chars")

    @probe("eos")
    def _eos():
        if reference is None or reference.eos_token_id is None:
            return Check("eos", "skipped", "no reference tokenizer to name the EOS token")
        # forcing the EOS token first must end generation at once: proves the engine knows the EOS id
        r = client.post("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0,
                                            "logit_bias": {str(reference.eos_token_id): 100}})
        choice, tokens = r["choices"][0], r.get("usage", {}).get("completion_tokens")
        ok = choice.get("finish_reason") == "stop" and (tokens or 0) <= 1
        return Check("eos", "passed" if ok else "failed", f"finish_reason={choice.get('finish_reason')} after {tokens} token(s)")

    @probe("reference")
    def _reference():
        if reference is None:
            return Check("reference", "skipped", "no reference model")
        equal, agree, scored, deltas = 0, 0, 0, []
        for prompt, ref_text in zip(PROMPTS, reference.texts):
            choice = _greedy(client, prompt, logprobs=1)["choices"][0]
            equal += choice["text"] == ref_text
            a, n, ref_lp = reference.score(prompt, choice["text"])
            agree, scored = agree + a, scored + n
            lp = [x for x in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if x is not None]
            if len(lp) == n:  # the engine's tokens are the reference's tokens
                deltas += [abs(x - y) for x, y in zip(lp, ref_lp)]
        token_agreement = agree / max(scored, 1)
        metrics = {"greedy_text_agreement": equal / len(PROMPTS), "token_agreement": round(token_agreement, 4),
                   "tokens_scored": scored, "max_logprob_delta": round(max(deltas), 5) if deltas else None}
        ok = token_agreement >= min_agree and (not deltas or max(deltas) <= max_delta)
        detail = (f"{agree}/{scored} tokens are the reference's top-1 (min {min_agree:.0%} for {kind}), "
                  f"max |Δlogprob| {metrics['max_logprob_delta']} (max {max_delta}), "
                  f"{equal}/{len(PROMPTS)} greedy texts equal")
        return Check("reference", "passed" if ok else "failed", detail, metrics)

    return checks
