"""The release file: one YAML naming the source model, the artifacts to build from it, the verify matrix
and the quality gates. Loading checks every key, type and reference and orders the stages, so a bad
file fails before anything runs. Paths in the file are relative to the file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..convert.gguf_tables import OUTTYPES, ggml_type
from ..errors import BadInput
from ..options import BASE_QUANTS, MERGE_DTYPES, TensorTypes, parse_size
from ..families import check_handled
from ..hub import hub_origin, resolve_model
from ..safety import check_name, check_no_remote_code_flag, check_remote_code, inside
from ..yamlfile import check_types, parse_mapping
from ..engines import ENGINES

SOURCE = "source"  # the id of the input model (the base, or with an adapter the base before merging)
QUANTIZE_GATES = ("max_ppl_delta", "max_kl", "min_top1")
# the greedy probe's, the teacher-forced comparison's (verify/forced.py GATE_NAMES), then lm-eval's (verify --eval)
VERIFY_GATES = ("min_token_agreement", "max_logprob_delta",
                "max_mean_logprob_delta", "max_p99_logprob_delta", "min_top1_agreement", "max_topk_kl", "min_recovery")

# key -> (accepted types, description); the descriptions make the error messages
TOP = {
    "name": ((str,), "release name: artifacts are named <name>-<id>"),
    "base": ((str,), "base model folder or hub id org/name[@revision] (or the model to release when there is no adapter)"),
    "adapter": ((str,), "peft LoRA adapter folder or hub id org/name[@revision]"),
    "base_model": ((str,), "the base's hub id for model cards (default: the base's hub id, else its folder's name)"),
    "license": ((str,), "license for model cards"),
    "output": ((str,), "output root"),
    "store": ((str,), "a folder every node reads: finished stages by key, shared by jobs on several machines"),
    "gates": ((dict,), "default quality gates"),
    "artifacts": ((dict,), "artifacts to build, by id"),
    "verify": ((list,), "verify matrix"),
}
ARTIFACT = {"from": (str,), "merge": (dict,), "quantize": (dict,), "gguf": (str,), "imatrix": (str,), "require": (str,),
            "reason": (str,), "accept_tokenizer_difference": (bool,), "tensor_types": (dict,), "output_tensor_type": (str,),
            "token_embedding_type": (str,), "split_max_size": (str, int)}
GGUF_KEYS = ("imatrix", "accept_tokenizer_difference", "tensor_types", "output_tensor_type", "token_embedding_type", "split_max_size")
# what an artifact must end as for the release to pass: served (an engine loaded it and every check passed),
# served-native (served with the engine's own kernels, not the workbench's reference kernels for a format the
# engine's CPU build cannot compute) or checked (built and quality-gated; the reason it is not served is stated)
REQUIREMENTS = ("served", "served-native", "checked")
MERGE = {"dtype": (str,), "max_shard_size": (str, int), "base_quant": (str,), "double_quant": (bool,)}
QUANTIZE = {"recipe": (str,), "samples": (int,), "seq_len": (int,), "calibration": (str,), "field": (str,),
            "ignore": (list,), "format": (str,), "kv_cache": (str,), "gates": (dict,)}
VERIFY = {"artifact": (str,), "engine": (str,), "tp": (int, list), "pp": (int,), "dp": (int,), "concurrency": (int,),
          "dtype": (str,), "max_model_len": (int,), "extra_args": (list,), "timeout": (int, float), "gates": (dict,),
          "id": (str,), "eval": (list,), "eval_limit": (int,)}
UNMERGED = "adapter"  # a verify target: the release's adapter served unmerged on its base
GATES = {k: (int, float) for k in (*QUANTIZE_GATES, *VERIFY_GATES)}


@dataclass(frozen=True)
class Stage:
    """One stage of a release: an artifact to build (merge, quantize, gguf) or a verify run, with the ids of what
    it reads, its options and its output."""
    id: str
    kind: str  # merge | quantize | gguf | verify
    needs: tuple[str, ...]  # ids of the artifacts it reads (SOURCE: the input model)
    options: dict
    output: Path  # a folder, a .gguf file, or (verify) the report folder
    require: str = "served"  # artifacts: the state the release needs (not part of the stage's key)
    reason: str | None = None  # why an artifact that only needs to be checked is not served


@dataclass
class Release:
    """A loaded release file: the source model (and adapter), where the release writes, and its stages in
    dependency order."""
    file: Path
    text: str
    name: str
    base: Path
    adapter: Path | None
    base_model: str
    license: str | None
    output: Path
    stages: list[Stage] = field(default_factory=list)  # in dependency order
    store: Path | None = None  # release/store.py: where jobs on other machines put and find finished stages

    def stage(self, stage_id: str) -> Stage:
        """The stage with id ``stage_id``."""
        return next(s for s in self.stages if s.id == stage_id)

    @property
    def artifacts(self) -> list[Stage]:
        """The stages that build an artifact (every kind but verify), in dependency order."""
        return [s for s in self.stages if s.kind != "verify"]

    @property
    def gguf_folder(self) -> Path:
        """The folder under ``output`` that holds the release's GGUF files and their model card: <name>-GGUF."""
        return self.output / f"{self.name}-GGUF"


