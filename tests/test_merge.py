"""`workbench merge` against peft's own unmerged PeftModel, one test per adapter feature, in float32.

Adapters other than the trained fixture one are made here with random LoRA factors
(init_lora_weights=False), so every update is large enough to show a wrong orientation or scale.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import run
from logits import compare_logits, model_logits

# fp32 merge vs. peft's unmerged fp32 forward: only summation order differs.
MAX_REL_ERROR_FP32 = 1e-5


def make_adapter(base, out, config: LoraConfig, resize_to=None, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # modules_to_save copies start equal to the base: move them
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


def peft_reference(base, adapter, blocks, resize_to=None):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    return model_logits(PeftModel.from_pretrained(model, adapter), blocks)


def merged_logits(base, adapter, out, blocks, *extra):
    result = run("merge", base, adapter, "--out", out, "--dtype", "fp32", *extra)
    assert result.exit_code == 0, result.output + result.stderr
    return model_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), blocks)


def check_equivalent(base, adapter, tmp_path, blocks, figures, label, resize_to=None):
    ref = peft_reference(base, adapter, blocks, resize_to)
    got = merged_logits(base, adapter, tmp_path / "merged", blocks)
    m = compare_logits(ref, got)
    figures[f"merge fp32 vs peft: {label}"] = m
    assert m["top1_agreement"] == 1.0
    assert m["max_rel_error"] < MAX_REL_ERROR_FP32
    return tmp_path / "merged"


def rand_lora(**kw) -> LoraConfig:
    return LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw)


def test_trained_fixture_adapter(llama, llama_lora, tmp_path, heldout_blocks, figures):
    check_equivalent(llama, llama_lora, tmp_path, heldout_blocks, figures, "trained LoRA r=8, all projections")


def test_rslora(llama, tmp_path, heldout_blocks, figures):
    adapter = make_adapter(llama, tmp_path / "a", rand_lora(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj"]))
    check_equivalent(llama, adapter, tmp_path, heldout_blocks, figures, "rsLoRA")


def test_rank_and_alpha_patterns(llama, tmp_path, heldout_blocks, figures):
    config = rand_lora(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 32},
    )
    adapter = make_adapter(llama, tmp_path / "a", config)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:  # the patterns took effect
        assert f.get_slice("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight").get_shape()[0] == 2
        assert f.get_slice("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").get_shape()[0] == 8
    check_equivalent(llama, adapter, tmp_path, heldout_blocks, figures, "rank_pattern/alpha_pattern")


def test_regex_target_modules(llama, tmp_path, heldout_blocks, figures):
    adapter = make_adapter(llama, tmp_path / "a", rand_lora(r=4, lora_alpha=8, target_modules=r".*\.layers\.[02]\.self_attn\.(q|v)_proj"))
    merged = check_equivalent(llama, adapter, tmp_path, heldout_blocks, figures, "regex target_modules")
    assert json.loads((merged / "workbench.json").read_text())["steps"][-1]["metrics"]["lora_modules_merged"] == 4


def test_layers_to_transform(llama, tmp_path, heldout_blocks, figures):
    config = rand_lora(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1, 3], layers_pattern="layers")
    adapter = make_adapter(llama, tmp_path / "a", config)
    merged = check_equivalent(llama, adapter, tmp_path, heldout_blocks, figures, "layers_to_transform")
    assert json.loads((merged / "workbench.json").read_text())["steps"][-1]["metrics"]["lora_modules_merged"] == 4


def test_dora(llama, tmp_path, heldout_blocks, figures):
    adapter = make_adapter(llama, tmp_path / "a", rand_lora(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]))
    merged = check_equivalent(llama, adapter, tmp_path, heldout_blocks, figures, "DoRA")
    assert json.loads((merged / "workbench.json").read_text())["steps"][-1]["metrics"]["dora_modules"] == 12


def test_fan_in_fan_out_conv1d(tmp_path, heldout_blocks, figures):
    """GPT-2 stores Conv1D weights as [in, out]; peft sets fan_in_fan_out for them."""
    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_embd=64, n_layer=2, n_head=4, n_positions=256)).save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "a", rand_lora(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]))
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    check_equivalent(base, adapter, tmp_path, heldout_blocks, figures, "fan_in_fan_out (GPT-2 Conv1D)")


def test_modules_to_save(llama, tmp_path, heldout_blocks, figures):
    adapter = make_adapter(llama, tmp_path / "a", rand_lora(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    merged = check_equivalent(llama, adapter, tmp_path, heldout_blocks, figures, "modules_to_save lm_head")
    assert json.loads((merged / "workbench.json").read_text())["steps"][-1]["metrics"]["tensors_replaced"] == 1


def test_resized_vocabulary(llama, tmp_path, heldout_blocks, figures):
    config = rand_lora(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    adapter = make_adapter(llama, tmp_path / "a", config, resize_to=2056)
    merged = tmp_path / "merged"
    ref = peft_reference(llama, adapter, heldout_blocks, resize_to=2056)
    got = merged_logits(llama, adapter, merged, heldout_blocks)
    m = compare_logits(ref, got)
    figures["merge fp32 vs peft: resized vocabulary 2048->2056"] = m
    assert m["top1_agreement"] == 1.0 and m["max_rel_error"] < MAX_REL_ERROR_FP32
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == 2056


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_tied_embeddings_are_untied_not_changed(qwen2, tmp_path, heldout_blocks, figures, target):
    """LoRA on one of a tied pair: the merge writes lm_head explicitly and never edits the shared tensor."""
    assert json.loads((qwen2 / "config.json").read_text())["tie_word_embeddings"] is True
    adapter = make_adapter(qwen2, tmp_path / "a", rand_lora(r=4, lora_alpha=8, target_modules=[target, "q_proj"]))
    merged = check_equivalent(qwen2, adapter, tmp_path, heldout_blocks, figures, f"tied embeddings, LoRA on {target}")
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    base_model = AutoModelForCausalLM.from_pretrained(qwen2, dtype=torch.float32)
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    unchanged = merged_model.get_output_embeddings() if target == "embed_tokens" else merged_model.get_input_embeddings()
    assert torch.equal(unchanged.weight, base_model.get_input_embeddings().weight)


def test_bf16_output_keeps_top1(llama, llama_lora, tmp_path, heldout_blocks, figures):
    """The default dtype is the base's (bf16); figures against the fp32 peft reference."""
    ref = peft_reference(llama, llama_lora, heldout_blocks)
    out = tmp_path / "merged"
    assert run("merge", llama, llama_lora, "--out", out).exit_code == 0
    step = json.loads((out / "workbench.json").read_text())["steps"][-1]
    assert step["options"]["dtype"] == "bfloat16"
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    got = model_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), heldout_blocks)
    m = compare_logits(ref, got)
    figures["merge bf16 vs peft fp32: trained LoRA"] = m
    assert m["top1_agreement"] >= 0.97
    assert step["metrics"]["self_check_max_rel_error"] < 1e-2  # bf16 rounding, ~2^-8



