"""`workbench convert gguf`, proven by llama.cpp itself: logits against transformers on held-out text,
tokenization, greedy text, metadata round trip, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import assert_one_line_error, run
from llamacpp import run_llamacpp
from workbench.convert.writer import gguf_metadata
from logits import compare_logits

TYPES = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
# llama.cpp vs. transformers (float32 on the same bf16 weights), on 4 held-out blocks of 128 tokens
TOLERANCE = {
    "f32": {"max_rel_error": 1e-3, "top1_agreement": 0.99},
    "f16": {"max_rel_error": 2e-2, "top1_agreement": 0.98},
    "bf16": {"max_rel_error": 2e-2, "top1_agreement": 0.98},
    "q8_0": {"mean_kl": 5e-3, "top1_agreement": 0.95},
    "q6_k": {"mean_kl": 0.02, "top1_agreement": 0.9},
    "q5_k_m": {"mean_kl": 0.05, "top1_agreement": 0.85},
    "q4_k_m": {"mean_kl": 0.1, "top1_agreement": 0.85},
    "q4_0": {"mean_kl": 0.2, "top1_agreement": 0.8},
}
LABELS = {t: t.upper() for t in TYPES}
PROMPTS = ["import os\nimport sys\n\n\ndef main(", "class Parser:\n    def __init__(self", "    for i in range("]
TEXTS = ["def f(x):\n    return x ** 2  # square\n", "Hello, World! 123 4567 résumé\t\ttabs  and   spaces", "if __name__ == '__main__':\n"]


@pytest.fixture(scope="module")
def converted(llama, qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    for model in (llama, qwen2):
        result = run("convert", "gguf", model, "--outtype", ",".join(TYPES), "--out", out, "-q")
        assert result.exit_code == 0, result.output + result.stderr
    return out


@pytest.fixture(scope="module")
def reference_logits(llama, qwen2, heldout_blocks):
    blocks = heldout_blocks[:4]
    out = {}
    for name, model in (("llama", llama), ("qwen2", qwen2)):
        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        with torch.inference_mode():
            out[name] = m(input_ids=blocks).logits
    return out


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype", TYPES)
def test_llamacpp_logits_match_transformers(converted, reference_logits, heldout_blocks, figures, arch, outtype):
    result = run_llamacpp(converted / f"{arch}-{LABELS[outtype]}.gguf", blocks=heldout_blocks[:4])
    m = compare_logits(reference_logits[arch], torch.from_numpy(result["logits"]))
    figures[f"gguf {arch} {LABELS[outtype]} llama.cpp vs transformers fp32"] = m
    for key, bound in TOLERANCE[outtype].items():
        assert (m[key] >= bound) if key == "top1_agreement" else (m[key] <= bound), (key, m)


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llamacpp_tokenizes_and_generates_like_transformers(converted, fixture_root, arch, request):
    model_dir = request.getfixturevalue(arch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    result = run_llamacpp(converted / f"{arch}-F16.gguf", texts=TEXTS, prompts=PROMPTS)
    assert result["tokens"] == [tok(t).input_ids for t in TEXTS]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        new = model.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1]:]
        expected.append(tok.decode(new, skip_special_tokens=True))
    assert result["greedy"] == expected


def test_metadata_round_trip(llama, qwen2, tmp_path):
    for model, arch in ((llama, "llama"), (qwen2, "qwen2")):
        out = tmp_path / f"{arch}.gguf"
        assert run("convert", "gguf", model, "--outtype", "q8_0", "--out", out, "-q").exit_code == 0
        meta = gguf_metadata(out)
        config = json.loads((model / "config.json").read_text())
        tok = AutoTokenizer.from_pretrained(model)
        expected = {
            "general.architecture": arch, "general.type": "model", "general.name": {"llama": "Llama", "qwen2": "Qwen2"}[arch],  # gguf-py naming from the folder, as llama.cpp
            "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0), "general.quantization_version": gguf.GGML_QUANT_VERSION,
            f"{arch}.context_length": config["max_position_embeddings"], f"{arch}.embedding_length": config["hidden_size"],
            f"{arch}.feed_forward_length": config["intermediate_size"], f"{arch}.block_count": config["num_hidden_layers"],
            f"{arch}.attention.head_count": 8, f"{arch}.attention.head_count_kv": 4, f"{arch}.attention.key_length": 32,
            f"{arch}.attention.value_length": 32, f"{arch}.attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
            f"{arch}.rope.freq_base": pytest.approx(10000.0), f"{arch}.vocab_size": config["vocab_size"],
            # the Llama fixture's tokenizer is GPT-2 style and adds BOS; the Qwen2 one is Qwen2 style, without BOS
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": {"llama": "gpt-2", "qwen2": "qwen2"}[arch],
            "tokenizer.ggml.bos_token_id": tok.bos_token_id, "tokenizer.ggml.eos_token_id": tok.eos_token_id,
            "tokenizer.ggml.padding_token_id": tok.pad_token_id, "tokenizer.ggml.add_bos_token": arch == "llama",
            "tokenizer.chat_template": tok.chat_template,
        }
        for key, value in expected.items():
            assert meta.get(key) == value, (key, meta.get(key))
        assert "general.size_label" in meta
        assert meta["tokenizer.ggml.tokens"][tok.convert_tokens_to_ids("<|im_end|>")] == "<|im_end|>"
        assert meta["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids("<|im_end|>")] == int(gguf.TokenType.CONTROL)
        assert len(meta["tokenizer.ggml.merges"]) > 1000
        names = {t.name for t in gguf.GGUFReader(out).tensors}
        assert ("output.weight" in names) == (arch == "llama")  # Qwen2 fixture ties its embeddings
        manifest = json.loads(out.with_name(out.name + ".workbench.json").read_text())
        assert manifest["steps"][-1]["verb"] == "convert-gguf" and out.name in manifest["files"]


# ---------------------------------------------------------------- bad input: one line, exit 2, no partial file

def one_error_line(result, message, folder):
    assert_one_line_error(result, 2, message)
    assert not [p.name for p in folder.iterdir() if p.suffix == ".gguf" or ".partial-" in p.name]


def test_unsupported_architecture_lists_the_supported(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    one_error_line(run("convert", "gguf", tmp_path / "gpt2", "--out", tmp_path),
                   "unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM", tmp_path)


def test_tokenizer_missing(llama, copy_of, tmp_path):
    model = copy_of(llama, "m")
    (model / "tokenizer.json").unlink()
    one_error_line(run("convert", "gguf", model, "--out", tmp_path), "tokenizer missing", tmp_path)


def test_quantized_input_is_refused(llama, copy_of, tmp_path):
    model = copy_of(llama, "m")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    (model / "config.json").write_text(json.dumps(config))
    one_error_line(run("convert", "gguf", model, "--out", tmp_path), "already quantized (fp8); convert the merged bf16", tmp_path)


def test_unknown_outtype(llama, tmp_path):
    one_error_line(run("convert", "gguf", llama, "--outtype", "q9_x", "--out", tmp_path), "unknown outtype q9_x; known: f32, f16", tmp_path)


def test_output_exists_without_force(llama, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    result = run("convert", "gguf", llama, "--out", out)
    assert result.exit_code == 2 and "use --force" in result.stderr and out.read_bytes() == b"mine"
    assert run("convert", "gguf", llama, "--out", out, "--force", "-q").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.engine
def test_split_files_load_in_llamacpp_as_the_whole_file_and_verify_vouches_for_every_part(llama, tmp_path, figures):
    """--split-max-size: a folder per type of llama.cpp's named parts, each at most the size asked for in tensor
    data, written directly (Q8_0) or split after llama.cpp's quantize (Q4_K_M); llama.cpp loads the first part
    with exactly the single file's logits; every part is read back; verify serves the folder, and its digest
    changes when any part does."""
    from workbench.manifest import content_digest, read_manifest

    blocks = [list(range(1, 65))]
    single = run("convert", "gguf", llama, "--outtype", "q8_0,q4_k_m", "--out", tmp_path / "one", "-q")
    split = run("convert", "gguf", llama, "--outtype", "q8_0,q4_k_m", "--out", tmp_path / "split", "--split-max-size", "1.5M", "-q")
    assert single.exit_code == split.exit_code == 0, split.output + split.stderr
    for label in ("Q8_0", "Q4_K_M"):
        folder = tmp_path / "split" / f"llama-{label}"
        parts = sorted(folder.glob("*.gguf"))
        assert [p.name for p in parts] == [f"llama-{label}-{i:05d}-of-{len(parts):05d}.gguf" for i in range(1, len(parts) + 1)]
        assert len(parts) >= 2 and all(sum(int(t.n_bytes) for t in gguf.GGUFReader(p).tensors) <= 1_500_000 for p in parts)
        step = read_manifest(folder)["steps"][-1]
        assert sorted(read_manifest(folder)["files"]) == [p.name for p in parts] and step["metrics"]["parts"] == len(parts)
        assert step["metrics"]["read_back"]["judged"] == step["metrics"]["read_back"]["tensors"] == 39
        whole = run_llamacpp(tmp_path / "one" / f"llama-{label}.gguf", blocks=blocks)["logits"]
        assert np.array_equal(run_llamacpp(parts[0], blocks=blocks)["logits"], whole), label
        figures[f"gguf {label} split at 1.5 MB"] = {"parts": len(parts), "largest_part_bytes": step["metrics"]["largest_part_bytes"]}
    folder = tmp_path / "split" / "llama-Q8_0"
    result = run("verify", folder, "--server", "llamacpp", "--reference", llama, "--report", tmp_path / "r", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["passed"] and report["artifact_sha256"] == content_digest(folder)
    parts = sorted(folder.glob("*.gguf"))
    last = parts[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    assert content_digest(folder) != report["artifact_sha256"]
    last.unlink()
    assert_one_line_error(run("verify", folder, "--server", "llamacpp", "--report", tmp_path / "r2"), 2,
                          f"1 of its {len(parts)} parts missing ({last.name})")


def test_a_split_size_that_is_not_one_is_refused_before_anything_is_written(llama, tmp_path):
    assert_one_line_error(run("convert", "gguf", llama, "--outtype", "q8_0", "--out", tmp_path, "--split-max-size", "big"), 2,
                          "'big' is not a size like 500MB, 2GB or 45G")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_no_partial_file(llama, copy_of, tmp_path):
    model = copy_of(llama, "m")
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-4096])  # truncated: caught before writing
    one_error_line(run("convert", "gguf", model, "--out", tmp_path), "truncated safetensors file", tmp_path)


def llamacpp_converter(model: Path, outtype: str, out: Path, *args: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist) on the same model."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "llamacpp_converter.py"
    done = subprocess.run([sys.executable, str(script), str(model), "--outtype", outtype, "--outfile", str(out), *args],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def assert_same_tensor_bytes(ours_path: Path, theirs_path: Path) -> dict:
    """Identical tensor names, types and bytes, and no metadata key of theirs missing from ours."""
    ours, theirs = gguf.GGUFReader(ours_path), gguf.GGUFReader(theirs_path)
    a, b = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert set(a) == set(b)
    for name in b:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(a[name].data.view(np.uint8), b[name].data.view(np.uint8)), name
    missing = set(theirs.fields) - set(ours.fields)
    assert not missing, missing
    return {"identical_tensors": f"{len(b)}/{len(b)}", "their_keys_missing_here": len(missing)}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_bytes_as_llamacpps_own_converter(converted, tmp_path, figures, arch, request):
    """F16 and Q8_0 of the trained fixtures, byte for byte as llama.cpp's own converter writes them."""
    for outtype, label in (("f16", "F16"), ("q8_0", "Q8_0")):
        theirs = llamacpp_converter(request.getfixturevalue(arch), outtype, tmp_path / f"theirs-{label}.gguf")
        figures[f"gguf {arch} {label} vs llama.cpp converter"] = assert_same_tensor_bytes(converted / f"{arch}-{label}.gguf", theirs)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_moe_same_bytes_as_llamacpps_own_converter(tiny_moe, tmp_path, figures, model_type):
    """Experts stacked into ffn_*_exps (Mixtral's w1/w3/w2 permuted as llama), routers kept in float32."""
    model = tiny_moe(model_type)
    ours = tmp_path / "ours.gguf"
    assert run("convert", "gguf", model, "--outtype", "q8_0", "--out", ours, "-q").exit_code == 0
    theirs = llamacpp_converter(model, "q8_0", tmp_path / "theirs.gguf")
    figures[f"gguf {model_type} (random) Q8_0 vs llama.cpp converter"] = assert_same_tensor_bytes(ours, theirs)
    routers = [t for t in gguf.GGUFReader(ours).tensors if t.name.endswith("ffn_gate_inp.weight")]
    assert len(routers) == 2 and all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in routers)


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("variant", ["trained", "rslora+patterns"])
def test_lora_adapter_gguf_in_llamacpp_matches_peft(llama, llama_lora, tmp_path, heldout_blocks, figures, variant):
    from peft import LoraConfig, PeftModel, get_peft_model

    adapter = llama_lora
    if variant != "trained":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False, target_modules=["q_proj", "k_proj", "down_proj"],
                            rank_pattern={"k_proj": 8}, alpha_pattern={"down_proj": 2})
        adapter = tmp_path / "adapter"
        get_peft_model(model, config).save_pretrained(adapter)
    base_gguf, lora_gguf = tmp_path / "base-F32.gguf", tmp_path / "lora-F32.gguf"
    assert run("convert", "gguf", llama, "--outtype", "f32", "--out", base_gguf, "-q").exit_code == 0
    result = run("convert", "gguf", llama, "--adapter", adapter, "--outtype", "f32", "--out", lora_gguf)
    assert result.exit_code == 0, result.stderr
    assert gguf_metadata(lora_gguf)["general.type"] == "adapter"
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32), adapter)
    with torch.inference_mode():
        ref = reference(input_ids=heldout_blocks[:4]).logits
    got = torch.from_numpy(run_llamacpp(base_gguf, blocks=heldout_blocks[:4], lora=lora_gguf)["logits"])
    m = compare_logits(ref, got)
    figures[f"gguf LoRA adapter ({variant}) in llama.cpp vs peft"] = m
    assert m["top1_agreement"] >= 0.99 and m["max_rel_error"] < 1e-3


