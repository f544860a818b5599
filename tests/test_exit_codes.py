"""Exit codes and error lines that every command shares: internal errors (5, with the traceback in a log),
memory (3, with the figures), the names users type for --method, and the README's synopses against the
Click options."""

from __future__ import annotations

import json
import re
import struct

import click
import pytest
import torch

from conftest import ROOT, assert_one_line_error, run
from workbench.cli import cli
from workbench.errors import GIB, OutOfMemory, as_out_of_memory
from workbench.quantize.recipe import METHOD_ALIASES, load, shipped


def test_a_bug_exits_5_and_names_the_log_with_the_traceback(monkeypatch, tmp_path, llama):
    import workbench.inspection

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(workbench.inspection, "inspect", broken)
    result = run("inspect", llama)
    assert_one_line_error(result, 5, "internal error (ZeroDivisionError: division by zero); this is a workbench bug, traceback in ")
    log = result.stderr.strip().rsplit(" ", 1)[1]
    assert log.startswith(str(tmp_path / "home" / "logs")) and "in broken" in open(log).read()


def test_a_failed_allocation_is_out_of_memory_with_the_figures():
    try:
        torch.empty(2**50, dtype=torch.uint8)  # a real allocation the machine cannot make
    except RuntimeError as exc:
        oom = as_out_of_memory(exc, "loading x")
    assert isinstance(oom, OutOfMemory) and oom.exit_code == 3
    assert str(oom).startswith(f"out of memory loading x: needs ~{2**50 / GIB:.1f} GiB, ") and str(oom).endswith(" GiB available")
    assert as_out_of_memory(ValueError("bad shape"), "x") is None


@pytest.mark.parametrize("method", ["fp8", "gptq"])
def test_a_model_that_cannot_fit_is_refused_at_once_with_the_figures(llama, tmp_path, method):
    """A checkpoint whose header declares one decoder layer of 2^34 parameters (a sparse file: nothing is
    really stored). The layer runner holds one layer in float32 plus its fp8 copy: at least 5 bytes each;
    llm-compressor's GPTQ (on the offloaded model) one layer in bf16 and three float32 Hessians of 2^17 inputs."""
    model = tmp_path / "huge"
    model.mkdir()
    (model / "config.json").write_text((llama / "config.json").read_text())
    header = json.dumps({"model.layers.0.mlp.down_proj.weight": {"dtype": "BF16", "shape": [2**17, 2**17], "data_offsets": [0, 2**35]}}).encode()
    with open(model / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2**35)
    result = run("quantize", model, "--method", method, "--out", tmp_path / "out")
    assert_one_line_error(result, 3, "out of memory to quantize huge: needs ~")
    needs = float(result.stderr.split("needs ~")[1].split(" GiB")[0])
    assert needs >= {"fp8": 5 * 2**34, "gptq": 2 * 2**34 + 3 * 4 * 2**34}[method] / GIB
    assert "GiB available; it would take ~" in result.stderr and not (tmp_path / "out").exists()


def test_method_names_users_type():
    for alias, recipe in METHOD_ALIASES.items():
        assert load(alias, None).name == recipe
    assert {"fp8", "fp8-dynamic", "gptq", "awq", "w8a8", "int8"} <= set(shipped())
    help_text = run("quantize", "--help").output
    for name in ("fp8-static (or fp8)", "gptq-w4a16 (or gptq)", "awq-w4a16 (or awq)", "w8a8-int8 (or w8a8 / int8)", "fp8-dynamic"):
        assert name in " ".join(help_text.split()), name


def _synopses() -> dict[str, set[str]]:
    """Each command's synopsis lines in the README's code blocks (continuation lines joined): their options."""
    text = (ROOT / "README.md").read_text()
    found: dict[str, set[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("workbench "):
                continue
            while i + 1 < len(lines) and lines[i + 1].startswith(" "):  # a synopsis wrapped onto indented lines
                i += 1
                line += " " + lines[i]
            words = line.split()
            path = [w for w in words[1:4] if re.fullmatch(r"[a-z]+", w)]
            found.setdefault(" ".join(path), set()).update(re.findall(r"(?<![\w=-])(--[a-z][a-z0-9-]*|-q)\b", line))
    return found


def _command(path: str) -> click.Command:
    command = cli
    for word in path.split():
        command = command.commands[word]
    return command


def test_readme_synopses_match_the_click_options():
    synopses = _synopses()
    expected = {"merge", "quantize", "convert gguf", "verify", "inspect", "release", "engines list", "engines install"}
    assert expected <= set(synopses), set(synopses)
    for path in expected:
        params = [p for p in _command(path).params if isinstance(p, click.Option)]
        names = {o for p in params for o in p.opts}
        written = synopses[path]
        assert written <= names, (path, "in the README, not an option:", sorted(written - names))
        missing = [p.opts[-1] for p in params if not set(p.opts) & written]
        assert not missing, (path, "options the README's synopsis lacks:", missing)


UNHANDLED = {
    # Qwen3-Next / Qwen3.5: Gated DeltaNet linear-attention layers between the attention layers
    "hybrid": ({"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
                "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"]},
               "Qwen3NextForCausalLM has linear_attention layers"),
    # a vision-language wrapper around a language model
    "multimodal": ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                    "vision_config": {"model_type": "siglip_vision_model"}, "text_config": {"model_type": "gemma3_text"}},
                   "Gemma3ForConditionalGeneration is a multimodal model (vision_config)"),
}


@pytest.mark.parametrize("kind", list(UNHANDLED))
def test_every_verb_refuses_a_model_kind_it_cannot_handle_in_one_line(kind, llama, llama_lora, copy_of, tmp_path):
    """Weights of a real model under the config of a kind the workbench does not know: merge, quantize,
    convert, verify and a release all refuse it up front, exit 2, writing nothing."""
    fields, message = UNHANDLED[kind]
    model = copy_of(llama, "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **fields}))
    (tmp_path / "release.yaml").write_text("name: r\nbase: model\nartifacts:\n  q8: {gguf: q8_0, require: checked, reason: none}\n")
    calls = [("merge", model, llama_lora, "--out", tmp_path / "out"),
             ("quantize", model, "--method", "fp8", "--out", tmp_path / "out"),
             ("convert", "gguf", model, "--outtype", "f16", "--out", tmp_path / "out"),
             ("verify", model, "--server", "vllm"),
             ("release", tmp_path / "release.yaml", "--dry-run")]
    for args in calls:
        assert_one_line_error(run(*args), 2, f"not supported: {message}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "r-release").exists()
