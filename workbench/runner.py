"""The one place that runs a model: layer by layer from its checkpoint, in bounded memory.

The model is built by transformers with its parameters on the meta device (no memory); a decoder layer's
weights are read from the checkpoint through the project's tensor store when it runs and dropped after,
and every sample goes through that layer before the next one is read. Embedding rows are read for the
tokens in use only, lm_head a block of rows at a time, so peak memory is about one layer plus the hidden
states, whatever the depth. The model's own forward (run once per batch with every layer replaced by a
recorder) computes what each layer is given: scaled embeddings, masks per attention type, rotary
embeddings, the KV cache; so each family's forward code is transformers', not a copy.

Why not accelerate's disk offload: it pages weights in per forward call, so N sample batches read the
checkpoint N times; llm-compressor's sequential pipeline walks layer by layer but only inside its own oneshot
(which the workbench uses for llm-compressor's methods, on the model offloaded to disk: quantize/compressor.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import experts
from .checkpoint import LAYER_NAME, Checkpoint, numel, read_json
from .process import return_freed_memory
from .errors import BadInput
from .families import family_of
from .lora import PEFT_PREFIX, adapter_weights
from .safety import remote_code_trusted

COMPUTE_DTYPE = torch.float32


def serving_dtype(checkpoint) -> torch.dtype:
    """The dtype to run a model in to see what an engine computes with it: bfloat16 for a bfloat16 checkpoint
    (engines keep its activations in bfloat16; matmuls at bfloat16's speed, layers at half float32's memory),
    else float32 (float16's range is not safe for every model's activations on the CPU)."""
    return torch.bfloat16 if checkpoint.dtype == torch.bfloat16 else COMPUTE_DTYPE
HEAD_ROWS = 4096  # lm_head rows per block
STREAM_BATCH = 4  # sequences that go through a layer together
READ_BYTES_PER_SECOND = 1.0e9  # a walk's checkpoint reads (page cache or local NVMe), for the time estimate
BASE_RSS = int(0.8 * 2**30)  # torch + transformers imported, measured here: ~0.7 GiB


def compute_device() -> torch.device:
    """Where the layer runner computes: the CUDA GPU when torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Weights:
    """A checkpoint's tensors by name: whole, a block of rows, or chosen rows."""

    def __init__(self, model_dir: Path):
        self.checkpoint = Checkpoint(model_dir)
        self.store = self.checkpoint.store
        self.config = self.checkpoint.config

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def get(self, name: str) -> torch.Tensor:
        """One tensor of the checkpoint, whole, in its stored dtype."""
        return self.store.get(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor, reading only their bytes (lm_head blocks)."""
        return self.store.rows(name, start, stop)

    def take(self, name: str, indices: list[int]) -> torch.Tensor:
        """The given rows of a tensor, in that order (the embedding rows of the tokens in use)."""
        return self.store.take(name, indices)


class PeftAdapter:
    """A LoRA adapter applied by peft's own layers inside the walk: peft injects its LoRA modules (its forward:
    scaling, rsLoRA, DoRA) into the model on the meta device, and each layer's LoRA weights are read from the
    adapter file with the layer's base weights and dropped with them. Not lora.py's math: the merge writes
    that, and a reference must not share the code it judges."""

    NAME = "default"  # peft's adapter name, which it leaves out of the saved keys

    def __init__(self, model: nn.Module, adapter_dir: Path, layers_prefix: str):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig.from_pretrained(str(adapter_dir))
        refusal = peft_walk_refusal(adapter_dir)
        if refusal:
            raise BadInput(refusal)
        inject_adapter_in_model(config, model, adapter_name=self.NAME, low_cpu_mem_usage=True)
        model.eval()
        self.store = adapter_weights(adapter_dir)
        self.keys = {name: self._saved_key(name) for name, _ in model.named_parameters() if ".lora_" in name}
        outside = sorted(n for n in self.keys if not n.startswith(layers_prefix + "."))
        unplaced = sorted(set(self.store.tensors) - set(self.keys.values()))
        if outside or unplaced:
            raise BadInput(f"the peft reference cannot place adapter tensor {(outside or unplaced)[0]} in a decoder layer")

    def _saved_key(self, name: str) -> str:
        """peft's saved name of a parameter: its prefix, no adapter name, a DoRA magnitude without ".weight"."""
        key = PEFT_PREFIX + name.replace(f".{self.NAME}.", ".").removesuffix(f".{self.NAME}")
        for candidate in (key, key.removesuffix(".weight")):
            if candidate in self.store:
                return candidate
        raise BadInput(f"the adapter file has no {key} for peft's {name}")

    def get(self, name: str) -> torch.Tensor | None:
        """The adapter's tensor for model parameter ``name``, None for a base weight."""
        key = self.keys.get(name)
        return None if key is None else self.store.get(key).float()


