"""The checkpoint I/O layer: byte compatibility with the safetensors library, sharding, corruption
detection, atomic output folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workbench.checkpoint import (
    INDEX_NAME,
    Checkpoint,
    PlannedTensor,
    StreamedWriter,
    TensorStore,
    plan_shards,
    sha256_file,
)
from workbench.errors import BadInput
from workbench.outputs import atomic_output_dir
from workbench.safety import OWNED_MARKER, claim

TENSORS = {
    "a.weight": torch.randn(64, 32).to(torch.bfloat16),
    "b.weight": torch.randn(128, 64),
    "c.bias": torch.arange(7, dtype=torch.int64),
    "d.scale": torch.tensor(0.5),
    "e.fp8": torch.randn(16, 16).to(torch.float8_e4m3fn),
}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def write(folder, tensors, max_bytes):
    planned = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = StreamedWriter(folder, plan_shards(planned, max_bytes))
    for n, t in tensors.items():
        writer.write(n, t)
    assert writer.complete
    return writer


def test_streamed_shards_load_with_the_safetensors_library(tmp_path):
    writer = write(tmp_path, TENSORS, max_bytes=10_000)
    assert len(writer.file_names) == 3  # 4 KiB + 32 KiB + the small rest
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    assert set(index["weight_map"]) == set(TENSORS)
    for name, t in TENSORS.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), "pt") as f:
            got = f.get_tensor(name)
        assert same_bytes(got, t)
    for name, digest in writer.sha256.items():
        assert sha256_file(tmp_path / name) == digest


def test_single_shard_has_no_index(tmp_path):
    writer = write(tmp_path, TENSORS, max_bytes=1 << 30)
    assert writer.file_names == ["model.safetensors"] and not (tmp_path / INDEX_NAME).exists()


def test_reader_reads_library_files_lazily(tmp_path):
    save_file({k: v for k, v in TENSORS.items()}, str(tmp_path / "x.safetensors"))
    store = TensorStore([tmp_path / "x.safetensors"])
    assert store.tensors["b.weight"].shape == (128, 64)
    for name, t in TENSORS.items():
        assert same_bytes(store.get(name), t)


def test_writer_refuses_a_tensor_out_of_plan(tmp_path):
    planned = [PlannedTensor("x", torch.float32, (2, 2))]
    writer = StreamedWriter(tmp_path, plan_shards(planned, 100))
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("x", torch.zeros(2, 3))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) - 100], "truncated"),
        (lambda b: b[:4], "corrupt"),
        (lambda b: b[:8] + b"{not json" + b[17:], "corrupt"),
    ],
)
def test_damaged_files_are_reported(tmp_path, damage, message):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(BadInput, match=message):
        TensorStore([path])


def test_checkpoint_needs_config_and_weights(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(BadInput, match="config.json missing"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BadInput, match="no safetensors weights"):
        Checkpoint(tmp_path)


def test_checkpoint_index_naming_a_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(BadInput, match="weight file missing"):
        Checkpoint(tmp_path)


def test_atomic_output_dir_renames_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        with atomic_output_dir(out, force=False) as tmp:
            (tmp / "half").write_text("x")
            1 / 0
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out, force=False) as tmp:
        (tmp / "done").write_text("1")
    assert (out / "done").read_text() == "1"
    with pytest.raises(BadInput, match="exists"):
        with atomic_output_dir(out, force=False):
            pass
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_output_dir_removes_leftovers_of_a_killed_run(tmp_path):
    """A dead process's partial folder goes when it carries the workbench's marker; a folder that merely has
    a partial's name (someone else's) is left alone."""
    dead, foreign = tmp_path / ".out.partial-999999999", tmp_path / ".out.partial-999999998"
    for folder in (dead, foreign):
        folder.mkdir()
        (folder / "data").write_text("x")
    claim(dead)
    with atomic_output_dir(tmp_path / "out", force=False) as tmp:
        assert (tmp / OWNED_MARKER).is_file()  # how the next run knows this one's leftovers
    assert not dead.exists() and (foreign / "data").read_text() == "x"
    assert not (tmp_path / "out" / OWNED_MARKER).exists()  # the finished output carries no marker


def test_atomic_output_dir_unwritable_location(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BadInput, match="cannot write output"):
        with atomic_output_dir(blocker / "out", force=False):
            pass