def _gates(value: dict | None, allowed: tuple[str, ...], where: str) -> dict:
    value = value or {}
    check_types(value, GATES, where)
    wrong = [k for k in value if k not in allowed]
    if wrong:
        raise BadInput(f"{where}: {wrong[0]!r} does not apply here (allowed: {', '.join(allowed)})")
    return {k: float(v) for k, v in value.items()}


def _expanded(value: str, where: str) -> str:
    """A value of the file with environment variables and ~ expanded; an unset variable is bad input."""
    expanded = os.path.expanduser(os.path.expandvars(value))
    if "$" in expanded:
        raise BadInput(f"{where}: {value!r} names an environment variable that is not set")
    return expanded


def _path(here: Path, value: str, where: str) -> Path:
    """A path of the file, relative to the file's folder."""
    return (here / _expanded(value, where)).resolve()


def _model(here: Path, value: str, where: str) -> Path:
    """A model or adapter of the file: a path (as _path) or a hub id org/name[@revision] (workbench/hub.py)."""
    return resolve_model(_expanded(value, where), where, here).resolve()


def load_release(file: Path, output: Path | None = None, store: Path | None = None) -> Release:
    """The release ``file`` describes, with every key, type and reference checked and the stages ordered;
    ``output`` and ``store`` override the file's. An artifact no verify entry serves must say ``require: checked``."""
    file = Path(file).absolute()
    if not file.is_file():
        raise BadInput(f"release file not found: {file}")
    text = file.read_text()
    where = file.name
    data = parse_mapping(text, where)
    check_types(data, {k: v[0] for k, v in TOP.items()}, where)
    for key in ("name", "base", "artifacts"):
        if key not in data:
            raise BadInput(f"{where}: missing key {key!r} ({TOP[key][1]})")
    here = file.parent
    check_name(data["name"], f"{where}: name")
    base = _model(here, data["base"], f"{where}: base")
    if (base / "config.json").is_file():  # a missing base is reported where it is read
        check_handled(json.loads((base / "config.json").read_text()), f"{where}: base {base}")
    adapter = _model(here, data["adapter"], f"{where}: adapter") if data.get("adapter") else None
    for folder in (base, adapter):
        if folder is not None and folder.is_dir():
            check_remote_code(folder)
    release = Release(
        file=file, text=text, name=data["name"], base=base, adapter=adapter,
        base_model=data.get("base_model") or (hub_origin(base) or {}).get("repo_id") or base.name, license=data.get("license"),
        output=Path(output).absolute() if output else _path(here, data.get("output", f"{file.stem}-release"), f"{where}: output"),
        store=Path(store).absolute() if store else _path(here, data["store"], f"{where}: store") if data.get("store") else None,
    )
    defaults = _gates(data.get("gates"), (*QUANTIZE_GATES, *VERIFY_GATES), f"{where}: gates")
    _artifact_stages(release, data["artifacts"], defaults, here, where)
    _verify_stages(release, data.get("verify") or [], defaults, where)
    check_contained(release)
    verified = {s.needs[0] for s in release.stages if s.kind == "verify"}
    for stage in release.artifacts:
        if stage.require != "checked" and stage.id not in verified:
            raise BadInput(f"{where}: artifacts.{stage.id} must be served (the default) but no verify entry names it: "
                           "add one, or set `require: checked` with a `reason`")
    return release


