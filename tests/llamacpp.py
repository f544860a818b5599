"""Runs llama.cpp (llama-cpp-python, in its own environment) for the tests: logits, tokenization and greedy
text of a GGUF file, through a subprocess that returns JSON/NumPy."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from workbench.engines import ENGINES, cpu_threads, engine_python, usable_cpus

SCRIPT = r"""
import json, sys
import numpy as np
import llama_cpp
request = json.load(open(sys.argv[1]))
llm = llama_cpp.Llama(model_path=request["model"], lora_path=request["lora"], n_ctx=512, n_batch=512, logits_all=True,
                      n_threads=request["threads"], verbose=False)
result = {"tokens": [llm.tokenize(t.encode(), add_bos=True, special=request["special"]) for t in request["texts"]], "greedy": []}
for prompt in request["prompts"]:
    out = llm.create_completion(prompt, max_tokens=request["max_tokens"], temperature=0.0, repeat_penalty=1.0, top_k=1)
    result["greedy"].append(out["choices"][0]["text"])
scores = []
for ids in request["blocks"]:
    llm.reset()
    llm.eval(ids)
    scores.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
np.save(request["out"], np.stack(scores) if scores else np.zeros(0))
json.dump(result, open(request["out"] + ".json", "w"))
"""


def llamacpp_python() -> str:
    python = engine_python(ENGINES["llamacpp"])
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode != 0:
        pytest.fail("llama-cpp-python is not installed: run scripts/setup.sh")
    return python


def run_llamacpp(model: Path, blocks=(), texts=(), prompts=(), max_tokens: int = 24, lora: Path | None = None,
                 special: bool = False) -> dict:
    """``special``: texts may hold special tokens (a rendered chat template), parsed as such."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "scores.npy")
        request = {"model": str(model), "lora": str(lora) if lora else None, "blocks": [list(map(int, b)) for b in blocks], "texts": list(texts),
                   "prompts": list(prompts), "max_tokens": max_tokens, "out": out, "special": special,
                   "threads": cpu_threads(usable_cpus(), dict(os.environ))}
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        done = subprocess.run([llamacpp_python(), "-c", SCRIPT, str(Path(tmp) / "request.json")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(Path(out + ".json").read_text())
        result["logits"] = np.load(out)
    return result
