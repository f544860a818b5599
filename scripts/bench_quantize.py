"""Benchmark: FP8-static with `workbench quantize` (own code, vLLM's fp8 format) vs. llm-compressor's FP8
scheme (oneshot + save, compressed-tensors), same model, same calibration samples, in one run.

`workbench quantize` also measures the artifact against its source (the source and the emulated artifact
over the held-out text, in the same layer-by-layer walk); its manifest times each phase, so the ratio is
given without the report's passes and for the whole command.

    .venv/bin/python scripts/bench_quantize.py [--samples 16] [--seq-len 128] [--json out/bench_quantize.json]
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

LLMCOMPRESSOR_FP8 = """
import sys, time, torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.path.insert(0, sys.argv[1])
from workbench.texts import default_text, token_windows
model_dir, out, samples, seq_len = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ids = token_windows(AutoTokenizer.from_pretrained(model_dir), [default_text("calibration")], samples, seq_len, 0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
oneshot(model=model, dataset=data, recipe=[QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"])],
        max_seq_length=seq_len, num_calibration_samples=samples)
model.save_pretrained(out, save_compressed=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--model", type=Path, help="a model folder with a tokenizer (default: the synthetic 1.1B)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = args.model.absolute() if args.model else synthetic_model_with_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    samples, seq_len = str(args.samples), str(args.seq_len)
    try:
        warm(base)
        ours = measure([str(Path(sys.executable).parent / "workbench"), "quantize", str(base), "--method", "fp8",
                        "--samples", samples, "--seq-len", seq_len, "--out", str(work / "wb"), "-q",
                        # random weights: quality means nothing here, only time is measured
                        "--max-ppl-delta", "1e9", "--max-kl", "1e9", "--min-top1", "0"])
        phases = json.loads((work / "wb" / "workbench.json").read_text())["steps"][-1]["metrics"]["phase_seconds"]
        shutil.rmtree(work / "wb")
        warm(base)
        theirs = measure([sys.executable, "-c", LLMCOMPRESSOR_FP8, str(HERE.parent), str(base), str(work / "lc"), samples, seq_len])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    evaluation = phases.get("source_eval", 0) + phases.get("emulated_eval", 0) + phases.get("head", 0)
    summary = {
        "model": str(base), "calibration": f"{samples} x {seq_len} tokens",
        "workbench": {**ours, "phase_seconds": phases}, "llmcompressor_fp8": theirs,
        "ratio_total": round(ours["seconds"] / theirs["seconds"], 3),
        "ratio_without_quality_report": round((ours["seconds"] - evaluation) / theirs["seconds"], 3),
    }
    print(f"workbench quantize fp8-static: {ours['seconds']:.1f}s, peak RSS {ours['peak_rss_mib']:.0f} MiB "
          f"(of which quality report {evaluation:.1f}s)")
    print(f"llm-compressor FP8 oneshot + save: {theirs['seconds']:.1f}s, peak RSS {theirs['peak_rss_mib']:.0f} MiB")
    print(f"ratio {summary['ratio_without_quality_report']:.2f}x without the quality report, {summary['ratio_total']:.2f}x in all "
          "(issue #40's target: <= 1.0 in all)")
    save(args.json, summary)


if __name__ == "__main__":
    main()
