"""Benchmark: llm-compressor's methods at a real width. `workbench quantize --method M` (llm-compressor on the
offloaded model, one decoder layer in memory at a time, then the report and the read-back, layer by layer) beside
llm-compressor's plain whole-model oneshot + save, on the same model and calibration samples, at two depths of
the same width: peak memory must not grow with depth. Each contender runs in its own process (wall time, peak
RSS); ratios are of this one run.

    .venv/bin/python scripts/bench_methods.py [--shape llama-3.1-8b] [--layers 2 4] [--methods gptq awq w8a8 nvfp4-a16]
                                             [--samples 16] [--seq-len 128] [--json out/bench_methods.json]

Needs ~5 GB free disk per 4 layers of the 8B width. Target (issue 40): each method <= 3 GiB peak at the 8B width.
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

from benchlib import measure, save, synthetic_model_with_tokenizer, warm  # noqa: E402

WORKBENCH = str(Path(sys.executable).with_name("workbench"))
NO_GATES = ("--max-ppl-delta", "1e9", "--max-kl", "1e9", "--min-top1", "0")  # random weights: quality means nothing
# what a user of llm-compressor alone runs: the whole model loaded, the method's preset scheme, oneshot, save
WHOLE_MODEL_ONESHOT = """
import sys, torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.awq import AWQModifier
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.path.insert(0, sys.argv[1])
from workbench.texts import default_text, token_windows
model_dir, out, method, samples, seq_len = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
IntermediatesCache.pin_memory = lambda self, *a, **k: None  # torch refuses to pin without an accelerator
common = {"targets": "Linear", "ignore": ["lm_head"]}
recipe = {"gptq": lambda: [GPTQModifier(scheme="W4A16", **common)],
          "awq": lambda: [AWQModifier(scheme="W4A16_ASYM", **common)],
          "w8a8": lambda: [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme="W8A8", **common)],
          "nvfp4-a16": lambda: [QuantizationModifier(scheme="NVFP4A16", **common)]}[method]()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
kwargs = {}
if method != "nvfp4-a16":
    ids = token_windows(AutoTokenizer.from_pretrained(model_dir), [default_text("calibration")], samples, seq_len, 0)
    kwargs = {"dataset": Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}),
              "max_seq_length": seq_len, "num_calibration_samples": samples}
oneshot(model=model, recipe=recipe, **kwargs)
model.save_pretrained(out, save_compressed=True)
"""


def run_pair(base: Path, method: str, samples: str, seq_len: str, work: Path) -> dict:
    """The workbench's quantize (with its phases) and the whole-model oneshot, one after the other."""
    warm(base)
    ours = measure([WORKBENCH, "quantize", str(base), "--method", method, "--samples", samples, "--seq-len", seq_len,
                    "--out", str(work / "wb"), "-q", *NO_GATES])
    ours["phase_seconds"] = json.loads((work / "wb" / "workbench.json").read_text())["steps"][-1]["metrics"]["phase_seconds"]
    shutil.rmtree(work / "wb")
    warm(base)
    try:
        theirs = measure([sys.executable, "-c", WHOLE_MODEL_ONESHOT, str(HERE.parent), str(base), str(work / "lc"),
                          method, samples, seq_len])
    except SystemExit as exc:  # e.g. killed for memory: that is its result
        theirs = {"failed": str(exc)[:300]}
    shutil.rmtree(work / "lc", ignore_errors=True)
    return {"workbench": ours, "llmcompressor_whole_model": theirs,
            **({"ratio_seconds": round(ours["seconds"] / theirs["seconds"], 2),
                "ratio_peak": round(ours["peak_rss_mib"] / theirs["peak_rss_mib"], 2)} if "seconds" in theirs else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=["gptq", "awq", "w8a8", "nvfp4-a16"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    summary = {"shape": args.shape, "calibration": f"{args.samples} x {args.seq_len} tokens", "runs": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    try:
        for layers in args.layers:
            base = synthetic_model_with_tokenizer(args.shape, layers)
            for method in args.methods:
                result = run_pair(base, method, str(args.samples), str(args.seq_len), work)
                summary["runs"][f"{method}@{layers}"] = result
                ours, theirs = result["workbench"], result["llmcompressor_whole_model"]
                print(f"{method:10s} {layers} layers: workbench {ours['seconds']:7.1f} s {ours['peak_rss_mib']:7.0f} MiB | "
                      f"whole-model oneshot {theirs.get('seconds', float('nan')):7.1f} s "
                      f"{theirs.get('peak_rss_mib', float('nan')):7.0f} MiB", flush=True)
                save(args.json, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