def check_contained(release: Release) -> None:
    """Every output the release writes resolves (links followed) inside its output root; called again
    right before a run, since links can change between loading and running."""
    root = release.output
    for where in (root / "reports", root / "reports" / "logs", *(s.output for s in release.stages)):
        inside(root, where, f"{release.file.name}: output")


def _artifact_stages(release: Release, artifacts: dict, defaults: dict, here: Path, where: str) -> None:
    if not artifacts:
        raise BadInput(f"{where}: artifacts is empty")
    merges = [i for i, a in artifacts.items() if isinstance(a, dict) and "merge" in a]
    default_from = merges[0] if merges else SOURCE
    known = {SOURCE}
    gguf_types: dict[str, str] = {}
    pending = dict(artifacts)
    # dependency order: an artifact comes after the one it is made from
    while pending:
        ready = [i for i, a in pending.items() if not isinstance(a, dict) or "merge" in a or a.get("from", default_from) in known]
        if not ready:
            i, a = next(iter(pending.items()))
            ref = a.get("from", default_from)
            if ref in artifacts:
                raise BadInput(f"{where}: artifacts form a cycle through {i!r}")
            raise BadInput(f"{where}: artifact {i!r} is made from {ref!r}, which is not defined "
                           f"(defined: {', '.join(sorted(known | set(artifacts)))})")
        for artifact_id in ready:
            spec = pending.pop(artifact_id)
            stage = _artifact_stage(release, artifact_id, spec, default_from, defaults, here, where, gguf_types)
            release.stages.append(replace(stage, **_requirement(spec, f"{where}: artifacts.{artifact_id}")))
            known.add(artifact_id)


def _requirement(spec: dict, at: str) -> dict:
    require = spec.get("require", "served")
    if require not in REQUIREMENTS:
        raise BadInput(f"{at}: require must be one of {', '.join(REQUIREMENTS)}, got {require!r}")
    reason = spec.get("reason")
    if require == "checked" and not (reason or "").strip():
        raise BadInput(f"{at}: `require: checked` needs a `reason` (why it is not served)")
    if require != "checked" and reason:
        raise BadInput(f"{at}: `reason` goes with `require: checked`")
    return {"require": require, "reason": reason}


def _artifact_stage(release, artifact_id, spec, default_from, defaults, here, where, gguf_types) -> Stage:
    at = f"{where}: artifacts.{artifact_id}"
    check_name(artifact_id, f"{where}: artifact id")
    kind = _artifact_kind(artifact_id, spec, at)
    if kind == "merge":
        return _merge_stage(release, artifact_id, spec, at)
    source = spec.get("from", default_from)
    if any(s.id == source and s.kind == "gguf" for s in release.stages):
        raise BadInput(f"{at}: {source!r} is a .gguf file; {kind} reads a model folder")
    if kind == "quantize":
        return _quantize_stage(release, artifact_id, spec["quantize"], source, defaults, here, at)
    return _gguf_stage(release, artifact_id, spec, source, here, at, gguf_types)


def _artifact_kind(artifact_id: str, spec, at: str) -> str:
    """The one kind an artifact entry names (merge, quantize or gguf), its keys checked."""
    if artifact_id in (SOURCE, UNMERGED):
        raise BadInput(f"{at}: {SOURCE!r} and {UNMERGED!r} are reserved ids")
    if not isinstance(spec, dict):
        raise BadInput(f"{at} must be a mapping with one of merge, quantize, gguf")
    for key in GGUF_KEYS:
        if key in spec and "gguf" not in spec:
            raise BadInput(f"{at}: {key} goes with gguf")
    check_types(spec, ARTIFACT, at)
    kinds = [k for k in ("merge", "quantize", "gguf") if k in spec]
    if len(kinds) != 1:
        raise BadInput(f"{at} needs exactly one of merge, quantize, gguf (got {', '.join(kinds) or 'none'})")
    return kinds[0]