def peft_walk_refusal(adapter_dir: Path) -> str | None:
    """Why the walk cannot run this adapter through peft's layers (it runs LoRA on decoder layers only), from
    its config and tensor names alone; None: it can."""
    config = read_json(adapter_dir / "adapter_config.json", "adapter_config.json")
    trained = config.get("modules_to_save") or ("token embeddings" if config.get("trainable_token_indices") else None)
    outside = next((n for n in adapter_weights(adapter_dir).tensors
                    if ".lora_" not in n or "lora_embedding" in n or "embed_tokens" in n or "lm_head" in n), None)
    if trained or outside:
        return f"the peft reference runs LoRA on decoder layers only: this adapter also trains {trained or outside}"
    return None


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during the model's forward: records what the model gives the
    layer and passes the hidden states through; the last one stops the forward."""

    def __init__(self, layer: nn.Module, index: int, last: bool, sink: list):
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: attribute reads (e.g. attention_type) fall through
        self.index, self.last, self.sink = index, last, sink

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        """Record (hidden_states, keyword arguments) and pass ``hidden_states`` on; the last layer's recorder raises
        _Recorded to stop the forward. Positional arguments beyond the hidden states are a BadInput."""
        if args:
            raise BadInput(f"{type(self._layer).__name__} is called with positional arguments; the layer runner needs keywords")
        self.sink.append((hidden_states, kwargs))
        if self.last:
            raise _Recorded
        return hidden_states


class _Recorded(Exception):
    pass


class Cancelled(Exception):
    """A walk stopped because its cancel event was set."""


@dataclass
class Stream:
    """A batch of sequences on its way through the model: its hidden states and, per layer, the keyword
    arguments the model passes that layer (masks, rotary embeddings, cache)."""

    hidden: torch.Tensor
    layer_kwargs: list[dict]
    cache: object = None

    def fork(self) -> "Stream":
        """A second stream from here on (e.g. the candidate beside the reference): its own copy of the hidden states,
        the same layer arguments and cache."""
        return Stream(self.hidden.clone(), self.layer_kwargs, self.cache)


class LayerRunner:
    """One causal LM, run a decoder layer at a time from its checkpoint."""

    def __init__(self, model_dir: Path, adapter: Path | None = None, dtype: torch.dtype = COMPUTE_DTYPE,
                 device: torch.device | None = None, cancel: threading.Event | None = None,
                 linear_storage: torch.dtype | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .hf import quiet_transformers

        quiet_transformers()
        return_freed_memory()
        self.weights = Weights(Path(model_dir))
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=remote_code_trusted())
        self.config, self.dtype, self.device = config, dtype, device or compute_device()
        # Linear weights held in this (narrower) dtype and made ``dtype`` one module per call (_upcast_per_call):
        # a layer computed in float32 at a bfloat16 layer's memory (the read-back's source layer)
        self.linear_storage = linear_storage
        self.cancel = cancel  # set by another thread (Ctrl-C): the walk stops at the next layer
        try:
            with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
                self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention_for(config)).eval()
        except Exception as exc:  # transformers raises many types for a model it cannot build
            raise BadInput(f"transformers cannot build {config.architectures}: {str(exc).splitlines()[0]}") from None
        self.family = family_of(config)
        experts.unstack_experts(self.model, self.family)  # one Linear per expert, named as in the checkpoint
        self.checkpoint_name = experts.renamer(self.family.experts, to_checkpoint=True)
        self.module_name = experts.renamer(self.family.experts, to_checkpoint=False)
        self.base = self.model.get_decoder()
        self.layers_attr, layers = _decoder_layers(self.base, config)
        self.layers = list(layers)
        names = {id(m): n for n, m in self.model.named_modules()}
        self.layers_prefix = names[id(layers)]
        self.adapter = PeftAdapter(self.model, Path(adapter), self.layers_prefix) if adapter else None
        self.embed_name = names[id(self.base.get_input_embeddings())] + ".weight"
        self.norm = getattr(self.base, self.family.final_norm, None)
        self.norm_prefix = names.get(id(self.norm))
        self.head = self.model.get_output_embeddings()
        head_name = names[id(self.head)] + ".weight"
        tied = getattr(self.model, "_tied_weights_keys", None) or {}
        self.head_name = head_name if head_name in self.weights else tied.get(head_name, head_name) if isinstance(tied, dict) else self.embed_name
        self.softcap = getattr(config.get_text_config(), "final_logit_softcapping", None)
        self.device_buffers()

    def device_buffers(self) -> None:
        """Move the model's buffers (rotary tables, masks) to the compute device; weights come per layer."""
        if self.device.type != "cpu":
            for module in self.model.modules():
                for name, buf in list(module.named_buffers(recurse=False)):
                    module._buffers[name] = buf.to(self.device)

    @property
    def num_layers(self) -> int:
        """Decoder layers in the model."""
        return len(self.layers)

    def layer_prefix(self, index: int) -> str:
        """Decoder layer ``index``'s module name in the model (``model.layers.3``)."""
        return f"{self.layers_prefix}.{index}"

    # --- weights in and out

    def _load(self, module: nn.Module, prefix: str) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, param in list(module.named_parameters()):
            lora = self.adapter.get(f"{prefix}.{name}") if self.adapter else None
            if lora is not None:  # kept in float32, as trained: peft casts the input to it
                set_module_tensor_to_device(module, name, self.device, value=lora, dtype=torch.float32)
                continue
            full = self.checkpoint_name(f"{prefix}.{name}".replace(".base_layer.", "."))
            if full not in self.weights:
                raise BadInput(f"{full} is not in the checkpoint: the layer runner cannot map "
                               f"{self.config.architectures[0]}'s weights")
            value = self.weights.get(full)
            if tuple(value.shape) != tuple(param.shape):
                raise BadInput(f"{full} has shape {tuple(value.shape)} in the checkpoint, the config says {tuple(param.shape)}")
            set_module_tensor_to_device(module, name, self.device, value=value, dtype=self._stored_dtype(module, name))

    def _stored_dtype(self, module: nn.Module, name: str) -> torch.dtype:
        """The dtype parameter ``name`` of ``module`` is held in while loaded."""
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        narrow = self.linear_storage and attr == "weight" and isinstance(owner, nn.Linear)
        return self.linear_storage if narrow else self.dtype

    @staticmethod
    def unload(module: nn.Module) -> None:
        """Drop ``module``'s weights (back to the meta device): its memory is freed."""
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(module.named_parameters()):
            set_module_tensor_to_device(module, name, "meta")

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its weights, dropped again on exit."""
        module = self.layers[index]
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the model run was cancelled")
        handles = []
        try:
            self._load(module, self.layer_prefix(index))
            if self.linear_storage:
                handles = [h for m in module.modules() if isinstance(m, nn.Linear) for h in _upcast_per_call(m, self.dtype)]
            yield module
        finally:
            for h in handles:
                h.remove()
            self.unload(module)

    # --- running

    def stream(self, ids: torch.Tensor, cache=None) -> Stream:
        """Token ids [batch, tokens] embedded and ready for layer 0 (with ``cache``, a DynamicCache, the
        tokens follow what the cache holds)."""
        unique, inverse = ids.unique(return_inverse=True)
        table = self.weights.take(self.embed_name, unique.tolist()).to(self.device, self.dtype)
        embed = self.base.get_input_embeddings()
        meta, padding = embed.weight, getattr(embed, "padding_idx", None)
        # the embedding's own forward (Gemma's scales it) on the rows in use; padding_idx only affects gradients
        embed.weight, embed.padding_idx = nn.Parameter(table, requires_grad=False), None
        try:
            embeds = embed(inverse.to(self.device))
        finally:
            embed.weight, embed.padding_idx = meta, padding
        sink: list = []
        recorders = nn.ModuleList(_Recorder(layer, i, i == len(self.layers) - 1, sink) for i, layer in enumerate(self.layers))
        setattr(self.base, self.layers_attr, recorders)
        try:
            self.base(inputs_embeds=embeds, past_key_values=cache, use_cache=cache is not None)
        except _Recorded:
            pass
        finally:
            setattr(self.base, self.layers_attr, nn.ModuleList(self.layers))
        return Stream(sink[0][0], [kwargs for _, kwargs in sink], cache)

    def streams(self, ids: torch.Tensor, batch: int = STREAM_BATCH) -> list[Stream]:
        """Token ids [sequences, tokens] as streams of ``batch`` sequences each (runner.stream)."""
        return [self.stream(chunk) for chunk in ids.split(batch)]

    def forward(self, layer: nn.Module, index: int, stream: Stream) -> None:
        """Run ``stream`` through decoder layer ``index`` (loaded: ``layer``), in place."""
        out = layer(stream.hidden, **stream.layer_kwargs[index])
        stream.hidden = out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def walk(self, streams: list[Stream], on_layer=None) -> None:
        """Every stream through every layer, a layer's weights read once."""
        for i in range(self.num_layers):
            with self.layer(i) as layer:
                for s in streams:
                    self.forward(layer, i, s)
            if on_layer:
                on_layer(i + 1, self.num_layers)

    @torch.inference_mode()
    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm applied to hidden states [..., hidden], flattened to [positions, hidden]."""
        if self.norm is None:
            raise BadInput(f"the layer runner finds no final norm {self.family.final_norm!r} in {self.config.architectures[0]}")
        with self.loaded(self.norm, self.norm_prefix):
            return self.norm(hidden).reshape(-1, hidden.shape[-1])

    @contextlib.contextmanager
    def loaded(self, module: nn.Module, prefix: str):
        """``module`` (checkpoint names under ``prefix``) with its weights while open, dropped on exit."""
        try:
            self._load(module, prefix)
            yield module
        finally:
            self.unload(module)

    @torch.inference_mode()
    def logits(self, *normed: torch.Tensor, rows: int = HEAD_ROWS) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(first vocabulary id, [float32 logits [positions, block] per input], on the CPU) for lm_head a
        block of rows at a time: each block is read once for all inputs."""
        vocab = self.head.weight.shape[0]
        bias = self.weights.get(self.head_name.removesuffix("weight") + "bias") \
            if getattr(self.head, "bias", None) is not None else None
        for start in range(0, vocab, rows):
            w = self.weights.rows(self.head_name, start, start + rows).to(self.device, self.dtype)
            out = []
            for h in normed:
                block = (h @ w.T).float()
                if bias is not None:
                    block += bias[start:start + rows].to(block)
                if self.softcap:
                    block = torch.tanh(block / self.softcap) * self.softcap
                out.append(block.cpu())  # the statistics are kept on the CPU
            yield start, out


