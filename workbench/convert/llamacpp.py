"""What the converter runs in the llama.cpp engine's environment (a subprocess, never imported here):
llama.cpp's own quantize for the K- and IQ-quants, and its tokenizer on the probe texts (the tokenizer proof)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from ..engines import ENGINES, check_installed
from ..errors import BadInput, EnvironmentProblem
from ..guard import set_parent_death_signal
from ..prompts import probe_texts
from ..safety import remote_code_trusted
from .gguf_tables import OUTTYPES, SPECIAL_PROBES, TOKENIZER_PROBES, ggml_type
from ..options import TensorTypes
from .plan import Plan


# llama.cpp's quantize through llama-cpp-python's C API. With an importance matrix (argv[5]: JSON with the
# .npz of per-tensor values and the metadata llama-quantize records): a NULL-terminated
# llama_model_imatrix_data array, and the quantize.imatrix.* keys as kv overrides. Tensor types (argv[6]: JSON of
# GGML type ids): the output and token embedding types, and a NULL-terminated llama_model_tensor_override array of
# (pattern, type), which llama.cpp searches in each tensor's name after its own choice (llama-quantize --tensor-type).
QUANTIZE_SCRIPT = """
import ctypes, json, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), int(sys.argv[4])
imatrix = json.loads(sys.argv[5])
if imatrix:
    import numpy as np
    values = np.load(imatrix["path"])
    arrays = {n: np.ascontiguousarray(values[n], dtype=np.float32) for n in values.files}
    entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for entry, (name, data) in zip(entries, arrays.items()):
        entry.name, entry.size = name.encode(), data.size
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    keys = [("quantize.imatrix.file", imatrix["file"]), ("quantize.imatrix.dataset", imatrix["dataset"]),
            ("quantize.imatrix.entries_count", len(arrays)), ("quantize.imatrix.chunks_count", imatrix["chunks"])]
    overrides = (llama_cpp.llama_model_kv_override * (len(keys) + 1))()
    for o, (key, value) in zip(overrides, keys):
        o.key = key.encode()
        if isinstance(value, int):
            o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        else:
            o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
types = json.loads(sys.argv[6])
if types["output"] is not None:
    params.output_tensor_type = types["output"]
if types["token_embedding"] is not None:
    params.token_embedding_type = types["token_embedding"]
if types["patterns"]:
    chosen = (llama_cpp.llama_model_tensor_override * (len(types["patterns"]) + 1))()
    for entry, (pattern, ggml_type) in zip(chosen, types["patterns"]):
        entry.pattern, entry.type = pattern.encode(), ggml_type
    params.tt_overrides = ctypes.cast(chosen, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def quantize_with_llamacpp(source: Path, target: Path, outtype: str, python: str, threads: int, imatrix: dict | None = None,
                           types: TensorTypes = TensorTypes()) -> None:
    """Quantize the GGUF ``source`` to ``target`` as ``outtype`` with llama.cpp's quantize (QUANTIZE_SCRIPT, run by
    ``python``, the llama.cpp engine's interpreter, on ``threads`` threads); ``imatrix``: the importance matrix
    as that script reads it, or None; ``types``: tensor types over the file type's (llama.cpp's tensor overrides,
    output and token embedding types). A failure is an EnvironmentProblem quoting the tail of its output."""
    ftype = int(OUTTYPES[outtype].file_type)
    type_of = lambda name: int(ggml_type(name, "tensor type")) if name else None  # noqa: E731
    chosen = {"patterns": [[p, type_of(t)] for p, t in types.patterns], "output": type_of(types.output),
              "token_embedding": type_of(types.token_embedding)}
    result = subprocess.run([python, "-c", QUANTIZE_SCRIPT, str(source), str(target), str(ftype), str(threads), json.dumps(imatrix),
                             json.dumps(chosen)],
                            capture_output=True, text=True, preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL))
    if result.returncode != 0 or not target.exists():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-5:])
        raise EnvironmentProblem(f"llama.cpp quantize to {outtype} failed (exit {result.returncode}): {tail}")


TOKENIZE_SCRIPT = """
import json, sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
print(json.dumps([llm.tokenize(t.encode(), add_bos=False, special=special) for t, special in json.loads(sys.argv[2])]))
"""


def prove_tokenizer(plan: Plan, path: Path, python: str) -> list[dict]:
    """How llama.cpp's reading of a file's tokenizer differs from transformers on the probe texts (code, prose,
    digits, unicode, whitespace runs, text after a special token), for a tokenizer llama.cpp does not know to
    be transformers' (an unnamed pre-tokenizer split, written as its default; a SentencePiece model, which
    transformers runs as its own conversion): one entry per text split otherwise, empty when none is."""
    from transformers import AutoTokenizer

    check_installed(ENGINES["llamacpp"], python)
    hf = AutoTokenizer.from_pretrained(plan.model.path, trust_remote_code=remote_code_trusted())
    # text after a special token too: llama.cpp's SentencePiece tokenizer starts every such piece with a space
    marker = hf.eos_token or hf.bos_token
    probes = [(t, False) for t in TOKENIZER_PROBES] + ([(marker + t, True) for t in SPECIAL_PROBES] if marker else [])
    # and verify's own texts, special tokens read as llama.cpp's server reads them: verify then accepts exactly these
    probes += [(t, True) for t in probe_texts(hf)]
    done = subprocess.run([python, "-c", TOKENIZE_SCRIPT, str(path), json.dumps(probes)], capture_output=True,
                          text=True, preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL))
    if done.returncode != 0:
        raise EnvironmentProblem(f"llama.cpp could not read the written GGUF's tokenizer: {done.stderr.strip()[-300:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    differences = []
    for (text, _), got in zip(probes, theirs):
        expected = hf(text, add_special_tokens=False).input_ids
        if got != expected:
            differences.append({"text": text, "transformers": [hf.convert_ids_to_tokens(expected), expected],
                                "llamacpp": [hf.convert_ids_to_tokens(got), got]})
    return differences


def tokenizer_verdict(plan: Plan, differences: list[dict], on_event) -> None:
    """Refuse a file whose tokenizer llama.cpp splits otherwise, unless the user accepted that (then warn)."""
    if not differences:
        return
    first = differences[0]
    kind = ("SentencePiece" if plan.vocab.model == "llama" else
            f"byte-level BPE with an unnamed split pattern, written as {plan.vocab.pre!r},")
    line = (f"llama.cpp's tokenizer for this {kind} tokenizer splits {first['text'][:30]!r} differently from "
            f"transformers ({len(first['llamacpp'][1])} tokens vs {len(first['transformers'][1])})")
    if not plan.accept_tokenizer_difference:
        raise BadInput(f"{line}: not converted (--accept-tokenizer-difference writes it and records the difference)")
    on_event(f"warning: {line} and on {len(differences) - 1} more probe text(s); written as accepted, recorded in the manifest")
