"""FP8 on a GPU (issue 12): the workbench's own FP8 path with the layer runner on CUDA, and what the written
checkpoint computes through torch._scaled_mm (the fp8 GEMM that serving kernels run) against bf16. Needs
torch with CUDA; runs from the checkout (`PYTHONPATH=.`), no engine.

    python scripts/bench_gpu.py [--shape llama-3.1-8b] [--layers N] [--skip-synthetic] [--json F]

1. The trained Llama fixture quantized on the GPU: its quality figures and file digests, to set beside the
   CPU's (the CUDA path must compute what the CPU path does).
2. The synthetic checkpoint (scripts/make_synthetic.py) quantized on the GPU with its report (16 x 128
   calibration): wall time, phases, peak RSS, peak GPU memory (nvidia-smi, sampled).
3. Decoder layer 0's real inputs (the runner on the evaluation text, bf16) through each projection three
   ways: the bf16 GEMM of the source weight; torch._scaled_mm of the written fp8 weight with its static
   input scale (vLLM's load-time scale merge of fused shards applied); the workbench's emulation. Relative
   error of each against the float64 product, and the GEMM times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchlib import measure, save, synthetic_model_with_tokenizer  # noqa: E402

WORKBENCH = [sys.executable, "-m", "workbench"]
NO_GATES = ("--max-ppl-delta", "1e9", "--max-kl", "1e9", "--min-top1", "0")


class GpuMemory:
    """Peak used GPU memory (MiB) while open, sampled from nvidia-smi every 0.2 s."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _sample(self):
        while not self._stop.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            self.peak = max([self.peak, *map(int, out[:1])])

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def quantize(model: Path, out: Path, *extra: str) -> dict:
    with GpuMemory() as gpu:
        result = measure([*WORKBENCH, "quantize", str(model), "--method", "fp8", "--out", str(out), "-q", *extra])
    manifest = json.loads((out / "workbench.json").read_text())
    step = manifest["steps"][-1]
    result["peak_gpu_mib"] = gpu.peak
    result["metrics"] = {k: v for k, v in step["metrics"].items() if k != "ignored_layers"}
    result["files"] = manifest.get("files")
    return result


def fixture_llama() -> Path:
    done = subprocess.run([sys.executable, str(HERE / "fixtures.py"), "--path"], check=True, capture_output=True, text=True)
    return Path(done.stdout.split()[-1]) / "llama"


def timed(fn, repeats: int = 50) -> float:
    """Median milliseconds of fn() on the GPU."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def layer_inputs(runner, index: int, names: list[str]) -> dict[str, torch.Tensor]:
    """The inputs [tokens, in] each named projection of layer ``index`` gets on the evaluation text."""
    from transformers import AutoTokenizer

    from workbench.texts import evaluation_blocks

    streams = runner.streams(evaluation_blocks(AutoTokenizer.from_pretrained(runner.weights.checkpoint.path)))
    captured: dict[str, list] = {n: [] for n in names}
    for i in range(index + 1):
        with runner.layer(i) as layer:
            hooks = [layer.get_submodule(n).register_forward_pre_hook(
                lambda _m, args, n=n: captured[n].append(args[0].reshape(-1, args[0].shape[-1]))) for n in names] if i == index else []
            for s in streams:
                runner.forward(layer, i, s)
            for h in hooks:
                h.remove()
    return {n: torch.cat(parts) for n, parts in captured.items()}


def relative(y: torch.Tensor, exact: torch.Tensor) -> float:
    return float((y.double() - exact).norm() / exact.norm())


@torch.inference_mode()
def scaled_mm_check(base: Path, quantized: Path, index: int = 0) -> dict:
    from workbench.checkpoint import Checkpoint
    from workbench.quantize import fp8
    from workbench.runner import LayerRunner

    runner = LayerRunner(base, dtype=torch.bfloat16, device=torch.device("cuda"))
    prefix = runner.layer_prefix(index) + "."
    written_store = Checkpoint(quantized).store
    names = sorted({n.removeprefix(prefix).removesuffix(".weight_scale") for n in written_store.tensors
                    if n.startswith(prefix) and n.endswith(".weight_scale")})
    inputs = layer_inputs(runner, index, names)
    results = {}
    with runner.layer(index) as layer:
        source = {n: layer.get_submodule(n).weight.detach().clone() for n in names}
        written = {n: fp8.Quantized(*(written_store.get(f"{prefix}{n}.{t}").cuda() for t in ("weight", "weight_scale", "input_scale")))
                   for n in names}
        with fp8.emulated(layer, written):
            for n in names:
                x, w, m = inputs[n], source[n], layer.get_submodule(n)
                exact = x.double() @ w.double().T
                xq = (x.float() / m.act_scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
                a_scale, b_scale = m.act_scale.float().reshape(()), m.scale.float().reshape(())

                def scaled():
                    return torch._scaled_mm(xq, m.weight_fp8.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16)

                y_fp8, y_bf16, y_emulated = scaled(), x @ w.T, m(x)
                ms_bf16, ms_fp8 = timed(lambda: x @ w.T), timed(scaled)
                flops = 2 * x.shape[0] * w.shape[0] * w.shape[1]
                results[n] = {
                    "shape": f"[{x.shape[0]}, {w.shape[1]}] x [{w.shape[1]}, {w.shape[0]}]",
                    "rel_error_bf16": round(relative(y_bf16, exact), 6),
                    "rel_error_scaled_mm": round(relative(y_fp8, exact), 6),
                    "rel_error_emulation": round(relative(y_emulated, exact), 6),
                    "scaled_mm_vs_emulation": round(relative(y_fp8, y_emulated.double()), 6),
                    "ms_bf16": round(ms_bf16, 4), "ms_scaled_mm": round(ms_fp8, 4),
                    "speedup": round(ms_bf16 / ms_fp8, 2), "tflops_scaled_mm": round(flops / ms_fp8 / 1e9, 1),
                }
                print(n, results[n], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--skip-synthetic", action="store_true", help="the fixture only (steps 1 and 3 on it)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark runs on a GPU")
    summary: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        summary["fixture"] = quantize(fixture_llama(), work / "fixture-fp8")
        print("fixture:", json.dumps(summary["fixture"]), flush=True)
        summary["fixture_scaled_mm"] = scaled_mm_check(fixture_llama(), work / "fixture-fp8")
        save(args.json, summary)
        if not args.skip_synthetic:
            base = synthetic_model_with_tokenizer(args.shape, args.layers)
            summary["synthetic"] = {"shape": args.shape, "layers": args.layers,
                                    "quantize": quantize(base, work / "fp8", "--samples", "16", "--seq-len", "128", *NO_GATES)}
            print("synthetic:", json.dumps(summary["synthetic"]), flush=True)
            save(args.json, summary)
            summary["synthetic"]["scaled_mm_layer0"] = scaled_mm_check(base, work / "fp8")
    save(args.json, summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
