"""llama.cpp's own converter (convert_hf_to_gguf.py from the llama-cpp-python sdist on PyPI), for
comparisons in tests and benchmarks. The sdist is downloaded once into $WORKBENCH_HOME/cache.

    python scripts/llamacpp_converter.py MODEL --outtype f16 --outfile X.gguf [--pre gpt-2]

The converter recognises a tokenizer by hashing its output and refuses unknown ones ("BPE pre-tokenizer
was not recognized"); --pre tells it the name instead, which is what our fixtures' tokenizer is.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"


def converter_dir() -> Path:
    home = Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench"))
    root = home / "cache" / f"llama-cpp-python-{VERSION}-sdist"
    vendor = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (vendor / "convert_hf_to_gguf.py").exists():
        return vendor
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={VERSION}", "-d", str(root)], check=True)
    with tarfile.open(next(root.glob("*.tar.gz"))) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                   ("/gguf-py/" in m.name or "/conversion/" in m.name or m.name.endswith("convert_hf_to_gguf.py"))]
        tar.extractall(root, members=members, filter="data")
    return vendor


def main() -> None:
    args = sys.argv[1:]
    pre = "gpt-2"
    if "--pre" in args:
        i = args.index("--pre")
        pre = args[i + 1]
        del args[i:i + 2]
    vendor = converter_dir()
    sys.path[:0] = [str(vendor), str(vendor / "gguf-py")]
    import conversion.base as base  # the converter's own package

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    sys.argv = [str(vendor / "convert_hf_to_gguf.py"), *args]
    runpy.run_path(str(vendor / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