def _upcast_per_call(module: nn.Module, dtype: torch.dtype) -> list:
    """Hooks that give ``module`` its weight in ``dtype`` for each call (a copy, dropped after it); a weight
    already in ``dtype`` when the call starts (put there by a hook before this one) is left as it is."""
    held = []

    def upcast(m, _args):
        held.append(m.weight)
        if m.weight.dtype != dtype:
            m.weight = nn.Parameter(m.weight.to(dtype), requires_grad=False)

    def restore(m, _args, _out):
        m.weight = held.pop()
    return [module.register_forward_pre_hook(upcast), module.register_forward_hook(restore)]


def _decoder_layers(base: nn.Module, config) -> tuple[str, nn.ModuleList]:
    """The decoder's list of layers: its ModuleList with one entry per hidden layer."""
    count = config.get_text_config().num_hidden_layers
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == count:
            return name, child
    raise BadInput(f"the layer runner finds no list of {count} decoder layers in {type(base).__name__}")


def attention_for(config) -> str:
    """eager where sdpa would drop a feature of the model: transformers' sdpa path skips attention logit
    softcapping (Gemma 2), which eager applies."""
    return "eager" if getattr(config.get_text_config(), "attn_logit_softcapping", None) else "sdpa"


# --- estimates, before a run


@dataclass
class Estimate:
    """Peak memory (bytes) and time (seconds) of a run through a model, estimated before it starts."""
    peak_bytes: int
    seconds: float

    def describe(self) -> str:
        """The estimate in words, e.g. "~3.2 GiB peak memory, ~40 s"."""
        return f"~{self.peak_bytes / 2**30:.1f} GiB peak memory, ~{self.duration()}"

    def duration(self) -> str:
        """The estimated time in words: seconds under two minutes, else minutes."""
        return _duration(self.seconds)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def layer_shapes(checkpoint: Checkpoint) -> tuple[int, int]:
    """(parameters of the largest decoder layer, of its largest matrix), from the checkpoint's header."""
    per_layer: dict[str, int] = {}
    largest = 0
    for name, info in checkpoint.store.tensors.items():
        found = LAYER_NAME.match(name)
        if found:
            per_layer[found.group(1)] = per_layer.get(found.group(1), 0) + numel(info.shape)
            largest = max(largest, numel(info.shape))
    return max(per_layer.values(), default=0), largest


