"""The one checkpoint I/O layer: every verb reads and writes Hugging Face folders through here.

Safetensors is simple enough (8-byte header length, JSON header, raw little-endian bytes) that reading
and writing it here costs less than working around the library: ``safetensors.save_file`` needs every
tensor of a file in memory at once, and ``safe_open`` maps whole shards into resident memory. Here the
layout (names, dtypes, shapes, shards) is planned from headers before any tensor is computed, each tensor
is read with a positional read, written as soon as it exists and dropped, and the output hashes come out
of the same pass. Files stay byte-compatible with the library (tests load them with it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadInput
from .options import CONFIG_DTYPE_NAMES
from .safety import check_remote_code, folder_file

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MANIFEST_NAME = "workbench.json"

# safetensors dtype codes: (torch's name for the dtype, bytes per element). Headers are read from this table
# alone, so describing a checkpoint (inspect, plans, estimates) does not import torch (~2 s); torch is imported
# where tensors are.
DTYPE_TABLE: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "I64": ("int64", 8), "I32": ("int32", 4),
    "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code."""
    import torch

    return getattr(torch, DTYPE_TABLE[code][0])


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    return next(code for code, (torch_name, _) in DTYPE_TABLE.items() if torch_name == name)


def config_dtypes() -> dict[str, torch.dtype]:
    """The torch dtype of each name the config's "dtype" field uses."""
    import torch

    return {name: getattr(torch, name) for name in CONFIG_DTYPE_NAMES}

# Files that make up a tokenizer; they travel together, never mixed from two folders.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"

LAYER_NAME = re.compile(r"(.*\.layers\.\d+)\.")  # a decoder layer's tensors in an HF checkpoint

