"""The tool as users get it: a wheel built from this checkout, installed with pip into a fresh virtual
environment (not editable), quantizes, converts and verifies on a real engine; `workbench engines`
lists and installs engine environments."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, run
from workbench.engines import ENGINES, install


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """(the built wheel, the bin folder of a fresh venv it was pip-installed into). The venv sees the test
    environment's packages after its own (a .pth line: only the wheel is installed, so nothing else of this
    checkout is; the editable install's hook is a .pth file there, which a path line does not run). Resolving the
    dependencies from the registry is what scripts/setup.sh does on every run; here it cost 60 of 70 s."""
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((root / "dist").glob("workbench-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    venv_python = str(root / "venv" / "bin" / "python")
    site = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "test-environment.pth").write_text("".join(f"{p}\n" for p in ours))
    subprocess.run([venv_python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    return wheel, root / "venv" / "bin"


def test_the_wheel_ships_the_recipes_as_package_data(wheel_venv):
    wheel, _ = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"workbench/recipes/{r}.yaml" for r in ("fp8-static", "fp8-dynamic", "gptq-w4a16", "awq-w4a16", "w8a8-int8")} <= set(names)
    # verify --eval's shipped task data, and the vLLM CLI that verify --nodes runs on a CPU
    assert {"workbench/evals/python_next_chars.jsonl", "workbench/engine_plugins/vllm_cli.py"} <= set(names)
    assert not any(n.startswith(("recipes/", "tests/", "scripts/")) for n in names)


@pytest.mark.slow
@pytest.mark.engine
def test_installed_wheel_quantizes_converts_and_verifies(wheel_venv, llama, tmp_path):
    _, bin_dir = wheel_venv
    workbench = str(bin_dir / "workbench")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def call(*args):
        result = subprocess.run([workbench, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    # run from outside the checkout: nothing may come from the source tree
    assert str(ROOT) not in subprocess.run([str(bin_dir / "python"), "-c", "import workbench; print(workbench.__file__)"],
                                           capture_output=True, text=True, cwd=tmp_path, env=env).stdout
    quantized = json.loads(call("quantize", llama, "--method", "fp8", "--samples", "8", "--seq-len", "64", "--out",
                                tmp_path / "fp8", "--json").stdout)
    assert quantized["options"]["recipe"] == "fp8-static" and quantized["status"] == "ok"
    call("convert", "gguf", llama, "--outtype", "q8_0", "--out", tmp_path / "m.gguf", "-q")
    report = json.loads(call("verify", tmp_path / "m.gguf", "--server", "llamacpp", "--json").stdout)
    assert report["verdict"] == "passed" and report["kind"] == "gguf-8bit"
    engines = {r["engine"]: r for r in json.loads(call("engines", "list", "--json").stdout)}
    assert engines["llamacpp"]["installed"] and engines["llamacpp"]["version"] == "0.3.36"


def test_engines_list_says_what_is_installed_and_where_it_was_found(tmp_path, monkeypatch):
    """An empty home has no engine; a finished-looking folder without an interpreter is not installed; an
    interpreter named by the environment variable is found through it and asked for its version."""
    real = ENGINES["llamacpp"].folder
    from workbench.engines import managed_folder

    llamacpp_python = managed_folder(ENGINES["llamacpp"]) / "bin" / "python"  # the engine scripts/setup.sh installed
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    for spec in ENGINES.values():
        monkeypatch.delenv(spec.python_env, raising=False)

    def rows():
        return {r["engine"]: r for r in json.loads(run("engines", "list", "--json").stdout)}

    listed = rows()
    assert sorted(listed) == ["llamacpp", "lmdeploy", "sglang", "vllm"]  # the four the README documents
    assert [r["engine"] for r in listed.values() if r["installed"]] == []
    assert {r["found_through"] for r in listed.values()} == {"this Python"}
    (tmp_path / "engines" / real).mkdir(parents=True)
    (tmp_path / "engines" / real / ".installed").touch()  # a marker, but no interpreter behind it
    assert rows()["llamacpp"] == {**rows()["llamacpp"], "installed": False, "found_through": "workbench engines install"}
    monkeypatch.setenv("WORKBENCH_LLAMACPP_PYTHON", str(llamacpp_python))
    row = rows()["llamacpp"]
    assert row["found_through"] == "$WORKBENCH_LLAMACPP_PYTHON" and row["python"] == str(llamacpp_python)
    assert row["installed"] and row["version"] == "0.3.36", row


def test_engine_install_that_fails_says_where_the_log_is(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    spec = dataclasses.replace(ENGINES["llamacpp"], folder="broken", requirements=("workbench-no-such-distribution==0.0.1",))
    with pytest.raises(Exception) as info:
        install(spec)
    assert info.value.exit_code == 3 and "installing llamacpp failed at `" in str(info.value)
    log = tmp_path / "engines" / "broken.install.log"
    assert str(log) in str(info.value) and "workbench-no-such-distribution" in log.read_text()
    assert not (tmp_path / "engines" / "broken" / ".installed").exists()


def test_engine_install_keeps_a_finished_environment_and_adds_a_pin_added_since(tmp_path, monkeypatch):
    """A finished environment (its marker written) is kept; a pinned requirement it lacks is pip-installed into it."""
    import click

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    spec = dataclasses.replace(ENGINES["llamacpp"], folder="kept", requirements=("--no-cache-dir", f"click=={click.__version__}"))
    folder = tmp_path / "engines" / "kept"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this Python, as that environment's
    (folder / "bin" / "python").chmod(0o755)
    (folder / ".installed").touch()
    said = []
    assert install(spec, said.append) == folder and said == [f"llamacpp: {folder} (kept)"]
    added = dataclasses.replace(spec, requirements=(*spec.requirements, "workbench-no-such-distribution==0.0.1"))
    with pytest.raises(Exception) as info:
        install(added, said.append)
    assert said[-1] == f"llamacpp: adding workbench-no-such-distribution==0.0.1 to {folder}"
    assert info.value.exit_code == 3 and "adding workbench-no-such-distribution==0.0.1 to llamacpp failed" in str(info.value)
