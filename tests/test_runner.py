"""The layer runner: its numbers equal transformers' whole-model forward, its statistics equal those of
the whole logits, and its peak memory does not grow with depth."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from logits import compare_logits
from workbench.quality import PairStats, next_token_targets
from workbench.runner import LayerRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_synthetic  # noqa: E402


def test_walk_equals_the_whole_model(llama, qwen2):
    ids = torch.randint(0, 2000, (5, 48), generator=torch.Generator().manual_seed(0))
    for model_dir in (llama, qwen2):
        with torch.inference_mode():
            whole = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(input_ids=ids).logits
        runner = LayerRunner(model_dir)
        streams = runner.streams(ids, batch=2)
        runner.walk(streams)
        normed = runner.normed(torch.cat([s.hidden for s in streams]))
        walked = torch.cat([block for _, (block,) in runner.logits(normed, rows=300)], -1).view_as(whole)
        assert torch.allclose(walked, whole, atol=1e-5, rtol=0), model_dir.name


def test_linear_weights_held_in_bfloat16_compute_exactly_the_float32_walk(llama):
    """A bf16 checkpoint's Linear weights held in bf16 and made float32 one module per call (the read-back's
    source layer): the same hidden states bit for bit as the float32 layer, at half its memory."""
    ids = torch.randint(0, 2000, (3, 40), generator=torch.Generator().manual_seed(2))
    plain, narrow = LayerRunner(llama), LayerRunner(llama, linear_storage=torch.bfloat16)
    assert plain.weights.checkpoint.dtype == torch.bfloat16
    outputs = []
    for runner in (plain, narrow):
        streams = runner.streams(ids)
        with runner.layer(1) as layer:
            held = {p.dtype for n, p in layer.named_parameters() if n.endswith("proj.weight")}
            norms = {p.dtype for n, p in layer.named_parameters() if "norm" in n}
            with torch.inference_mode():
                for s in streams:
                    runner.forward(layer, 1, s)
            assert {p.dtype for n, p in layer.named_parameters() if n.endswith("proj.weight")} == held  # put back after each call
        outputs.append((held, norms, torch.cat([s.hidden for s in streams])))
    assert outputs[0][:2] == ({torch.float32}, {torch.float32})
    assert outputs[1][:2] == ({torch.bfloat16}, {torch.float32})
    assert outputs[1][2].dtype == torch.float32 and torch.equal(outputs[0][2], outputs[1][2])


@pytest.mark.parametrize("kind", ["trained", "dora", "rslora-some-layers"])
def test_an_adapter_in_the_walk_is_pefts_own_unmerged_forward(llama, llama_lora, tmp_path, kind):
    """With an adapter the walk runs peft's LoRA layers (no code of the merge's): logits equal PeftModel's on
    the whole model, for the trained fixture adapter and random DoRA and rsLoRA ones on chosen layers."""
    from peft import LoraConfig, PeftModel, get_peft_model

    adapter = llama_lora
    if kind != "trained":
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=kind == "dora", use_rslora=kind != "dora",
                            target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=None if kind == "dora" else [0, 2])
        adapter = tmp_path / kind
        get_peft_model(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32), config).save_pretrained(adapter)
    ids = torch.randint(0, 2000, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
        plain = base(input_ids=ids).logits
        whole = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
    runner = LayerRunner(llama, adapter=adapter)
    streams = runner.streams(ids, batch=2)
    runner.walk(streams)
    normed = runner.normed(torch.cat([s.hidden for s in streams]))
    walked = torch.cat([block for _, (block,) in runner.logits(normed, rows=300)], -1).view_as(whole)
    assert (whole - plain).abs().max() > 0.05  # the adapter changes the answer
    assert torch.allclose(walked, whole, atol=1e-5, rtol=0), (walked - whole).abs().max()

def test_statistics_by_vocabulary_block_equal_those_of_the_whole_logits():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 20, 1000, generator=gen) * 4
    cand = ref + 0.1 * torch.randn(ref.shape, generator=gen)
    ids = torch.randint(0, 1000, (3, 20), generator=gen)
    stats = PairStats(60, next_token_targets(ids))
    for start in range(0, 1000, 77):
        stats.add(start, ref.view(60, -1)[:, start:start + 77], cand.view(60, -1)[:, start:start + 77])
    got, whole = stats.report(), compare_logits(ref, cand)
    # a block's sums are taken in float32 (quality.VocabStats), the running ones in float64
    for key in ("mean_kl", "top1_agreement", "max_rel_error"):
        assert got[key] == pytest.approx(whole[key], rel=1e-6), key
    log_p = torch.log_softmax(ref.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])
    assert got["ppl_source"] == pytest.approx(float(torch.exp(-log_p.mean())), rel=1e-6)


def _peak_rss_of_quantize(model: Path, out: Path, method: str) -> int:
    """Peak RSS (bytes) of `workbench quantize --method METHOD` on ``model``, in its own process."""
    argv = [str(Path(sys.executable).with_name("workbench")), "quantize", str(model), "--method", method, "--samples", "8",
            "--seq-len", "64", "--out", str(out), "-q", "--max-ppl-delta", "1e9", "--max-kl", "1e9", "--min-top1", "0"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss * 1024


def _peak_rss_of_read_back(artifact: Path, source: Path) -> int:
    """Peak RSS (bytes) of the read-back of ``artifact`` against ``source``, in its own process."""
    code = ("import sys, torch; from workbench.readback import read_back; "
            "assert not read_back(sys.argv[1], sys.argv[2], torch.randint(0, 2048, (4, 128))).failures()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(artifact), str(source)], stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss * 1024


@pytest.mark.slow
@pytest.mark.parametrize("method,depths", [("fp8", (2, 6)), ("gptq", (2, 8))])
def test_peak_memory_does_not_grow_with_depth(fixture_root, tmp_path, method, depths):
    """The same width at two depths: the extra layers are far more than one layer in float32 (FP8: the old
    whole-model path held ~9 bytes per parameter, +340 MB for 4 layers; GPTQ: llm-compressor's own whole-model
    load holds the 6 more layers in bf16, +113 MB); the walk, llm-compressor on the offloaded model and the
    read-back hold one layer at a time."""
    shape = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 8, "num_key_value_heads": 8,
             "vocab_size": 2048, "rope_theta": 10000.0, "max_position_embeddings": 512}
    peaks = {}
    for layers in depths:
        model = tmp_path / f"depth-{layers}"
        model.mkdir()
        config = make_synthetic.llama_config(**shape, num_hidden_layers=layers)
        make_synthetic.write_base(model, config)
        for p in (fixture_root / "tokenizer").iterdir():
            shutil.copy2(p, model / p.name)
        peaks[layers] = _peak_rss_of_quantize(model, tmp_path / f"{method}-{layers}", method)
        peaks[f"read-back {layers}"] = _peak_rss_of_read_back(tmp_path / f"{method}-{layers}", model)
    layer_fp32 = sum(o * i for o, i in make_synthetic.projections(make_synthetic.llama_config(**shape)).values()) * 4
    shallow, deep = depths
    assert peaks[deep] - peaks[shallow] < layer_fp32, (peaks, layer_fp32)
    assert peaks[f"read-back {deep}"] - peaks[f"read-back {shallow}"] < layer_fp32, (peaks, layer_fp32)


def test_an_adapter_the_walk_cannot_run_through_peft_is_named_before_any_run(llama_lora, tmp_path):
    """LoRA on decoder layers only: an adapter that also trains whole modules gets the reason (verify then
    compares its merge with itself and says so), the fixture adapter none."""
    import json
    import shutil

    from workbench.runner import peft_walk_refusal

    assert peft_walk_refusal(llama_lora) is None
    adapter = shutil.copytree(llama_lora, tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    assert "also trains ['lm_head']" in peft_walk_refusal(adapter)