def test_adapter_with_whole_tensors_is_refused(llama, llama_lora, copy_of, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])).save_pretrained(tmp_path / "a")
    one_error_line(run("convert", "gguf", llama, "--adapter", tmp_path / "a", "--out", tmp_path / "x.gguf"),
                   "llama.cpp LoRA adapters hold linear LoRA pairs only (lm_head.weight", tmp_path)


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_other_architectures_in_llamacpp(fixture_root, tmp_path, heldout_blocks, figures, arch):
    """Mistral (written as llama) and Qwen3 (q/k norms): random weights, so only the math is compared."""
    import shutil

    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                                  tie_word_embeddings=False, rms_norm_eps=1e-6)
    model_dir = tmp_path / arch
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    for p in (fixture_root / "tokenizer").iterdir():
        shutil.copy2(p, model_dir / p.name)
    out = tmp_path / f"{arch}.gguf"
    assert run("convert", "gguf", model_dir, "--outtype", "f32", "--out", out, "-q").exit_code == 0
    assert gguf_metadata(out)["general.architecture"] == {"mistral": "llama", "qwen3": "qwen3"}[arch]
    with torch.inference_mode():
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(input_ids=heldout_blocks[:2]).logits
    m = compare_logits(ref, torch.from_numpy(run_llamacpp(out, blocks=heldout_blocks[:2])["logits"]))
    figures[f"gguf {arch} (random weights) F32 llama.cpp vs transformers"] = m
    assert m["max_rel_error"] < 1e-3 and m["top1_agreement"] >= 0.99


