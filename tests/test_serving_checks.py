"""What verify knows before an engine starts: which adapters an engine can serve unmerged, the chat facts
of an artifact (stop set, template tokens, BOS, rope-scaled context), the concurrency probe's prompts, and
the pipeline preflight. The engine runs are in test_verify.py."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import assert_one_line_error, run
from safetensors.torch import load_file, save_file

from workbench.engines import ENGINES, Layout, launch_defaults
from workbench.verify.adapters import check_adapter, engine_rank, parse_adapters
from workbench.verify.chat import ChatFacts, chat_facts, chat_prompt_problem, rope_original
from workbench.verify.load import _prefix_agreement, load_prompts
from workbench.preflight import preflight
from workbench.verify.probes import PROMPTS


def _adapter(tmp_path, llama_lora, name="ad", config=None, rename=None, extra=None):
    folder = tmp_path / name
    shutil.copytree(llama_lora, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if rename or extra:
        weights = load_file(folder / "adapter_model.safetensors")
        weights = {k.replace(*rename) if rename else k: v for k, v in weights.items()}
        weights.update(extra or {})
        save_file(weights, folder / "adapter_model.safetensors")
    return folder


def test_the_fixture_adapter_can_be_served_unmerged(llama, llama_lora):
    config = json.loads((llama / "config.json").read_text())
    for engine in ("vllm", "sglang"):
        adapter = check_adapter("ad", llama_lora, ENGINES[engine], config)
        assert adapter.reasons == () and adapter.rank == 8
    assert check_adapter("ad", llama_lora, ENGINES["llamacpp"], config).reasons


def test_adapters_engines_cannot_serve_unmerged_are_named_with_the_reason(llama, llama_lora, tmp_path):
    import torch

    config = json.loads((llama / "config.json").read_text())
    vllm = ENGINES["vllm"]
    dora = _adapter(tmp_path, llama_lora, "dora", {"use_dora": True, "modules_to_save": ["lm_head"], "r": 1024})
    reasons = " | ".join(check_adapter("dora", dora, vllm, config).reasons)
    assert "DoRA" in reasons and "modules_to_save" in reasons and "rank 1024 is above vllm's largest --max-lora-rank 512" in reasons
    resized = _adapter(tmp_path, llama_lora, "resized", extra={"base_model.model.model.embed_tokens.weight": torch.zeros(4, 4)})
    assert "full tensors" in check_adapter("resized", resized, vllm, config).reasons[0]
    odd = _adapter(tmp_path, llama_lora, "odd", rename=(".q_proj.", ".router."))
    assert check_adapter("odd", odd, vllm, config).reasons == ("vllm cannot adapt router",)
    pissa = _adapter(tmp_path, llama_lora, "pissa", {"init_lora_weights": "pissa_niter_4"})
    assert "changes the base weights" in check_adapter("pissa", pissa, vllm, config).reasons[0]


def test_engine_rank_is_the_smallest_accepted_value_that_fits():
    from workbench.verify.adapters import Adapter

    adapters = [Adapter("a", None, 8, ()), Adapter("b", None, 12, ())]
    assert engine_rank(ENGINES["vllm"], adapters) == 16  # vLLM takes 1, 8, 16, 32, ...
    assert engine_rank(ENGINES["sglang"], adapters) == 12


def test_adapter_options_are_checked_before_anything_starts(llama, llama_lora, tmp_path, copy_of):
    with pytest.raises(Exception, match="no adapter_config.json"):
        parse_adapters((f"x={tmp_path}",))
    assert list(parse_adapters((str(llama_lora),))) == ["llama-lora"]
    assert_one_line_error(run("verify", llama, "--server", "llamacpp", "--adapter", f"ad={llama_lora}"), 2,
                          "llamacpp does not serve adapters unmerged")
    base = copy_of(llama, "base")
    assert_one_line_error(run("verify", base, "--server", "vllm", "--adapter", f"a:b={llama_lora}"), 2, "adapter name: 'a:b' is not a name")


@pytest.mark.engine
def test_a_refused_adapter_fails_the_precheck_without_starting_the_engine(llama, llama_lora, tmp_path, copy_of):
    dora = _adapter(tmp_path, llama_lora, "dora", {"use_dora": True})
    base = copy_of(llama, "base")
    result = run("verify", base, "--server", "vllm", "--adapter", f"ok={llama_lora}", "--adapter", f"dora={dora}", "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    checks = report["runs"][0]["checks"]
    assert [c["name"] for c in checks] == ["adapter:dora"] and "DoRA" in checks[0]["detail"] and "merge" in checks[0]["detail"]
    assert report["adapters"]["ok"]["refused"] == [] and not (tmp_path / "base-verify" / "vllm" / "logs").exists()


def test_chat_facts_from_the_artifacts_own_files(llama, tmp_path, copy_of):
    facts = chat_facts(llama, json.loads((llama / "config.json").read_text()), generation_eos=(1, 4))
    assert facts.specials == {"<|im_start|>": 3, "<|im_end|>": 4}
    assert set(facts.stop_ids) == {1, 4} and facts.chat_ids[0] == 3 and facts.long_prompt is None
    # generation_config without the end-of-turn id: the template still puts it in the stop set
    facts = chat_facts(llama, {}, generation_eos=(1,))
    assert facts.stop_ids[4] == "the template's end of turn <|im_end|>"


def test_rope_scaled_models_get_a_prompt_past_their_original_context(llama, tokenizer):
    scaled = {"max_position_embeddings": 512, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4,
                                                                 "original_max_position_embeddings": 64}}
    assert rope_original(scaled)[0] == 64 and rope_original({"rope_scaling": None})[0] is None
    assert rope_original({"rope_scaling": {"type": "linear", "factor": 2.0}})[0] is None
    facts = chat_facts(llama, scaled)
    assert len(tokenizer(facts.long_prompt).input_ids) > 64 + 32 and facts.long_prompt.endswith(PROMPTS[0])


def test_chat_prompt_length_names_a_double_bos():
    facts = ChatFacts(chat_ids=(0, 5, 6), bos_id=0)
    assert chat_prompt_problem(facts, 3) is None
    assert chat_prompt_problem(facts, 4).startswith("double BOS")
    assert "gives 3" in chat_prompt_problem(facts, 7)
    assert "BOS 2 times" in chat_prompt_problem(ChatFacts(chat_ids=(0, 0, 6), bos_id=0), 3)


def test_concurrency_prompts_have_mixed_lengths_and_agreement_counts_characters():
    prompts = load_prompts(PROMPTS, 8)
    assert prompts[:4] == list(PROMPTS) and all(p.endswith(PROMPTS[i % 4]) for i, p in enumerate(prompts))
    assert len({len(p) for p in prompts}) == 8
    assert _prefix_agreement([("abcd", "abcd"), ("abcd", "abXX")]) == 6 / 8


def test_pipeline_preflight_and_binding_cover_every_rank(llama):
    config = json.loads((llama / "config.json").read_text())
    assert preflight(config, [1], pp=4)[1] == []
    assert preflight(config, [1], pp=5)[1] == ["num_hidden_layers 4 is fewer than pp 5 pipeline stages"]
    _, cpu_env, _ = launch_defaults(ENGINES["vllm"], Layout(1, 2, 1), (), {}, gpu=False, cpus=[0, 1, 2, 3])
    assert cpu_env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    # SGLang binds TP ranks only: with pipeline stages it places them itself
    _, cpu_env, _ = launch_defaults(ENGINES["sglang"], Layout(1, 2, 1), (), {}, gpu=False, cpus=[0, 1])
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in cpu_env and cpu_env["SGLANG_NCCL_SO_PATH"]
    assert_one_line_error(run("verify", llama, "--server", "llamacpp", "--pp", "2"), 2, "llamacpp has no pipeline parallelism")