@pytest.mark.parametrize("fault", ["scale x2", "nan"])
def test_a_merge_whose_written_weights_miss_the_adapter_is_refused(llama, llama_lora, tmp_path, monkeypatch, fault):
    """Controls: the update added at twice its scale, or a NaN, in every merged tensor. The self-check (the
    written rows against W·x + s·B(A·x)) fails the merge with exit 1, and no output folder appears."""
    from workbench import lora

    add_to = lora.Delta.add_to

    def wrong(self, weight, adapter):
        add_to(self, weight, adapter)
        if fault == "nan":
            weight.view(-1)[0] = float("nan")
        else:
            add_to(self, weight, adapter)

    monkeypatch.setattr(lora.Delta, "add_to", wrong)
    out = tmp_path / "merged"
    result = run("merge", llama, llama_lora, "--out", out)
    assert result.exit_code == 1 and "merge self-check failed" in result.stderr, result.stderr
    assert not out.exists() and not any(tmp_path.iterdir())

# ---------------------------------------------------------------- QLoRA: the base as training saw it

def qlora_reference(base, adapter, blocks, quant_type: str, double_quant: bool):
    """peft's unmerged forward on the base loaded 4-bit by transformers + bitsandbytes, each 4-bit weight
    dequantized by bitsandbytes and multiplied in float32: bitsandbytes' own CPU 4-bit matmul is float32-exact
    on AVX2 but not with AVX-512 (measured: top-1 99.6%, max rel. error 4e-3 against the same weights)."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu", dtype=torch.float32)
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            if module.bias is not None:
                dense.bias.data = module.bias.data.float()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, dense)
    return model_logits(PeftModel.from_pretrained(model, adapter), blocks)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_qlora_merge_equals_peft_on_the_4bit_base(llama, llama_lora, tmp_path, heldout_blocks, figures, quant_type, double_quant):
    ref = qlora_reference(llama, llama_lora, heldout_blocks, quant_type, double_quant)
    flags = ("--base-quant", quant_type, *(("--double-quant",) if double_quant else ()))
    faithful = compare_logits(ref, merged_logits(llama, llama_lora, tmp_path / "qlora", heldout_blocks, *flags))
    plain = compare_logits(ref, merged_logits(llama, llama_lora, tmp_path / "plain", heldout_blocks, "--base-quant", "none"))
    label = f"{quant_type}{' + double quant' if double_quant else ''}"
    figures[f"QLoRA merge ({label}) vs peft on the bitsandbytes 4-bit base"] = faithful
    figures[f"plain merge vs peft on the bitsandbytes 4-bit base ({label})"] = plain
    assert faithful["top1_agreement"] == 1.0 and faithful["max_rel_error"] < MAX_REL_ERROR_FP32
    assert plain["mean_kl"] > 100 * max(faithful["mean_kl"], 1e-12) and plain["max_rel_error"] > 10 * faithful["max_rel_error"]
    step = json.loads((tmp_path / "qlora" / "workbench.json").read_text())["steps"][-1]
    assert step["options"]["base_quant"].startswith(quant_type) and step["metrics"]["base_weights_requantized"] == 28


def test_a_4bit_base_named_by_the_adapter_is_merged_as_trained_with_a_warning(llama, llama_lora, copy_of, tmp_path):
    adapter = copy_of(llama_lora, "unsloth-style")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "unsloth/llama-3-8b-bnb-4bit"}))
    result = run("merge", llama, adapter, "--out", tmp_path / "m", "-q")
    assert result.exit_code == 0 and "a 4-bit base: merged onto the base quantized to nf4 + double quantization" in result.stderr
    step = json.loads((tmp_path / "m" / "workbench.json").read_text())["steps"][-1]
    assert step["options"]["base_quant"] == "nf4 + double quantization (bitsandbytes, block 64)"
    assert run("merge", llama, llama_lora, "--out", tmp_path / "x", "--double-quant").exit_code == 2


def test_lora_on_experts_of_another_shape_is_refused(tmp_path):
    """An adapter on the stacked experts (peft's target_parameters) whose update fits neither the base's
    gate/up nor its down projections: one line naming the shapes, nothing written."""
    from transformers import AutoConfig

    from conftest import TINY_MOE, assert_one_line_error, leftovers

    torch.manual_seed(0)
    shape = dict(TINY_MOE["qwen3_moe"], vocab_size=128)
    other = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **dict(shape, moe_intermediate_size=48)))
    get_peft_model(other, LoraConfig(r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])).save_pretrained(tmp_path / "lora")
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **shape)).save_pretrained(tmp_path / "base")
    result = run("merge", tmp_path / "base", tmp_path / "lora", "--out", tmp_path / "out")
    assert_one_line_error(result, 2, "LoRA update [96, 64] fits neither the experts' gate/up [64, 64] nor down [64, 32]")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