@pytest.mark.slow
@pytest.mark.engine
def test_k_quants_report_their_real_bits_per_weight_and_fallbacks(converted, llama, tmp_path, figures):
    """After llama.cpp's quantize the file is read back: its real bits per weight, and each matrix stored in
    another type because its rows do not fit the K-quant block of 256 (here ffn_down, rows of 320)."""
    from transformers import AutoConfig

    from workbench.manifest import read_manifest

    fixture = next(converted.glob("*Q4_K_M.gguf"))
    census = read_manifest(fixture)["steps"][-1]["metrics"]
    assert census["fallbacks"] == [] and census["tensor_types"]["Q4_K"] > 0 and 4.5 < census["bits_per_weight"] < 8
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=2048, hidden_size=256, intermediate_size=320, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model_dir = tmp_path / "odd"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((llama / name).read_bytes())
    out = tmp_path / "odd-Q4_K_M.gguf"
    assert run("convert", "gguf", model_dir, "--outtype", "q4_k_m", "--out", out, "-q").exit_code == 0
    odd = read_manifest(out)["steps"][-1]["metrics"]
    assert sorted(f["tensor"] for f in odd["fallbacks"]) == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert all(f["type"] != "Q4_K" and "rows of 320 are not a multiple of Q4_K's block of 256" in f["why"] for f in odd["fallbacks"])
    figures["gguf Q4_K_M real bits per weight"] = {"fixture": census["bits_per_weight"], "ffn_320_rows": odd["bits_per_weight"],
                                                   "fallback_type": odd["fallbacks"][0]["type"]}