def estimate(checkpoint: Checkpoint, tokens: int, passes: float, walks: int = 1, extra_layer_bytes: float = 0.0,
             stream_tokens: int = STREAM_BATCH * 256) -> Estimate:
    """Peak memory and time of ``walks`` walks through the model over ``tokens`` tokens in all, run ``passes``
    times (forward-equivalents). Memory: one layer in the compute dtype, ``extra_layer_bytes`` per layer
    parameter (e.g. an fp8 copy), two transient copies of its largest matrix, the activations of one
    stream, every hidden state, the lm_head block; time: the FLOPs at this machine's measured matmul speed
    plus each walk's read of the checkpoint."""
    cfg = checkpoint.config.get("text_config", checkpoint.config)
    layer, largest = layer_shapes(checkpoint)
    hidden = int(cfg.get("hidden_size", 0))
    widest = max(int(cfg.get("intermediate_size", 0) or 0), int(cfg.get("moe_intermediate_size", 0) or 0), hidden)
    vocab = int(cfg.get("vocab_size", 0))
    size = COMPUTE_DTYPE.itemsize
    peak = (BASE_RSS + layer * (size + extra_layer_bytes) + 2 * largest * size + 4 * stream_tokens * widest * size
            + 3 * tokens * hidden * size + HEAD_ROWS * hidden * size + 2 * min(tokens, 4096) * HEAD_ROWS * 8)
    layers = int(cfg.get("num_hidden_layers", 1))
    flops = 2 * (layer * layers + vocab * hidden) * tokens * passes
    return Estimate(int(peak), flops / matmul_speed() + walks * checkpoint.store.total_bytes / READ_BYTES_PER_SECOND)