# Never copied as side files: weights and the files that describe them.
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|ckpt|h5|msgpack)$|.*\.index\.json$")
_NOT_SIDE_FILES = {CONFIG_NAME, MANIFEST_NAME, "adapter_config.json"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file as its header describes it: name, dtype, shape, and where its bytes lie."""
    name: str
    code: str  # the safetensors dtype code (DTYPE_TABLE)
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in the file

    @property
    def dtype(self) -> torch.dtype:
        """The tensor's torch dtype (imports torch)."""
        return torch_dtype(self.code)

    @property
    def nbytes(self) -> int:
        """The size of the tensor's data in the file, in bytes."""
        return numel(self.shape) * DTYPE_TABLE[self.code][1]


def numel(shape: tuple[int, ...]) -> int:
    """The number of elements of a tensor of shape ``shape`` (1 for a scalar)."""
    n = 1
    for d in shape:
        n *= d
    return n


class TensorStore:
    """Lazy, read-only view over a set of safetensors files (one model or one adapter).

    Tensors are read with positional reads rather than a memory map, so resident memory holds the
    tensors in use, not every page of the shards read so far.
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            if not file.is_file():
                raise BadInput(f"weight file missing: {file}")
            for info in _read_header(file):
                if info.name in self.tensors:
                    raise BadInput(f"tensor {info.name} is stored twice ({self.tensors[info.name].file.name}, {file.name})")
                self.tensors[info.name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def total_bytes(self) -> int:
        """Bytes of every tensor, as stored."""
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def parameters(self) -> int:
        """Elements of every tensor."""
        return sum(numel(info.shape) for info in self.tensors.values())

    def names_in(self, file: Path) -> list[str]:
        """Tensor names of one file, in on-disk order (sequential reads)."""
        return [n for n, info in self.tensors.items() if info.file == file]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, whole, read into its own memory (not a mapping of the file); NaN/Inf refused."""
        import torch

        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        buf = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            if f.readinto(buf) != info.nbytes:
                raise BadInput(f"truncated safetensors file {info.file}")
        return _finite(info, torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (its first dimension), reading only their bytes."""
        import torch

        info = self.tensors[name]
        row_bytes = info.nbytes // max(info.shape[0], 1)
        stop = min(stop, info.shape[0])
        buf = bytearray(max(stop - start, 0) * row_bytes)
        with open(info.file, "rb") as f:
            f.seek(info.offset + start * row_bytes)
            if f.readinto(buf) != len(buf):
                raise BadInput(f"truncated safetensors file {info.file}")
        return _finite(info, torch.frombuffer(buf, dtype=info.dtype).reshape((stop - start, *info.shape[1:]))) if buf else \
            torch.empty((0, *info.shape[1:]), dtype=info.dtype)

    def take(self, name: str, indices: list[int]) -> torch.Tensor:
        """The given rows of a tensor, in the given order, reading only those rows (an embedding lookup)."""
        import torch

        info = self.tensors[name]
        row_bytes = info.nbytes // max(info.shape[0], 1)
        out = torch.empty((len(indices), *info.shape[1:]), dtype=info.dtype)
        flat = out.view(len(indices), -1).view(torch.uint8).numpy()
        with open(info.file, "rb") as f:
            for i, row in enumerate(indices):
                if not 0 <= row < info.shape[0]:
                    raise BadInput(f"row {row} outside {name} ({info.shape[0]} rows)")
                f.seek(info.offset + row * row_bytes)
                if f.readinto(memoryview(flat[i])) != row_bytes:
                    raise BadInput(f"truncated safetensors file {info.file}")
        return _finite(info, out)


# float8 bit patterns that are NaN (e4m3fn: exponent and mantissa all ones) or NaN/Inf (e5m2: exponent all ones)
_FP8_NON_FINITE = {"F8_E4M3": 0x7F, "F8_E5M2": 0x7C}


FINITE_CHUNK = 1 << 22  # elements per NaN/Inf check


def _finite(info: TensorInfo, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as read, or a one-line refusal when it holds NaN or Inf: every verb would carry them into
    its output while its checks (which compare with the same input) stay quiet. A chunk at a time, a screen
    first: a float chunk's sum is NaN or infinite whenever one of its values is (and, past float32's range,
    rarely when none is), so only a chunk whose sum is not finite is counted value by value. Counting every
    value (isfinite and a bool sum, which torch takes in int64) cost 13 of a read-back's 47 s at the 8B width."""
    import torch

    if info.code in _FP8_NON_FINITE:
        mask = _FP8_NON_FINITE[info.code]
        def non_finite(chunk):
            return (chunk.view(torch.uint8) & mask) == mask
        def suspect(chunk):
            return bool(non_finite(chunk).any())
    elif tensor.is_floating_point():
        def non_finite(chunk):
            return ~torch.isfinite(chunk)
        def suspect(chunk):
            return not bool(torch.isfinite(chunk.sum()))
    else:
        return tensor
    bad = sum(int(non_finite(chunk).sum()) for chunk in tensor.reshape(-1).split(FINITE_CHUNK) if suspect(chunk))
    if bad:
        raise BadInput(f"tensor {info.name} in {info.file} holds {bad} NaN/Inf values (at least); the model is damaged")
    return tensor


def _read_header(file: Path) -> list[TensorInfo]:
    """Parse and check one safetensors header: every tensor must lie inside the file."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"corrupt safetensors file {file}: {exc}") from None
    base = 8 + header_len
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            code = meta["dtype"]
            itemsize = DTYPE_TABLE[code][1]
            shape = tuple(int(d) for d in meta["shape"])
            start, stop = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"corrupt safetensors file {file}: bad entry for tensor {name}") from None
        if stop - start != numel(shape) * itemsize or start < 0:
            raise BadInput(f"corrupt safetensors file {file}: tensor {name} has the wrong byte length")
        if base + stop > size:
            raise BadInput(f"truncated safetensors file {file}: tensor {name} ends past the end of the file")
        entries.append(TensorInfo(name, code, shape, file, base + start))
    entries.sort(key=lambda e: e.offset)
    return entries


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a missing file, invalid JSON or a value that is not an object is a BadInput
    naming the file as ``what``."""
    if not path.is_file():
        raise BadInput(f"{what} missing: {path}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{what} is not valid JSON: {path}: {exc}") from None
    if not isinstance(value, dict):
        raise BadInput(f"{what} is not a JSON object: {path}")
    return value


class Checkpoint:
    """A Hugging Face model folder: config, weights (single or sharded safetensors) and side files."""

    def __init__(self, path: str | Path, code_check: bool = True):
        """``code_check``: refuse a folder that asks to run its own code (unless the user trusts it); off only
        for describing a folder (inspect), which runs nothing."""
        self.path = Path(path)
        if not self.path.is_dir():
            raise BadInput(f"model folder not found: {self.path}")
        self.config = read_json(self.path / CONFIG_NAME, "config.json")
        if code_check:
            check_remote_code(self.path)
        self.weight_files = self._weight_files()
        self.store = TensorStore(self.weight_files)

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
                raise BadInput(f"safetensors index has no weight_map of file names: {index}")
            return [folder_file(self.path, f, f"{index.name} entry") for f in dict.fromkeys(weight_map.values())]
        single = self.path / SINGLE_NAME
        if single.exists():
            return [folder_file(self.path, SINGLE_NAME, "weights")]
        found = sorted(self.path.glob("*.safetensors"))
        if found:
            return [folder_file(self.path, f.name, "weights") for f in found]
        if any(self.path.glob("*.bin")):
            raise BadInput(f"{self.path} holds only .bin weights; save it with safetensors first")
        raise BadInput(f"no safetensors weights in {self.path}")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most weight bytes are stored in (what "same as the base" means)."""
        return torch_dtype(self.dtype_code)

    @property
    def dtype_code(self) -> str:
        """The safetensors code of ``dtype``, read from the headers alone."""
        by_code: dict[str, int] = {}
        for info in self.store.tensors.values():
            if info.code in FLOAT_CODES:
                by_code[info.code] = by_code.get(info.code, 0) + info.nbytes
        return max(by_code, key=by_code.get) if by_code else "F32"

    @property
    def largest_file_bytes(self) -> int:
        """Size of the largest weight file: the shard size outputs keep by default."""
        return max(f.stat().st_size for f in self.weight_files)

    def side_files(self) -> list[str]:
        """The folder's files other than weights and config (tokenizer, generation config, ...)."""
        return side_files(self.path)


def side_files(folder: Path) -> list[str]:
    """Every file of a folder that is not weights, config or manifest (tokenizer, templates, code, ...);
    each must resolve inside the folder, since its content is copied into outputs."""
    return sorted(
        folder_file(folder, p.name, "file").name
        for p in folder.iterdir()
        if p.is_file() and p.name not in _NOT_SIDE_FILES and not _WEIGHT_FILE.match(p.name)
        and not p.name.startswith("adapter_")
    )


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 hex digest of a file, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FollowingHasher:
    """sha256 of a file while another writer appends to it: a worker thread reads behind the writer
    (from the page cache) so the hash is ready when the writing ends. The writer must only append, and
    flush what it wants hashed; ``finish()`` waits for the end of the file and returns the digest."""

    def __init__(self, path: Path, chunk: int = 1 << 22):
        import threading

        self._path, self._chunk = path, chunk
        self._done = threading.Event()
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        h = hashlib.sha256()
        try:
            with open(self._path, "rb") as f:
                while True:
                    block = f.read(self._chunk)
                    if block:
                        h.update(block)
                    elif self._done.is_set():
                        block = f.read()  # whatever was appended between the last read and the end
                        if not block:
                            break
                        h.update(block)
                    else:
                        self._done.wait(0.05)
            self._digest = h.hexdigest()
        except BaseException as exc:  # reported by finish()
            self._error = exc

    def finish(self) -> str:
        """The file's sha256, once the writer is done and the hasher has read to its end."""
        self._done.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of an output file as planned before it is computed: what its header entry needs."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """The size the tensor's data will take in the file, in bytes."""
        return numel(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


class StreamedWriter:
    """Writes planned shards tensor by tensor, in plan order, plus the index when there are several.

    ``write`` must be called once per planned tensor, in plan order; each call streams the bytes to disk.
    File hashes are computed on a worker thread (hashlib releases the GIL), overlapping the caller's work;
    at most PENDING_BYTES (plus the latest part) wait for it.
    """

    PENDING_BYTES = 256 << 20

    def __init__(self, folder: Path, shards: list[list[PlannedTensor]]):
        self.folder = folder
        self.shards = shards
        n = len(shards)
        self.file_names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.sha256: dict[str, str] = {}
        self._order = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self._next = 0
        self._file = None
        self._hash = None
        self._shard = -1
        self._hasher = ThreadPoolExecutor(1)
        self._pending: deque[tuple[Future, int]] = deque()
        self._pending_bytes = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor, whole."""
        self.write_parts(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def write_parts(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], parts) -> None:
        """Write one planned tensor from ``parts``, consecutive blocks of rows (never the whole at once)."""
        import torch

        shard, planned = self._order[self._next]
        if name != planned.name or dtype != planned.dtype or shape != planned.shape:
            raise RuntimeError(f"writer got {name} {dtype} {shape}, planned {planned.name} {planned.dtype} {planned.shape}")
        if shard != self._shard:
            self._finish_file()
            self._start_file(shard)
        written = 0
        for part in parts:
            data = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._file.write(memoryview(data))
            self._hash_later(data)
            written += data.nbytes
        if written != planned.nbytes:
            raise RuntimeError(f"writer got {written} bytes for {name}, planned {planned.nbytes}")
        self._next += 1
        if self._next == len(self._order):
            self._finish_file()
            self._write_index()

    def copy(self, store: "TensorStore", name: str, source: str | None = None, rows_per_part: int = 4096) -> None:
        """Copy a tensor unchanged from ``store`` (its ``source`` name), a block of rows at a time."""
        info = store.tensors[source or name]
        count = info.shape[0] if info.shape else 1
        parts = (store.rows(info.name, r, r + rows_per_part) for r in range(0, count, rows_per_part)) if info.shape \
            else [store.get(info.name)]
        self.write_parts(name, info.dtype, info.shape, parts)

    def _start_file(self, shard: int) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.shards[shard]:
            header[t.name] = {"dtype": dtype_code(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._shard = shard
        self._file = open(self.folder / self.file_names[shard], "wb")
        self._hash = hashlib.sha256()
        for part in (struct.pack("<Q", len(blob)), blob):
            self._file.write(part)
            self._hash_later(part)

    def _hash_later(self, data) -> None:
        """Hash on the worker; the caller waits while more than PENDING_BYTES (which the queue keeps alive) wait."""
        view = memoryview(data)
        self._pending.append((self._hasher.submit(self._hash.update, view), view.nbytes))
        self._pending_bytes += view.nbytes
        while len(self._pending) > 1 and self._pending_bytes > self.PENDING_BYTES:
            future, size = self._pending.popleft()
            future.result()
            self._pending_bytes -= size

    def _finish_file(self) -> None:
        if self._file is not None:
            self._file.close()
            while self._pending:
                self._pending.popleft()[0].result()
            self._pending_bytes = 0
            self.sha256[self.file_names[self._shard]] = self._hash.hexdigest()
            self._file = None
        if self.complete:
            self._hasher.shutdown()

    def _write_index(self) -> None:
        if len(self.shards) == 1:
            return
        weight_map = {t.name: self.file_names[i] for i, shard in enumerate(self.shards) for t in shard}
        total = sum(t.nbytes for shard in self.shards for t in shard)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    @property
    def complete(self) -> bool:
        """Whether every planned tensor has been written."""
        return self._next == len(self._order)


def replace_file(path: Path, data: str | bytes) -> None:
    """Write a small file so that readers see the old or the new content, never a part (temp + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def write_json(path: Path, value: dict) -> None:
    """Write ``value`` to ``path`` as JSON indented by 2, keys in their given order, with a final newline."""
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def copy_side_files(sources: list[tuple[Path, str]], folder: Path) -> None:
    """Copy the files (their content: a link inside the source folder is followed, one leading out refused)."""
    for src_dir, name in sources:
        shutil.copy2(folder_file(src_dir, name, "file"), folder / name)