@pytest.mark.slow
@pytest.mark.engine
def test_every_file_is_read_back_by_gguf_py_against_the_source(converted, figures):
    """Every converted file (direct and llama.cpp's quantize types) was decoded tensor by tensor by gguf-py
    before it was renamed into place, every tensor judged: the direct types ~0 off gguf-py's own encoding of
    the source, the K-quants within their multiple of Q4_0's rounding error."""
    from workbench.manifest import read_manifest

    for path in sorted(converted.glob("*.gguf")):
        read = read_manifest(path)["steps"][-1]["metrics"]["read_back"]
        assert read["failures"] == [] and read["judged"] == read["tensors"] > 0 and read["not_judged"] == [], (path.name, read)
        assert read["max_gain_deviation"] < 0.05, (path.name, read)
        figures[f"gguf read-back {path.name}"] = {k: read[k] for k in ("tensors", "max_error", "where", "max_gain_deviation")}


def test_a_gguf_whose_block_scales_are_doubled_fails_its_read_back(llama, tmp_path):
    """The Q8_0 control (every ffn_down block scale x2, through gguf-py's writer-side reader) fails the read-back,
    naming each ffn_down at gain 2; the correct file passes with every tensor judged."""
    from functools import partial

    from controls import gguf_q8_0_scales_doubled
    from workbench.convert.plan import plan_conversion, source_data
    from workbench.convert.gguf_readback import read_back_gguf

    correct = tmp_path / "llama-Q8_0.gguf"
    assert run("convert", "gguf", llama, "--outtype", "q8_0", "--out", correct, "-q").exit_code == 0
    control, _ = gguf_q8_0_scales_doubled(correct, tmp_path / "control.gguf")
    plan = plan_conversion(llama)
    sources = {t.gguf_name: partial(source_data, plan, t) for t in plan.tensors}
    assert read_back_gguf([correct], sources).failures() == []
    failures = read_back_gguf([control], sources).failures()
    layers = json.loads((llama / "config.json").read_text())["num_hidden_layers"]
    assert len(failures) == layers and all(".ffn_down.weight (Q8_0)" in f and "gain 2.000" in f for f in failures), failures


