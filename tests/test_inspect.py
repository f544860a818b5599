"""`workbench inspect`: what an artifact is, how it was made, and --check against its manifest."""

from __future__ import annotations

import json

import pytest

from conftest import run
from workbench.checkpoint import Checkpoint, numel


@pytest.fixture
def merged(llama, llama_lora, tmp_path):
    out = tmp_path / "merged"
    assert run("merge", llama, llama_lora, "--out", out, "-q").exit_code == 0
    return out


def flip_a_byte(path, offset=-10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_inspect_a_folder(merged, llama):
    result = run("inspect", merged, "--json", "--tp", "1,2,3")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["architecture"] == "LlamaForCausalLM" and info["dtype"] == "bfloat16" and info["shards"] == 3
    assert info["parameters"] == sum(numel(t.shape) for t in Checkpoint(llama).store.tensors.values())
    assert info["tp_preflight"]["2"] == [] and "num_attention_heads 8 not divisible by tp 3" in info["tp_preflight"]["3"][0]
    assert [s["verb"] for s in info["steps"]] == ["merge"] and info["steps"][0]["metrics"]["lora_modules_merged"] == 28


def test_check_catches_a_flipped_byte_a_missing_and_an_extra_file(merged):
    assert run("inspect", merged, "--check").exit_code == 0
    shard = sorted(merged.glob("model-*.safetensors"))[1]
    flip_a_byte(shard)
    result = run("inspect", merged, "--check")
    assert result.exit_code == 1 and f"{shard.name}: sha256 differs from the manifest" in result.stderr
    flip_a_byte(shard)  # back
    (merged / "notes.txt").write_text("x")
    (merged / "tokenizer.json").unlink()
    result = run("inspect", merged, "--check")
    assert result.exit_code == 1 and "tokenizer.json: missing" in result.stderr and "notes.txt: not in the manifest" in result.stderr


def test_inspect_and_check_a_gguf(llama, tmp_path):
    out = tmp_path / "m.gguf"
    assert run("convert", "gguf", llama, "--outtype", "q8_0", "--out", out, "-q").exit_code == 0
    info = json.loads(run("inspect", out, "--check", "--json").output)
    assert info["kind"] == "gguf" and info["file_type"] == "MOSTLY_Q8_0" and info["tensors"] == 39 and info["check"]["ok"]
    flip_a_byte(out)
    assert run("inspect", out, "--check").exit_code == 1


def test_inspect_imports_no_torch(merged, tmp_path):
    """Describing an artifact reads headers and manifests only: `workbench inspect --check` on a model folder and
    on a GGUF runs without torch, transformers or safetensors (0.27 s instead of 2.7 s here)."""
    import subprocess
    import sys

    gguf = tmp_path / "m.gguf"
    assert run("convert", "gguf", merged, "--outtype", "q8_0", "--out", gguf, "-q").exit_code == 0
    probe = ("import sys; from click.testing import CliRunner; from workbench.cli import cli\n"
             "for path in sys.argv[1:]:\n"
             "    assert CliRunner().invoke(cli, ['inspect', path, '--check', '--json']).exit_code == 0, path\n"
             "print(sorted({'torch', 'transformers', 'safetensors'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe, str(merged), str(gguf)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_check_without_a_manifest(llama, copy_of):
    model = copy_of(llama, "plain")
    result = run("inspect", model, "--check")
    assert result.exit_code == 2 and "no manifest to check against" in result.stderr
    assert run("inspect", model.parent / "nope").exit_code == 2


def test_input_digests_are_cached_by_stat_and_check_rehashes(merged, tmp_path):
    """A file changed in place with its size, mtime_ns and inode kept is not re-read by folder_digest (that
    is the cache: a cached release stage reads no weights); `inspect --check` re-hashes and sees it."""
    import os

    from workbench.checkpoint import sha256_file
    from workbench.manifest import folder_digest

    shard = sorted(merged.glob("model-*.safetensors"))[0]
    before = folder_digest(merged)["files"][shard.name]
    assert before == sha256_file(shard)
    st = shard.stat()
    with open(shard, "r+b") as f:  # same inode, same size
        f.seek(-10, os.SEEK_END)
        byte = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert folder_digest(merged)["files"][shard.name] == before  # from the cache
    assert run("inspect", merged, "--check").exit_code == 1
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new mtime: hashed again
    assert folder_digest(merged)["files"][shard.name] == sha256_file(shard) != before