# streamed verbs' time per parameter, measured on the Llama-3.1-8B-shaped model here (README, Benchmarks): merge
# 141 s, convert gguf q8_0 265 s for 8.03e9 parameters
MERGE_SECONDS_PER_PARAMETER, GGUF_SECONDS_PER_PARAMETER = 141 / 8.03e9, 265 / 8.03e9


def streamed_estimate(checkpoint: Checkpoint, per_largest_tensor: float, per_layer_matrix: float,
                      seconds_per_parameter: float) -> Estimate:
    """Peak memory and time of a verb that streams the checkpoint a tensor at a time (merge, convert gguf): the
    imports, ``per_largest_tensor`` bytes per element of its largest tensor (as read, its copies), and
    ``per_layer_matrix`` bytes per element of the largest decoder-layer matrix (float32 working copies); time at
    a measured rate per parameter."""
    _, layer_matrix = layer_shapes(checkpoint)
    largest = max((numel(t.shape) for t in checkpoint.store.tensors.values()), default=0)
    peak = BASE_RSS + max(largest * per_largest_tensor, layer_matrix * per_layer_matrix)
    return Estimate(int(peak), checkpoint.store.parameters * seconds_per_parameter)


_SPEED: list[float] = []


def matmul_speed() -> float:
    """FLOP/s of a float32 matmul on this machine (measured once, ~0.1 s)."""
    if not _SPEED:
        device = compute_device()
        a = torch.randn(1024, 1024, device=device)
        a @ a
        t0 = time.perf_counter()
        for _ in range(8):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        _SPEED.append(8 * 2 * 1024**3 / (time.perf_counter() - t0))
    return _SPEED[0]
