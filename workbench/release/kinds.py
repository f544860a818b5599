"""The stage kinds of a release as one table: for each kind, what builds its output, what its cache key adds
to its inputs' digests and options, what it costs (for the plan), and what its model card says. The runner
(run.py), the keys (state.py) and the publisher (publish.py) look a kind up here instead of comparing names.

Each runner builds its stage's output or raises: ArtifactFailed for a failed check, Incomplete when a required
check could not run, any other WorkbenchError for bad input or a missing engine. The verbs are imported inside
the runners: planning a release, or gathering it from a store, loads none of them."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .. import __version__
from ..checkpoint import CONFIG_NAME, replace_file, sha256_file
from ..errors import ArtifactFailed, BadInput, Incomplete
from ..manifest import last_step, now
from ..options import GgufOptions, MergeOptions, QuantizeOptions, TensorTypes, VerifyOptions
from ..safety import claim, remove_owned
from .spec import SOURCE, Release, Stage

# the version of the engine a verify stage serves with (state.Keys.engine_of), for its key
EngineVersionOf = Callable[[Stage], "str | None"]

MARKER = "stage.json"  # written last into a verify stage's report folder
ENGINE_GROUPS = "engine-groups.txt"  # under reports/: each engine guard's process group id, appended at start


@dataclass(frozen=True)
class StageKind:
    """One kind of release stage (merge, quantize, gguf, verify) as data: how it runs, what its key adds, what it
    costs, what its model card says, and what its job asks a scheduler for."""
    name: str
    run: Callable[..., None]  # (release, stage, key, event, progress): builds the stage's output or raises
    # what the key covers beyond the inputs' digests and the options, given the stage and the engine-version lookup
    key_extras: Callable[[Stage, EngineVersionOf], dict]
    estimate: Callable[[Release, Stage], object | None]  # runner.Estimate of the stage's peak memory and time
    made: Callable[[Release, str], str] | None = None  # the card's first words, given the source's name
    card_meta: Callable[[Stage], dict] | None = None  # the card's front matter of this kind
    quality_lines: Callable[[Stage, dict], list[str]] | None = None  # the card's quality section
    report: bool = False  # its output is a verification report of another stage's artifact, not an artifact
    reads_sources: tuple[str, ...] = ()  # source folders it reads whatever its needs ("base", "adapter")
    gguf_card: bool = False  # a GGUF: described in the one card of the release's GGUF folder, not a card of its own
    compared_with_source: bool = False  # verify compares its artifact with the artifact it was made from
    gpus: Callable[[Stage], int] = lambda stage: 0  # what its job asks a scheduler for (release --plan)


def input_path(release: Release, artifact_id: str) -> Path:
    """The path of the artifact ``artifact_id`` a stage reads: the release's base for SOURCE, else that stage's
    output."""
    return release.base if artifact_id == SOURCE else release.stage(artifact_id).output


def _record(release: Release, stage: Stage, key: str) -> dict:
    return {"release": {"name": release.name, "stage": stage.id, "key": key, "file": str(release.file)}}


def _no_extras(stage: Stage, engine_of: EngineVersionOf) -> dict:
    return {}


# ---------------------------------------------------------------- merge

def _run_merge(release, stage, key, event, progress) -> None:
    from ..merge import merge

    o = stage.options
    options = MergeOptions(stage.output, o["dtype"], o["max_shard_bytes"], o.get("base_quant", "auto"),
                           o.get("double_quant", False), force=True)
    merge(release.base, release.adapter, options, event, progress, _record(release, stage, key))


def _merge_made(release: Release, source: str) -> str:
    return f"LoRA adapter `{release.adapter.name}` merged into `{release.base_model}`" if release.adapter else ""


def _merge_quality(stage: Stage, quality: dict) -> list[str]:
    if "self_check_max_rel_error" not in quality:
        return []
    return [f"Merge self-check: {quality['self_check_modules']} modules, largest relative error "
            f"{quality['self_check_max_rel_error']:.2e} of the written weights against W·x + s·B(A·x)."]


# ---------------------------------------------------------------- quantize

def _run_quantize(release, stage, key, event, progress) -> None:
    from ..quantize.run import quantize

    o = stage.options
    options = QuantizeOptions(o["recipe"], Path(o["recipe_path"]) if o["recipe_path"] else None, o["overrides"] or {},
                              stage.output, force=True, gates=o["gates"] or {})
    step = quantize(input_path(release, stage.needs[0]), options, event, _record(release, stage, key), progress)
    m = step["metrics"]
    event(f"held-out: perplexity {m['ppl_delta']:+.2%}, KL {m['mean_kl']:.2e}, top-1 {m['top1_agreement']:.2%}")
    if step["status"] != "ok":
        raise ArtifactFailed(f"quality gates failed: {', '.join(step['failed_gates'])} (limits {step['gates']})")


def _recipe(options: dict):
    from ..quantize.recipe import load

    return load(options["recipe"], Path(options["recipe_path"]) if options["recipe_path"] else None)


def _quantize_extras(stage: Stage, engine_of: EngineVersionOf) -> dict:
    """The recipe's text and a calibration file's content are inputs too."""
    data = stage.options["overrides"].get("data")
    calibration = file_sha256(Path(data)) if data and data != "default" else None
    return {"recipe_text": _recipe(stage.options).source, "calibration_sha256": calibration}


def _quantize_gpus(stage: Stage) -> int:
    from ..quantize.recipe import WANTS_ACCELERATOR

    return int(_recipe(stage.options).method in WANTS_ACCELERATOR)


def _merge_estimate(release: Release, stage: Stage):
    from ..checkpoint import Checkpoint
    from ..merge import merge_estimate

    return merge_estimate(Checkpoint(release.base))


def _gguf_estimate(release: Release, stage: Stage):
    from ..checkpoint import Checkpoint
    from ..convert.gguf import gguf_estimate

    return gguf_estimate(Checkpoint(release.base))  # a merge keeps the base's shapes


def _quantize_estimate(release: Release, stage: Stage):
    from ..checkpoint import Checkpoint
    from ..quantize.run import quantize_estimate

    recipe = _recipe(stage.options).with_overrides(**stage.options["overrides"])
    return quantize_estimate(Checkpoint(release.base), recipe)  # a merge keeps the base's shapes


def _quantize_meta(stage: Stage) -> dict:
    q = last_step(stage.output).get("options", {})
    config = json.loads((stage.output / CONFIG_NAME).read_text()).get("quantization_config", {})
    return {"base_model_relation": "quantized",
            "quantization": {"method": q.get("method"), "scheme": q.get("scheme"), "format": q.get("format"),
                             "recipe": q.get("recipe"), "quant_method": config.get("quant_method")},
            "tags": [q.get("method"), q.get("format")]}


def _quantize_quality(stage: Stage, quality: dict) -> list[str]:
    if "ppl_source" not in quality:
        return []
    return ["| held-out text | source | this artifact |", "|---|---|---|",
            f"| perplexity ({quality['eval_tokens']} tokens) | {quality['ppl_source']:.3f} | {quality['ppl_quantized']:.3f} "
            f"({quality['ppl_delta']:+.2%}) |",
            f"| mean KL divergence (nats) | | {quality['mean_kl']:.2e} |",
            f"| top-1 agreement | | {quality['top1_agreement']:.2%} |", *_read_back_lines(quality.get("read_back"))]


def _read_back_lines(read: dict | None) -> list[str]:
    if not read or read["refusal"]:
        return []
    return ["", f"Read back by {read['reader']} (the format's own library, not the workbench's code): "
                f"{read['decoded_modules']} modules decoded; every decoder layer's output within {read['max_error']:.1%} "
                f"of the source model's on held-out text, and within {read['max_of_rounding']:.2f}x of what rounding the "
                "source's weights to nearest under the same scheme costs."]


# ---------------------------------------------------------------- gguf

def _run_gguf(release, stage, key, event, progress) -> None:
    from ..convert.gguf import convert_gguf
    from ..convert.imatrix import DEFAULT_CALIBRATION

    o = stage.options
    data = o.get("imatrix")
    types = TensorTypes.from_dict(o.get("tensor_types") or {})
    out = stage.output.with_name(stage.output.name + ".gguf") if o.get("split_max_size") else stage.output  # split: a folder
    options = GgufOptions((o["outtype"],), out, True, None, replace(DEFAULT_CALIBRATION, data=data) if data else None,
                          o.get("accept_tokenizer_difference", False), types, o.get("split_max_size", 0))
    convert_gguf(input_path(release, stage.needs[0]), options, progress, event, _record(release, stage, key))


def _gguf_extras(stage: Stage, engine_of: EngineVersionOf) -> dict:
    imatrix = stage.options.get("imatrix")
    return {"imatrix_sha256": file_sha256(Path(imatrix))} if imatrix not in (None, "default") else {}


def _gguf_quality(stage: Stage, quality: dict) -> list[str]:
    if "bits_per_weight" not in quality:
        return []
    fallbacks = quality.get("fallback_tensors", 0)
    return [f"Read back from the file: {quality['bits_per_weight']:.2f} bits per weight over all tensors; "
            + (f"{fallbacks} matrices stored in another type (rows not a multiple of the type's block: "
               "listed in workbench.json)." if fallbacks else "every matrix in the file type's own types."),
            *_tokenizer_difference_lines(stage)]


def _tokenizer_difference_lines(stage: Stage) -> list[str]:
    """A known tokenizer difference the release accepted, as the conversion recorded it."""
    differences = last_step(stage.output).get("tokenizer_differences") or []
    if not differences:
        return []
    lines = ["", f"Known tokenizer difference (accepted with `accept_tokenizer_difference`): llama.cpp splits "
                 f"{len(differences)} probe text(s) otherwise than transformers:", "",
             "| text | transformers | llama.cpp |", "|---|---|---|"]
    for d in differences:
        lines.append(f"| `{d['text']!r}` | {' '.join(d['transformers'][0])} | {' '.join(d['llamacpp'][0])} |")
    return lines


# ---------------------------------------------------------------- verify

def _run_verify(release, stage, key, event, progress) -> None:
    from ..verify.run import verify

    o = stage.options
    remove_owned(stage.output, "report folder")  # a killed run's partial report is never trusted
    stage.output.mkdir(parents=True)
    claim(stage.output)
    options = VerifyOptions(o["engine"], list(o["tp"]), pp=o["pp"], dp=o["dp"], reference=_reference(release, stage),
                            report_dir=stage.output, ready_timeout=o["timeout"], max_model_len=o["max_model_len"],
                            dtype=o["dtype"], extra_args=tuple(o["extra_args"]), gates=dict(o["gates"]),
                            groups_file=release.output / "reports" / ENGINE_GROUPS, adapters=tuple(o["adapters"]),
                            concurrency=o["concurrency"], evals=tuple(o.get("eval", ())), eval_limit=o.get("eval_limit"))
    report = verify(input_path(release, stage.needs[0]), options, event)
    replace_file(stage.output / MARKER, json.dumps({"key": key, "passed": report["passed"], "verdict": report["verdict"],
                                                    "finished": now(), "workbench": __version__}, indent=2))
    if report["passed"]:
        return
    status = "failed" if report["verdict"] == "failed" else "incomplete"
    checks = [f"tp={r['tp']} {c['name']}" for r in report["runs"] for c in r["checks"] if c["status"] == status]
    message = f"verification {report['verdict']}: {', '.join(checks)} (see {report['reports']['markdown']})"
    raise ArtifactFailed(message) if status == "failed" else Incomplete(message)


def _reference(release: Release, stage: Stage) -> Path | None:
    """What a quantized or converted artifact is compared with: the artifact it was made from, where this run
    keeps it (a job's fetched copy may name, in its manifest, a folder on another node); None: verify's own
    choice (a full-precision artifact is its own reference)."""
    made_by = release.stage(stage.needs[0]) if stage.needs[0] != SOURCE else None
    compared = made_by is not None and KINDS[made_by.kind].compared_with_source
    return input_path(release, made_by.needs[0]) if compared else None


def _verify_extras(stage: Stage, engine_of: EngineVersionOf) -> dict:
    return {"engine_version": engine_of(stage)}


def _verify_gpus(stage: Stage) -> int:
    """One GPU per engine rank for an engine that serves on GPUs."""
    from ..engines import ENGINES

    o = stage.options
    return max(o["tp"]) * o["pp"] * o["dp"] * ENGINES[o["engine"]].gpus_per_rank


def _verify_estimate(release: Release, stage: Stage):
    from ..verify.probes import MAX_TOKENS, PROMPTS, reference_estimate

    return reference_estimate(release.base, PROMPTS, MAX_TOKENS)


def file_sha256(path: Path) -> str:
    """The sha256 of a calibration file a stage's options name (quantize's calibration, gguf's imatrix data), for
    its key; a missing file is a BadInput."""
    if not path.is_file():
        raise BadInput(f"calibration file not found: {path}")
    return sha256_file(path)


KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("merge", _run_merge, _no_extras, _merge_estimate, made=_merge_made, quality_lines=_merge_quality,
              card_meta=lambda stage: {"base_model_relation": "finetune", "tags": ["lora", "merged"]},
              reads_sources=("base", "adapter")),
    StageKind("quantize", _run_quantize, _quantize_extras, _quantize_estimate, made=lambda r, source: f"Quantized from `{source}`",
              card_meta=_quantize_meta, quality_lines=_quantize_quality, compared_with_source=True, gpus=_quantize_gpus),
    # the Hub's relation for GGUF conversions is "quantized"
    StageKind("gguf", _run_gguf, _gguf_extras, _gguf_estimate, made=lambda r, source: f"Converted to GGUF from `{source}`",
              card_meta=lambda stage: {"base_model_relation": "quantized", "library_name": "gguf"},
              quality_lines=_gguf_quality, gguf_card=True, compared_with_source=True),
    StageKind("verify", _run_verify, _verify_extras, _verify_estimate, report=True, gpus=_verify_gpus),
)}