def _merge_stage(release: Release, artifact_id: str, spec: dict, at: str) -> Stage:
    if release.adapter is None:
        raise BadInput(f"{at}: merge needs an adapter at the top of the file")
    if "from" in spec:
        raise BadInput(f"{at}: merge reads base and adapter; 'from' does not apply")
    merge = spec["merge"]
    check_types(merge, MERGE, f"{at}.merge")
    dtype = merge.get("dtype", "auto")
    if dtype not in MERGE_DTYPES:
        raise BadInput(f"{at}.merge: dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}")
    options = {"dtype": dtype, "max_shard_bytes": parse_size(merge.get("max_shard_size"))}
    base_quant = merge.get("base_quant")
    if base_quant is not None:  # only when given: existing release keys stay valid
        if base_quant not in BASE_QUANTS:
            raise BadInput(f"{at}.merge: base_quant must be one of {', '.join(BASE_QUANTS)}, got {base_quant!r}")
        options.update(base_quant=base_quant, double_quant=bool(merge.get("double_quant", False)))
    return Stage(artifact_id, "merge", (SOURCE,), options, release.output / f"{release.name}-{artifact_id}")


def _quantize_stage(release: Release, artifact_id: str, q: dict, source: str, defaults: dict, here: Path, at: str) -> Stage:
    check_types(q, QUANTIZE, f"{at}.quantize")
    if "recipe" not in q:
        raise BadInput(f"{at}.quantize: missing key 'recipe' (a shipped name like fp8-static, or a .yaml path)")
    recipe = q["recipe"]
    recipe_path = str(_path(here, recipe, f"{at}.quantize.recipe")) if recipe.endswith((".yaml", ".yml")) else None
    calibration = q.get("calibration")
    if calibration and calibration != "default":
        calibration = str(_path(here, calibration, f"{at}.quantize.calibration"))
    options = {
        "recipe": None if recipe_path else recipe, "recipe_path": recipe_path,
        "overrides": {"samples": q.get("samples"), "seq_len": q.get("seq_len"), "data": calibration,
                      "field": q.get("field"), "ignore": q.get("ignore"), "format": q.get("format"),
                      **({"kv_cache": q["kv_cache"]} if "kv_cache" in q else {})},  # only when given: keys stay valid
        "gates": {**{k: v for k, v in defaults.items() if k in QUANTIZE_GATES},
                  **_gates(q.get("gates"), QUANTIZE_GATES, f"{at}.quantize.gates")},
    }
    return Stage(artifact_id, "quantize", (source,), options, release.output / f"{release.name}-{artifact_id}")


def _gguf_stage(release: Release, artifact_id: str, spec: dict, source: str, here: Path, at: str, gguf_types: dict) -> Stage:
    outtype = spec["gguf"].lower()
    if outtype not in OUTTYPES:
        raise BadInput(f"{at}: unknown gguf type {spec['gguf']!r} (known: {', '.join(OUTTYPES)})")
    if outtype in gguf_types:
        raise BadInput(f"{at}: {outtype} is already built by {gguf_types[outtype]!r} (one file per type in {release.gguf_folder.name})")
    gguf_types[outtype] = artifact_id
    split = parse_size(spec["split_max_size"]) if "split_max_size" in spec else 0
    # a split set is a folder of parts (convert gguf --split-max-size)
    path = release.gguf_folder / f"{release.name}-{OUTTYPES[outtype].label}{'' if split else '.gguf'}"
    imatrix = spec.get("imatrix")
    if imatrix and imatrix != "default":
        imatrix = str(_path(here, imatrix, f"{at}.imatrix"))
    if OUTTYPES[outtype].needs_imatrix and not imatrix:
        raise BadInput(f"{at}: llama.cpp makes {OUTTYPES[outtype].label} only with an importance matrix: add imatrix: default")
    if imatrix and OUTTYPES[outtype].direct:
        raise BadInput(f"{at}: imatrix applies to llama.cpp's quantize types, not to {OUTTYPES[outtype].label}")
    types = TensorTypes(tuple((str(p), str(t).lower()) for p, t in (spec.get("tensor_types") or {}).items()),
                        spec.get("output_tensor_type", "").lower() or None, spec.get("token_embedding_type", "").lower() or None)
    for name in [t for _, t in types.patterns] + [t for t in (types.output, types.token_embedding) if t]:
        ggml_type(name, at)
    options = {"outtype": outtype, **({"imatrix": imatrix} if imatrix else {}),
               **({"accept_tokenizer_difference": True} if spec.get("accept_tokenizer_difference") else {}),
               **({"tensor_types": types.as_dict()} if types else {}), **({"split_max_size": split} if split else {})}
    return Stage(artifact_id, "gguf", (source,), options, path)


