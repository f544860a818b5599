"""Shared test fixtures: the trained fixture models (built once, cached) and a CLI runner."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import fixtures as fixture_builder  # noqa: E402

from workbench.cli import cli  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fixture_root() -> Path:
    return fixture_builder.ensure_fixtures()


# random MoE models with the fixture tokenizer (transformers 5 holds their experts as stacked 3-D parameters,
# saves them one tensor per expert as the real checkpoints are)
TINY_MOE = {
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=2048),
    "mixtral": dict(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=2048),
}


@pytest.fixture
def tiny_moe(fixture_root, tmp_path):
    def build(model_type: str) -> Path:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        out = tmp_path / model_type
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY_MOE[model_type])).save_pretrained(out)
        for p in (fixture_root / "tokenizer").iterdir():
            shutil.copy2(p, out / p.name)
        return out

    return build


@pytest.fixture(scope="session")
def llama(fixture_root) -> Path:
    return fixture_root / "llama"


@pytest.fixture(scope="session")
def qwen2(fixture_root) -> Path:
    return fixture_root / "qwen2"


@pytest.fixture(scope="session")
def llama_lora(fixture_root) -> Path:
    return fixture_root / "llama-lora"


QUANTIZE_CALIBRATION = ("--samples", "32", "--seq-len", "128")


@pytest.fixture(scope="session")
def merged(llama, llama_lora, tmp_path_factory) -> Path:
    """The fixture's LoRA merged into the Llama (bf16), shared by the tests that serve it."""
    out = tmp_path_factory.mktemp("verify") / "llama-lora-merged"
    assert run("merge", llama, llama_lora, "--out", out).exit_code == 0
    return out


@pytest.fixture(scope="session")
def quantized_llama(llama, tmp_path_factory):
    """``make(recipe, format=None)``: the trained Llama quantized with that recipe (32 x 128 calibration
    samples; a recipe name ending in "-kv" with --kv-cache fp8), made once per session."""
    root = tmp_path_factory.mktemp("quantized")

    def make(recipe: str, fmt: str | None = None) -> Path:
        out = root / (recipe + (f"-{fmt}" if fmt else ""))
        if not out.exists():
            extra = (("--format", fmt) if fmt else ()) + (("--kv-cache", "fp8") if recipe.endswith("-kv") else ())
            result = run("quantize", llama, "--method", recipe.removesuffix("-kv"), *QUANTIZE_CALIBRATION, *extra, "--out", out)
            assert result.exit_code == 0, result.output + result.stderr
        return out

    return make


@pytest.fixture(scope="session")
def tokenizer(fixture_root):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixture_root / "tokenizer")


@pytest.fixture(scope="session")
def heldout_blocks(fixture_root, tokenizer) -> torch.Tensor:
    """Held-out text (never trained on) as 8 blocks of 128 tokens."""
    return fixture_builder.token_blocks(tokenizer, (fixture_root / "heldout.txt").read_text(), limit=8)


def run(*args: str):
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def copy_of(tmp_path):
    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or src.name)
        shutil.copytree(src, dst)
        return dst

    return _copy


def assert_one_line_error(result, code: int, message: str) -> None:
    """The error contract: exit ``code``, and exactly one stderr line, "error: ...", containing ``message``."""
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def leftovers(folder: Path) -> list[str]:
    """Names in a folder that a failed run must not leave: partial output folders."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or p.name.endswith("-merged"))


_FIGURES: dict[str, dict] = {}


@pytest.fixture(scope="session")
def figures() -> dict[str, dict]:
    """Measured figures; printed at the end of the run (they go into the issues' closing notes)."""
    return _FIGURES


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    terminalreporter.section("measured figures")
    for label, values in _FIGURES.items():
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        terminalreporter.write_line(f"{label}: {shown}")
