"""Task accuracy through lm-evaluation-harness: its `local-completions` model against the OpenAI completions API
of the engine verify started, and of the source served the same way (same engine and layout); every task's
metrics on both, and recovery per task and metric (artifact / source, source / artifact where lower is better).
lm-eval runs as a subprocess of this Python (the workbench's `eval` extra), so its imports and logging stay out
of the workbench; any lm-eval task works where its data can be fetched, and the shipped task reads its data
from the package (workbench/evals/, made by scripts/make_eval_task.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import BadInput, EnvironmentProblem
from .probes import Check

EVALS = Path(__file__).resolve().parents[1] / "evals"
# shipped tasks: lm-eval task configs whose data file is in EVALS
SHIPPED = {
    # four-way choice of the 6 characters that come next in held-out Python source
    "python_next_chars": {
        "dataset_path": "json", "data_file": "python_next_chars.jsonl", "output_type": "multiple_choice",
        "doc_to_text": "{{context}}", "target_delimiter": "", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    },
}
DEFAULT_MIN_RECOVERY = 0.95
LM_EVAL_TIMEOUT = 3600.0  # seconds per lm-eval run
CONCURRENT_REQUESTS = 4
TRANSFORMERS_BATCH = 8  # lm-eval's transformers model scores 8 requests at once (its default is one)


@dataclass(frozen=True)
class Evaluation:
    """What `verify --eval` asked for: lm-eval ``tasks`` (each run on at most ``limit`` documents), the gate, where
    lm-eval's files go, and the tokenizer folder lm-eval measures prompts with (None: there is none)."""

    tasks: tuple[str, ...]
    limit: int | None
    min_recovery: float
    folder: Path
    tokenizer: Path | None


def parse_tasks(value: str) -> list[str]:
    """The lm-eval task names of a comma-separated --eval value; none at all is a BadInput."""
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    if not tasks:
        raise BadInput(f"--eval {value!r}: name at least one lm-eval task")
    return tasks


def check_lm_eval() -> None:
    """Exit 3 before any engine starts when lm-eval is not importable here."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise EnvironmentProblem(f"--eval runs lm-evaluation-harness, which {sys.executable} lacks: "
                                 "pip install 'workbench[eval]' (or 'lm-eval[api]')")


def _task_folder(tasks: list[str], folder: Path) -> Path:
    """The shipped tasks among ``tasks`` as lm-eval task files in ``folder`` (their data file by absolute path)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        if name in SHIPPED:
            config = {k: v for k, v in SHIPPED[name].items() if k != "data_file"}
            config.update(task=name, test_split="test",
                          dataset_kwargs={"data_files": {"test": str(EVALS / SHIPPED[name]["data_file"])}})
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def served_model(base_url: str, model_name: str, tokenizer: Path) -> tuple[str, str]:
    """lm-eval's model for a server's OpenAI completions API (requests name ``model_name``; prompt and
    continuation lengths through ``tokenizer``, a model folder)."""
    return "local-completions", ",".join([f"model={model_name}", f"base_url={base_url}/v1/completions",
                                          f"tokenizer={tokenizer}", "tokenized_requests=False",
                                          f"num_concurrent={CONCURRENT_REQUESTS}", "max_retries=2"])


def transformers_model(folder: Path, dtype: str, adapter: Path | None = None) -> tuple[str, str]:
    """lm-eval's model for a folder run by transformers in this Python, with ``adapter`` through peft: a source no
    engine here serves as its artifact is served (llama.cpp loads GGUF files only; vLLM's CPU LoRA path fails
    prompt logprobs for a batch: "einsum(): subscript b has size 3 ... 253")."""
    return "hf", f"pretrained={folder},dtype={dtype}" + (f",peft={adapter}" if adapter else "")


def lm_eval_scores(model: tuple[str, str], tasks: list[str], out_dir: Path, limit: int | None = None) -> dict:
    """lm-eval's figures of every task on ``model`` (served_model or transformers_model): {"scores": {task:
    {metric: value}}, "higher_is_better": {task: {metric: bool}}, "seconds", "log"}. Raises EnvironmentProblem
    when lm-eval fails."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "lm_eval", "--model", model[0], "--model_args", model[1],
            "--tasks", ",".join(tasks), "--include_path", str(_task_folder(tasks, out_dir / "tasks")),
            "--output_path", str(out_dir / "results"), *(["--limit", str(limit)] if limit else []),
            *(["--device", "cpu", "--batch_size", str(TRANSFORMERS_BATCH)] if model[0] == "hf" else [])]
    log = out_dir / "lm-eval.log"
    t0 = time.monotonic()
    with log.open("w") as sink:
        done = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, timeout=LM_EVAL_TIMEOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    found = sorted((out_dir / "results").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if done.returncode != 0 or not found:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise EnvironmentProblem(f"lm-eval exited with code {done.returncode}: {tail[0]} (log {log})")
    results = json.loads(found[-1].read_text())
    scores = {task: {key.split(",")[0]: value for key, value in figures.items()
                     if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
              for task, figures in results["results"].items()}
    return {"scores": scores, "higher_is_better": results.get("higher_is_better", {}),
            "seconds": round(time.monotonic() - t0, 1), "log": str(log)}


def recovery_check(artifact: dict, source: dict | None, min_recovery: float, why_no_source: str = "") -> Check:
    """The "eval" check: every task's metrics recovered to at least ``min_recovery`` of the source's. Without the
    source's figures it is incomplete (accuracy alone proves nothing about what quantizing cost)."""
    if source is None:
        return Check("eval", "incomplete", f"no source figures to compare with: {why_no_source}",
                     metrics={"artifact": artifact["scores"]})
    if not any(artifact["scores"].values()):  # lm-eval reported no figure: nothing was compared
        return Check("eval", "incomplete", "lm-eval reported no figure for the artifact", metrics={"artifact": artifact["scores"]})
    table, short = {}, []
    short += [f"{task}: no figures for the artifact" for task in source["scores"] if not artifact["scores"].get(task)]
    for task, figures in artifact["scores"].items():
        for metric, value in figures.items():
            reference = source["scores"].get(task, {}).get(metric)
            higher = source["higher_is_better"].get(task, {}).get(metric, True)
            ratio = _ratio(value, reference, higher)
            table.setdefault(task, {})[metric] = {"artifact": value, "source": reference, "recovery": ratio}
            if not ratio >= min_recovery:  # a NaN or a missing figure is short too
                short.append(f"{task} {metric} {value:.4g} vs {reference} ({ratio:.1%})" if ratio == ratio
                             else f"{task} {metric}: no comparable source figure")
    shown = "; ".join(f"{t} {m} {r['artifact']:.4g} vs source {r['source']:.4g}: {r['recovery']:.1%} recovered"
                      for t, ms in table.items() for m, r in ms.items() if r["source"] is not None)
    status = "failed" if short else "passed"
    detail = f"{shown} (gate min_recovery {min_recovery})" + (f"; short: {', '.join(short)}" if short else "")
    return Check("eval", status, detail, metrics={"recovery": table, "min_recovery": min_recovery})


def _ratio(value: float, reference: float | None, higher_is_better: bool) -> float:
    if reference is None:
        return float("nan")
    if higher_is_better:
        return value / reference if reference else (1.0 if value == reference else float("inf"))
    return reference / value if value else (1.0 if value == reference else float("inf"))