def _eval_options(entry: dict, at: str) -> dict:
    """A verify entry's lm-eval tasks (`eval:`, verify --eval) and document limit, only when it names tasks (so
    entries without them keep their stage keys)."""
    tasks = entry.get("eval") or []
    if not all(isinstance(t, str) and t for t in tasks):
        raise BadInput(f"{at}: eval must be a list of lm-eval task names")
    if "eval_limit" in entry and (not tasks or entry["eval_limit"] < 1):
        raise BadInput(f"{at}: eval_limit is a positive number of documents per task, with `eval:` tasks")
    return {"eval": list(tasks), "eval_limit": entry.get("eval_limit")} if tasks else {}


def _verify_stages(release: Release, entries: list, defaults: dict, where: str) -> None:
    by_id = {s.id: s for s in release.stages}
    seen = set(by_id)
    for n, entry in enumerate(entries):
        at = f"{where}: verify[{n}]"
        if not isinstance(entry, dict):
            raise BadInput(f"{at} must be a mapping (artifact, engine, tp, ...)")
        check_types(entry, VERIFY, at)
        for key in ("artifact", "engine"):
            if key not in entry:
                raise BadInput(f"{at}: missing key {key!r}")
        target = entry["artifact"]
        if target == UNMERGED and release.adapter is None:
            raise BadInput(f"{at}: artifact {UNMERGED!r} serves the release's adapter unmerged; the file names no adapter")
        if target not in by_id and target != UNMERGED:
            raise BadInput(f"{at}: artifact {target!r} is not defined (defined: {', '.join(by_id)}, or {UNMERGED!r})")
        engine = entry["engine"]
        if engine not in ENGINES:
            raise BadInput(f"{at}: unknown engine {engine!r} (known: {', '.join(ENGINES)})")
        if target == UNMERGED and ENGINES[engine].lora is None:
            raise BadInput(f"{at}: {engine} does not serve adapters unmerged")
        wants_gguf = ENGINES[engine].artifact == "gguf"
        if target != UNMERGED and wants_gguf != (by_id[target].kind == "gguf"):
            raise BadInput(f"{at}: {engine} serves {'a .gguf' if wants_gguf else 'a model folder'}; "
                           f"{target!r} is {'a .gguf' if by_id[target].kind == 'gguf' else 'a model folder'}")
        tps = entry.get("tp", 1)
        tps = [tps] if isinstance(tps, int) else tps
        if not tps or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tps):
            raise BadInput(f"{at}: tp must be a positive integer or a list of them")
        extra = entry.get("extra_args", [])
        if not all(isinstance(a, str) for a in extra):
            raise BadInput(f"{at}: extra_args must be a list of strings")
        check_no_remote_code_flag(extra, f"{at}.extra_args")
        stage_id = check_name(entry.get("id") or f"verify-{target}-{engine}", f"{at}: id")
        if stage_id in seen:
            raise BadInput(f"{at}: stage id {stage_id!r} is taken; give this entry its own id")
        seen.add(stage_id)
        for key in ("pp", "dp"):
            if entry.get(key, 1) < 1:
                raise BadInput(f"{at}: {key} must be a positive integer")
        options = {
            "engine": engine, "tp": tps, "pp": entry.get("pp", 1), "dp": entry.get("dp", 1),
            "concurrency": entry.get("concurrency", 8), "dtype": entry.get("dtype"), "max_model_len": entry.get("max_model_len"),
            "adapters": [f"{release.name}={release.adapter}"] if target == UNMERGED else [],
            "extra_args": list(extra), "timeout": float(entry.get("timeout", 600)),
            "gates": {**{k: v for k, v in defaults.items() if k in VERIFY_GATES},
                      **_gates(entry.get("gates"), VERIFY_GATES, f"{at}.gates")},
            **_eval_options(entry, at),
        }
        needs = (SOURCE, UNMERGED) if target == UNMERGED else (target,)
        release.stages.append(Stage(stage_id, "verify", needs, options, release.output / "reports" / stage_id))