def test_a_file_written_otherwise_than_meant_is_refused_and_not_left(llama, tmp_path, monkeypatch):
    """A write-path fault (every Q8_0 block scale doubled as it is encoded) fails `convert` with exit 1 at the
    read-back, and no output file is left."""
    from workbench.convert import writer

    encode = writer.encode

    def doubled(t, outtype):
        data, qtype = encode(t, outtype)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            blocks = data.reshape(-1, 34)
            blocks[:, :2] = (blocks[:, :2].copy().view(np.float16) * 2).view(np.uint8)
        return data, qtype

    monkeypatch.setattr(writer, "encode", doubled)
    out = tmp_path / "llama-Q8_0.gguf"
    result = run("convert", "gguf", llama, "--outtype", "q8_0", "--out", out)
    assert result.exit_code == 1 and "read-back: " in result.stderr and "gain 2.000" in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())

@pytest.mark.slow
@pytest.mark.engine
def test_imatrix_makes_iq_quants_closer_to_f16(llama, tmp_path, figures):
    """--imatrix: the importance matrix (mean input square per column, from the layer runner) reaches
    llama.cpp's quantize. On held-out text (the quality report's, 8 x 256 tokens) IQ3_S made with it is
    closer to the F16 file than without it (mean KL x0.81 on an AMX CPU, x0.83 on an AVX-512 one without
    AMX), the 4-bit types about the same (IQ4_XS x0.93 / x1.04, Q4_K_M x1.02 / x0.91: within this small
    model's noise), and IQ3_XXS, which llama.cpp makes only with one, converts."""
    from workbench.manifest import read_manifest
    from workbench.texts import evaluation_blocks

    plain, weighted = tmp_path / "plain", tmp_path / "imatrix"
    assert run("convert", "gguf", llama, "--outtype", "f16,q4_k_m,iq4_xs,iq3_s", "--out", plain, "-q").exit_code == 0
    result = run("convert", "gguf", llama, "--outtype", "q4_k_m,iq4_xs,iq3_s,iq3_xxs", "--imatrix", "--out", weighted, "-q")
    assert result.exit_code == 0, result.output + result.stderr
    meta = gguf_metadata(weighted / "llama-IQ3_XXS.gguf")
    assert meta["quantize.imatrix.entries_count"] == 28 and meta["quantize.imatrix.dataset"] == "default"
    options = read_manifest(weighted / "llama-Q4_K_M.gguf")["steps"][-1]["options"]["imatrix"]
    assert options["entries"] == 28 and (options["samples"], options["seq_len"]) == (32, 512)
    assert "imatrix" not in read_manifest(plain / "llama-Q4_K_M.gguf")["steps"][-1]["options"]
    blocks = evaluation_blocks(AutoTokenizer.from_pretrained(llama), 8, 256)
    f16 = torch.from_numpy(run_llamacpp(plain / "llama-F16.gguf", blocks=blocks)["logits"])

    def quality(path):
        m = compare_logits(f16, torch.from_numpy(run_llamacpp(path, blocks=blocks)["logits"]))
        return {"mean_kl_vs_f16": round(m["mean_kl"], 6), "top1_vs_f16": round(m["top1_agreement"], 4)}

    kl = {}
    for label in ("Q4_K_M", "IQ4_XS", "IQ3_S"):
        without, with_ = quality(plain / f"llama-{label}.gguf"), quality(weighted / f"llama-{label}.gguf")
        figures[f"gguf {label} llama vs F16, without / with imatrix"] = {
            **{f"{k} without": v for k, v in without.items()}, **{f"{k} with": v for k, v in with_.items()}}
        kl[label] = with_["mean_kl_vs_f16"] / without["mean_kl_vs_f16"]
    figures["gguf IQ3_XXS llama vs F16, with imatrix"] = quality(weighted / "llama-IQ3_XXS.gguf")
    assert kl["IQ3_S"] < 0.9 and kl["IQ4_XS"] < 1.1 and kl["Q4_K_M"] < 1.1, kl


