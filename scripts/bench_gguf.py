"""Benchmark: `workbench convert gguf` vs. llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python
sdist) on the ~1.1B synthetic Llama, F16 and Q8_0, wall time and peak RSS, in one run, as ratios.

The synthetic model gets the fixture tokenizer (2048 tokens, padded to the model's 32000 by both tools).
Each conversion runs in its own process after a warm-up read of the inputs.

    .venv/bin/python scripts/bench_gguf.py [--json out/bench_gguf.json]
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

from benchlib import measure, save, synthetic_model_with_tokenizer, warm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = synthetic_model_with_tokenizer()
    subprocess.run([sys.executable, str(HERE / "llamacpp_converter.py"), "--help"], check=True, capture_output=True)  # fetch once
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-", dir=base.parent))
    workbench = str(Path(sys.executable).parent / "workbench")
    results = {}
    try:
        for outtype in ("f16", "q8_0"):
            warm(base)
            results[f"workbench {outtype}"] = measure([workbench, "convert", "gguf", str(base), "--outtype", outtype,
                                                       "--out", str(work / f"wb-{outtype}.gguf"), "-q"])
            results[f"llama.cpp {outtype}"] = measure([sys.executable, str(HERE / "llamacpp_converter.py"), str(base),
                                                       "--outtype", outtype, "--outfile", str(work / f"lc-{outtype}.gguf")])
            print(f"  {outtype}: {results[f'workbench {outtype}']} vs {results[f'llama.cpp {outtype}']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"model": "synthetic TinyLlama-1.1B shape, bf16, 5 shards", "results": results}
    print(f"\n{'tool':18} {'wall s':>8} {'peak RSS MiB':>13}")
    for name, r in results.items():
        print(f"{name:18} {r['seconds']:8.2f} {r['peak_rss_mib']:13.1f}")
    for outtype in ("f16", "q8_0"):
        ours, theirs = results[f"workbench {outtype}"], results[f"llama.cpp {outtype}"]
        summary[f"{outtype}_time_ratio"] = round(ours["seconds"] / theirs["seconds"], 3)
        summary[f"{outtype}_rss_ratio"] = round(ours["peak_rss_mib"] / theirs["peak_rss_mib"], 3)
        print(f"{outtype}: workbench/llama.cpp time {summary[f'{outtype}_time_ratio']:.2f}x, "
              f"peak RSS {summary[f'{outtype}_rss_ratio']:.2f}x (targets <= 1.0)")
    save(args.json, summary)


if __name__ == "__main__":
    main()
