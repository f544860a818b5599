"""Benchmark: `workbench merge` vs. peft's merge_and_unload() + save_pretrained() vs. a plain copy of the
base folder, on the ~1.1B synthetic Llama with an r=16 adapter on every projection, in one run.

Each contender runs as its own process after a warm-up read of the inputs (all start with the files in
the page cache); wall time and peak RSS (the child's ru_maxrss) are printed as a table with ratios.

    .venv/bin/python scripts/bench_merge.py [--json out/bench_merge.json]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import measure, save, warm  # noqa: E402

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="500MB")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    # made in a child process: this parent stays small, since a forked child's ru_maxrss starts at the
    # parent's resident size
    made = subprocess.run([sys.executable, str(HERE / "make_synthetic.py")], check=True, capture_output=True, text=True)
    base, adapter = (Path(line) for line in made.stdout.split())
    largest_shard = max(p.stat().st_size for p in base.glob("*.safetensors"))
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=base.parent))
    bin_dir = Path(sys.executable).parent
    contenders = {
        "copy (cp -r)": ["cp", "-r", str(base), str(work / "copy")],
        "workbench merge": [str(bin_dir / "workbench"), "merge", str(base), str(adapter), "--out", str(work / "wb"), "-q"],
        "peft merge_and_unload": [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(work / "peft")],
    }
    results = {}
    try:
        for name, argv in contenders.items():
            warm(base, adapter)
            results[name] = measure(argv)
            print(f"  {name}: {results[name]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wb, peft, cp = results["workbench merge"], results["peft merge_and_unload"], results["copy (cp -r)"]
    rss_limit_mib = (1.5 * largest_shard + adapter_bytes) / 2**20
    summary = {
        "model": "synthetic TinyLlama-1.1B shape, bf16, r=16 LoRA on 7 projections x 22 layers",
        "largest_shard_mib": round(largest_shard / 2**20, 1),
        "adapter_mib": round(adapter_bytes / 2**20, 1),
        "results": results,
        "time_vs_peft": round(wb["seconds"] / peft["seconds"], 3),
        "time_vs_copy": round(wb["seconds"] / cp["seconds"], 3),
        "rss_vs_peft": round(wb["peak_rss_mib"] / peft["peak_rss_mib"], 3),
        "rss_vs_limit": round(wb["peak_rss_mib"] / rss_limit_mib, 3),
    }
    print(f"\n{'tool':24} {'wall s':>8} {'peak RSS MiB':>13}")
    for name, r in results.items():
        print(f"{name:24} {r['seconds']:8.2f} {r['peak_rss_mib']:13.1f}")
    print(f"\nworkbench/peft time {summary['time_vs_peft']:.2f}x (target <= 0.5)")
    print(f"workbench/copy time {summary['time_vs_copy']:.2f}x (target <= 2)")
    print(f"workbench peak RSS {wb['peak_rss_mib']:.0f} MiB = {summary['rss_vs_limit']:.2f}x of 1.5 x largest shard + adapter "
          f"({rss_limit_mib:.0f} MiB; target <= 1)")
    print(f"workbench/peft peak RSS {summary['rss_vs_peft']:.2f}x")
    save(args.json, summary)


if __name__ == "__main__":
    main()
