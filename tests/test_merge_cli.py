"""`workbench merge` as a user meets it: output layout, side files, manifest, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import assert_one_line_error, leftovers, run
from workbench.checkpoint import sha256_file


def test_default_output_layout_and_manifest(llama, llama_lora, copy_of):
    adapter = copy_of(llama_lora, "my-lora")
    result = run("merge", llama, adapter)
    assert result.exit_code == 0, result.stderr
    out = adapter.parent / "my-lora-merged"
    assert "self-check:" in result.output and str(out) in result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "workbench.json"} <= names
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2  # sharded like the base
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((llama / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base_index["weight_map"])
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    manifest = json.loads((out / "workbench.json").read_text())
    step = manifest["steps"][-1]
    assert step["verb"] == "merge" and step["metrics"]["lora_modules_merged"] == 28
    assert step["inputs"]["adapter"]["files"]["adapter_model.safetensors"] == sha256_file(adapter / "adapter_model.safetensors")
    assert {"torch", "transformers", "peft", "safetensors"} <= set(step["versions"])
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / name), name
    assert leftovers(adapter.parent) == ["my-lora-merged"]


def test_tokenizer_and_chat_template_come_from_the_adapter(llama, llama_lora, copy_of, tmp_path):
    adapter = copy_of(llama_lora, "a")
    cfg = json.loads((adapter / "tokenizer_config.json").read_text())
    (adapter / "chat_template.jinja").write_text("{{ 'adapter template' }}")
    (adapter / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7, "do_sample": False}))
    cfg["model_max_length"] = 1234
    (adapter / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m"
    assert run("merge", llama, adapter, "--out", out).exit_code == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 1234
    assert (out / "chat_template.jinja").read_text() == "{{ 'adapter template' }}"
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7


def test_side_files_fall_back_to_the_base(llama, llama_lora, copy_of, tmp_path):
    adapter = copy_of(llama_lora, "a")
    for p in adapter.iterdir():
        if not p.name.startswith("adapter_"):
            p.unlink()
    out = tmp_path / "m"
    assert run("merge", llama, adapter, "--out", out).exit_code == 0
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        if (llama / name).exists():
            assert (out / name).read_bytes() == (llama / name).read_bytes(), name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id


def test_force_replaces_and_json_output(llama, llama_lora, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale").write_text("old")
    result = run("merge", llama, llama_lora, "--out", out, "--force", "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["output"] == str(out) and report["status"] == "ok"
    assert not (out / "stale").exists() and (out / "config.json").exists()


def test_warns_when_the_adapter_names_another_base(llama, llama_lora, copy_of, tmp_path):
    base = copy_of(llama, "other-base")
    result = run("merge", base, llama_lora, "--out", tmp_path / "m")
    assert result.exit_code == 0
    assert "warning: the adapter names its base" in result.stderr


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def assert_bad_input(result, message, parent):
    assert_one_line_error(result, 2, message)
    assert leftovers(parent) == [], leftovers(parent)


def small_llama_adapter(tmp_path, hidden):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def test_base_folder_missing(llama_lora, tmp_path):
    assert_bad_input(run("merge", tmp_path / "nope", llama_lora, "--out", tmp_path / "m"), "model folder not found", tmp_path)


def test_adapter_folder_missing(llama, tmp_path):
    assert_bad_input(run("merge", llama, tmp_path / "nope", "--out", tmp_path / "m"), "adapter folder not found", tmp_path)


def test_adapter_config_missing(llama, llama_lora, copy_of, tmp_path):
    adapter = copy_of(llama_lora, "a")
    (adapter / "adapter_config.json").unlink()
    assert_bad_input(run("merge", llama, adapter, "--out", tmp_path / "m"), "adapter_config.json missing", tmp_path)


@pytest.mark.parametrize("text, message", [("{broken", "not valid JSON"), ('{"peft_type": "LORA", "r": "8", "lora_alpha": 16}', "r must be a number")])
def test_adapter_config_malformed(llama, llama_lora, copy_of, tmp_path, text, message):
    adapter = copy_of(llama_lora, "a")
    (adapter / "adapter_config.json").write_text(text)
    assert_bad_input(run("merge", llama, adapter, "--out", tmp_path / "m"), message, tmp_path)


def test_adapter_trained_on_another_shape(llama, tmp_path):
    adapter = small_llama_adapter(tmp_path, hidden=128)
    assert_bad_input(run("merge", llama, adapter, "--out", tmp_path / "m"), "trained on another shape", tmp_path)


def test_adapter_for_modules_the_base_lacks(llama, llama_lora, copy_of, tmp_path):
    adapter = copy_of(llama_lora, "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "w_gate"]  # names the base has, plus one it has not: still complete
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert run("merge", llama, adapter, "--out", tmp_path / "ok").exit_code == 0
    shutil.rmtree(tmp_path / "ok")
    cfg["target_modules"] = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "k_proj", "lm_head"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert_bad_input(run("merge", llama, adapter, "--out", tmp_path / "m"), "no LoRA weights for 1 targeted modules", tmp_path)


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_truncated_safetensors(llama, llama_lora, copy_of, tmp_path, which):
    base, adapter = copy_of(llama, "b"), copy_of(llama_lora, "a")
    victim = sorted((base if which == "base" else adapter).glob("*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-1000])
    assert_bad_input(run("merge", base, adapter, "--out", tmp_path / "m"), "truncated safetensors file", tmp_path)


def test_output_exists_without_force(llama, llama_lora, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("mine")
    result = run("merge", llama, llama_lora, "--out", out)
    assert result.exit_code == 2 and "use --force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_output_location_not_writable(llama, llama_lora, tmp_path):
    (tmp_path / "file").write_text("")
    assert_bad_input(run("merge", llama, llama_lora, "--out", tmp_path / "file" / "m"), "cannot write output", tmp_path)


def test_unsupported_adapter_type(llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama)
    get_peft_model(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])).save_pretrained(tmp_path / "ia3")
    assert_bad_input(run("merge", llama, tmp_path / "ia3", "--out", tmp_path / "m"), "unsupported adapter type 'IA3'", tmp_path)


def test_unsupported_lora_option(llama, llama_lora, copy_of, tmp_path):
    adapter = copy_of(llama_lora, "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["layer_replication"] = [[0, 2], [1, 4]]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert_bad_input(run("merge", llama, adapter, "--out", tmp_path / "m"), "unsupported LoRA option layer_replication", tmp_path)