def test_iq_types_that_need_an_imatrix_are_refused_without_one(llama, tmp_path):
    assert_one_line_error(run("convert", "gguf", llama, "--outtype", "iq3_xxs", "--out", tmp_path / "x.gguf"), 2,
                          "llama.cpp makes IQ3_XXS only with an importance matrix: add --imatrix")
    assert_one_line_error(run("convert", "gguf", llama, "--outtype", "q8_0", "--imatrix", "--out", tmp_path / "x.gguf"), 2,
                          "--imatrix applies to llama.cpp's quantize types")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.engine
def test_a_pre_tokenizer_llamacpp_does_not_name_is_refused_when_it_splits_differently(llama, copy_of, tmp_path):
    """Single-digit splitting (as some tokenizers do) is no pattern llama.cpp names: written as its 'default'
    pre-tokenizer, llama.cpp would tokenize differently from transformers, so nothing is written."""
    model = copy_of(llama)
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r" ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    assert_one_line_error(run("convert", "gguf", model, "--outtype", "f16", "--out", tmp_path / "out" / "m.gguf", "-q"), 2,
                          "llama.cpp's tokenizer for this byte-level BPE with an unnamed split pattern")
    assert not list((tmp_path / "out").glob("*"))


def _types_in(path: Path) -> dict[str, str]:
    """Each tensor's type in a GGUF file, as gguf-py reads it."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
@pytest.mark.engine
def test_tensor_types_are_chosen_as_llama_quantize_chooses_them(llama, tmp_path, figures):
    """--tensor-type (first matching pattern wins) and --output-tensor-type, in a file the workbench writes (Q8_0)
    and in one llama.cpp's quantize makes (Q4_K_M): each file holds exactly those types, is read back against the
    source, and records the choice in its manifest."""
    result = run("convert", "gguf", llama, "--outtype", "q8_0,q4_k_m", "--tensor-type", "attn_v=f16", "--tensor-type",
                 r"blk\.0\.ffn_down=bf16", "--tensor-type", "ffn_down=q8_0", "--output-tensor-type", "F16", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.stderr
    steps = {s["options"]["outtype"]: s for s in json.loads(result.stdout)}
    for outtype, rest in (("q8_0", "Q8_0"), ("q4_k_m", None)):
        types = _types_in(Path(steps[outtype]["output"]))
        matrices = {n: t for n, t in types.items() if n.endswith(".weight") and "norm" not in n}
        assert {t for n, t in matrices.items() if ".attn_v." in n} == {"F16"}, matrices
        assert matrices["blk.0.ffn_down.weight"] == "BF16" and matrices["output.weight"] == "F16", matrices
        assert {t for n, t in matrices.items() if ".ffn_down." in n and not n.startswith("blk.0.")} == {"Q8_0"}, matrices
        if rest:  # every other matrix in the file's own type
            assert {t for n, t in matrices.items() if not any(k in n for k in (".attn_v.", ".ffn_down.", "output."))} == {rest}
        assert steps[outtype]["options"]["tensor_types"] == {
            "patterns": [["attn_v", "f16"], [r"blk\.0\.ffn_down", "bf16"], ["ffn_down", "q8_0"]], "output": "f16"}
        assert not steps[outtype]["metrics"]["read_back"]["failures"]
        figures[f"gguf {outtype} with tensor types"] = {"tensor_types": str(steps[outtype]["metrics"]["tensor_types"]),
                                                        "bits_per_weight": steps[outtype]["metrics"]["bits_per_weight"]}


@pytest.mark.parametrize("args, message", [
    (["--outtype", "q8_0", "--tensor-type", "attn_x=q8_0"], "names no tensor of this model"),
    (["--outtype", "q8_0", "--tensor-type", "attn_v=q9_9"], "unknown GGML type 'q9_9'"),
    (["--outtype", "q8_0", "--tensor-type", "attn_v=q4_k"], "which the workbench writes itself"),
    (["--outtype", "q4_k_m", "--tensor-type", "attn_v(=q8_0"], "not a regular expression"),
    (["--outtype", "f16", "--output-tensor-type", "q6_k"], "which the workbench writes itself"),
])
def test_tensor_types_are_checked_before_anything_is_written(llama, tmp_path, args, message):
    assert_one_line_error(run("convert", "gguf", llama, *args, "--out", tmp_path / "out"), 2, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.engine
def test_imatrix_of_a_moe_gives_each_expert_its_own_columns(tmp_path, figures):
    """--imatrix on the trained Qwen3-MoE fixture: each stacked expert tensor's matrix holds its 16 experts'
    columns side by side, the size llama.cpp's quantize checks (it refuses any other), and IQ3_XXS, which
    llama.cpp makes only with a matrix, converts and is read back; experts differ in what reaches them."""
    import families as family_builder
    from workbench.convert.imatrix import importance_matrix
    from workbench.convert.plan import plan_conversion
    from workbench.manifest import read_manifest
    from workbench.options import Calibration

    model = family_builder.ensure_family("qwen3-moe")
    result = run("convert", "gguf", model, "--outtype", "q4_k_m,iq3_xxs", "--imatrix", "--out", tmp_path, "-q")
    assert result.exit_code == 0, result.output + result.stderr
    options = read_manifest(tmp_path / "qwen3-moe-IQ3_XXS.gguf")["steps"][-1]["options"]["imatrix"]
    plan = plan_conversion(model)
    stacks = {t.gguf_name: t.experts for t in plan.tensors if t.experts}
    assert len(stacks) == 6 and options["entries"] >= len(stacks)
    matrix = importance_matrix(model, {t.hf_name: t.gguf_name for t in plan.tensors if t.hf_name}, Calibration(samples=4, seq_len=128),
                               stacks=stacks)
    down = matrix.values["blk.0.ffn_down_exps.weight"].reshape(16, -1)  # experts x their 96 input columns
    gate = matrix.values["blk.0.ffn_gate_exps.weight"].reshape(16, -1)  # experts x the 256 hidden columns
    assert down.shape == (16, 96) and gate.shape == (16, 256) and (down > 0).all()
    assert np.std(gate.mean(1)) > 0  # the experts saw different tokens
    figures["gguf qwen3-moe imatrix"] = {"entries": options["entries"], "never_routed": options.get("experts_never_routed", 0),
                                        "IQ3_XXS bits_per_weight": read_manifest(tmp_path / "qwen3-moe-IQ3_XXS.gguf")["steps"][-1]["metrics"]["bits_per_weight"]}
