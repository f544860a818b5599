"""Benchmark at real sizes: a Llama-3.1-8B-shaped synthetic checkpoint (its real config, random bf16
weights, ~16 GB) and an r=16 LoRA through every verb that reads a whole model, each in its own process
(wall time, peak RSS), beside llm-compressor's FP8 oneshot on the same model and samples; then a release
of the merge run twice (the second fully cached). With --shape llama-70b-slice: four layers of a 70B's
width, FP8 with its report only.

    .venv/bin/python scripts/bench_scale.py [--shape llama-3.1-8b] [--layers N] [--samples 16] [--seq-len 128] [--json F]

Needs ~40 GB free disk for the 8B (each output is removed once measured). Targets (issue 12): FP8 with its
report <= 4 GiB peak (70B slice: 8 GiB), merge <= 1.5 GiB, verify reference <= 4 GiB, cached re-run <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_quantize import LLMCOMPRESSOR_FP8  # noqa: E402
from benchlib import measure, save, synthetic_model_with_tokenizer, warm  # noqa: E402

WORKBENCH = str(Path(sys.executable).with_name("workbench"))
NO_GATES = ("--max-ppl-delta", "1e9", "--max-kl", "1e9", "--min-top1", "0")  # random weights: quality means nothing
REFERENCE = """
import sys
from workbench.verify.probes import PROMPTS, Reference
ref = Reference(sys.argv[1], "float32", PROMPTS, 24)
# scoring: the reference's own tokens (from its generation) and a changed continuation (one teacher-forced walk)
ref.score([(p, ref.greedy_ids[p][:8] + [13, 13]) for p in PROMPTS])
"""
RELEASE = """name: bench-scale
base: {base}
adapter: {adapter}
output: {out}
artifacts:
  merged:
    merge: {{dtype: auto}}
    require: checked
    reason: benchmark of the merge stage and its cache
"""


def attempt(name: str, argv: list[str], results: dict) -> None:
    """Measure one contender; a failure (e.g. out of memory) is recorded as its result."""
    try:
        results[name] = measure(argv)
    except SystemExit as exc:
        results[name] = {"failed": str(exc).splitlines()[-1][-300:]}
    print(f"{name}: {results[name]}", flush=True)


def merge(ctx: dict, results: dict) -> None:
    attempt("merge", [WORKBENCH, "merge", str(ctx["base"]), str(ctx["adapter"]), "--out", str(ctx["work"] / "merged"), "-q"], results)
    shutil.rmtree(ctx["work"] / "merged", ignore_errors=True)


def fp8(ctx: dict, results: dict) -> None:
    warm(ctx["base"])
    out = ctx["work"] / "fp8"
    attempt("quantize fp8 + report", [WORKBENCH, "quantize", str(ctx["base"]), "--method", "fp8", "--samples", ctx["samples"],
                                      "--seq-len", ctx["seq_len"], "--out", str(out), "-q", *NO_GATES], results)
    if (out / "workbench.json").exists():
        results["quantize fp8 + report"]["phase_seconds"] = json.loads((out / "workbench.json").read_text())["steps"][-1]["metrics"]["phase_seconds"]
    shutil.rmtree(out, ignore_errors=True)


def llmcompressor(ctx: dict, results: dict) -> None:
    warm(ctx["base"])
    attempt("llm-compressor FP8 oneshot + save", [sys.executable, "-c", LLMCOMPRESSOR_FP8, str(HERE.parent), str(ctx["base"]),
                                                  str(ctx["work"] / "lc"), ctx["samples"], ctx["seq_len"]], results)
    shutil.rmtree(ctx["work"] / "lc", ignore_errors=True)


def gguf(ctx: dict, results: dict) -> None:
    attempt("convert gguf q8_0", [WORKBENCH, "convert", "gguf", str(ctx["base"]), "--outtype", "q8_0",
                                  "--out", str(ctx["work"] / "q8.gguf"), "-q"], results)
    for p in ctx["work"].glob("q8.gguf*"):
        p.unlink()


def reference(ctx: dict, results: dict) -> None:
    attempt("verify reference (float32)", [sys.executable, "-c", REFERENCE, str(ctx["base"])], results)


def release(ctx: dict, results: dict) -> None:
    spec = ctx["work"] / "release.yaml"
    spec.write_text(RELEASE.format(base=ctx["base"], adapter=ctx["adapter"], out=ctx["work"] / "release"))
    attempt("release (merge)", [WORKBENCH, "release", str(spec), "-q"], results)
    attempt("release re-run, fully cached", [WORKBENCH, "release", str(spec), "-q"], results)
    shutil.rmtree(ctx["work"] / "release", ignore_errors=True)


CONTENDERS = {"merge": merge, "fp8": fp8, "llm-compressor": llmcompressor, "gguf": gguf, "reference": reference, "release": release}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=["llama-3.1-8b", "llama-70b-slice"])
    parser.add_argument("--samples", default="16")
    parser.add_argument("--seq-len", default="128")
    parser.add_argument("--layers", type=int, help="the shape's width with this many layers (peak memory does not "
                                                   "depend on depth: tests/test_runner.py)")
    parser.add_argument("--only", action="append", choices=list(CONTENDERS),
                        help="run these contenders (repeatable; default: all for the 8B, fp8 for a slice or --layers)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = synthetic_model_with_tokenizer(args.shape, args.layers)
    adapter = base.with_name(base.name + "-lora-r16")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=base.parent))
    results: dict = {}
    only = args.only or (list(CONTENDERS) if args.shape == "llama-3.1-8b" and not args.layers else ["fp8"])
    ctx = {"base": base, "adapter": adapter, "work": work, "samples": args.samples, "seq_len": args.seq_len}
    try:
        for name in only:
            CONTENDERS[name](ctx, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, theirs = results.get("quantize fp8 + report", {}), results.get("llm-compressor FP8 oneshot + save", {})
    if "seconds" in ours and "seconds" in theirs:
        phases = ours.get("phase_seconds", {})
        report = phases.get("source_eval", 0) + phases.get("emulated_eval", 0) + phases.get("head", 0)
        results["fp8 time ratio (with report)"] = round(ours["seconds"] / theirs["seconds"], 3)
        results["fp8 time ratio (without the report's passes)"] = round((ours["seconds"] - report) / theirs["seconds"], 3)
    save(args.json, {"shape": args.shape, "layers": args.layers, "calibration": f"{args.samples} x {args.seq_len}", "results": results})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
