"""After the stages: model cards in the artifacts, verification results in their manifests, and the
release's own files: release.json (the index tying every artifact, its files' hashes and its checks
together), reports/junit.xml (every stage and verify check, for CI test views), reports/summary.md.

Everything here is rewritten on every run (each file atomically); none of it is an input of any stage."""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from .. import __version__
from ..checkpoint import replace_file, sha256_file
from ..gguffiles import gguf_parts
from ..errors import INCOMPLETE
from ..manifest import content_digest, last_step, manifest_path, now, read_manifest
from ..engines import ENGINES, model_args
from ..verify.probes import verdict as verdict_of_checks
from .kinds import KINDS
from .state import CARD, Keys, StageResult, artifact_digest, recorded_key
from .spec import SOURCE, Release, Stage

INDEX = "release.json"
STALE_REASON = "its report is of other bytes (the artifact was rebuilt since): select it to re-run"


def publish(release: Release, keys: Keys, results: dict[str, StageResult], started: str, partial: bool = False,
            cluster: dict | None = None) -> dict:
    """The release's files from this run's stage ``results``. ``partial`` (--only): the verdict covers the
    stages run here (a job of a fanned-out release), not the artifacts' requirements."""
    stages = [_stage_entry(s, results.get(s.id)) for s in release.stages]
    by_id = {e["id"]: e for e in stages}
    artifacts = {}
    for stage in release.artifacts:
        entry = by_id[stage.id]
        verify_entries = [e for e in stages if KINDS[e["kind"]].report and release.stage(e["id"]).needs[0] == stage.id]
        verifications = [v for v in (_verification(release.stage(e["id"]), e, stage.output) for e in verify_entries) if v]
        _mark_stale(verify_entries, verifications)
        state, reason = artifact_state(stage, entry, verify_entries, verifications)
        if entry["status"] == "ok":
            _record_in_manifest(stage, verifications, state, reason, cluster)
        artifacts[stage.id] = {
            "kind": stage.kind, "path": str(stage.output), "status": entry["status"],
            "from": stage.needs[0], "quality": entry.get("metrics", {}),
            "verifications": verifications, "state": state, "state_reason": reason, "require": stage.require,
            "kernels": _kernels(verifications) if state == "served" else None,
            "meets_requirement": meets_requirement(stage.require, state, _kernels(verifications)),
            "ready": state == "served",  # ready to publish means served: an engine loaded it and every check passed
        }
    _write_cards(release, artifacts)
    for stage in release.artifacts:  # after the cards: the manifests list README.md with its hash
        manifest = read_manifest(stage.output) if artifacts[stage.id]["status"] == "ok" else None
        artifacts[stage.id]["files"] = manifest.get("files", {}) if manifest else {}
        artifacts[stage.id]["manifest"] = str(manifest_path(stage.output)) if manifest else None
    failures = [r for r in results.values() if r.action in ("failed", "incomplete", "blocked")]
    passed = not failures and (partial or all(e["status"] == "ok" for e in stages) and all(a["meets_requirement"] for a in artifacts.values()))
    index = {
        "workbench_release": 2, "name": release.name, "workbench": __version__,
        "file": {"path": str(release.file), "sha256": sha256_file(release.file)},
        "output": str(release.output), "started": started, "finished": now(),
        "versions": keys.versions, "engines": keys.engine_versions,
        "stages": stages, "artifacts": artifacts, "passed": passed, "only": [s.id for s in release.stages if s.id in results] if partial else None,
        "cluster": cluster,
        # the first failure's code; a release that is not done (an artifact short of its requirement) is incomplete
        "exit_code": next((r.exit_code for r in failures if r.exit_code), 0 if passed else INCOMPLETE),
    }
    if release.gguf_folder.is_dir():
        index["gguf_card"] = str(release.gguf_folder / CARD)
    reports = release.output / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    replace_file(reports / "junit.xml", junit_xml(release, index))
    replace_file(reports / "summary.md", summary_markdown(index))
    index["reports"] = {"junit": str(reports / "junit.xml"), "markdown": str(reports / "summary.md"),
                        "index": str(release.output / INDEX)}
    replace_file(release.output / INDEX, json.dumps(index, indent=2) + "\n")
    return index


def _kernels(verifications: list[dict]) -> str:
    """native when every engine ran the artifact with its own kernels, else reference."""
    return "reference" if any(v["kernels"].startswith("reference") for v in verifications) else "native"


def meets_requirement(require: str, state: str, kernels: str) -> bool:
    """Whether an artifact in ``state``, served with ``kernels`` ("native" or "reference"), meets ``require``:
    checked takes served or checked, served takes served, served-native takes served on native kernels."""
    if require == "checked":
        return state in ("served", "checked")
    return state == "served" and (require == "served" or kernels == "native")


def artifact_state(stage: Stage, entry: dict, verify_entries: list[dict], verifications: list[dict]) -> tuple[str, str]:
    """(served | checked | failed, the reason). Served: every verify entry naming the artifact ran here and
    passed. Checked: built and quality-gated, not served (no verify entry, or one that could not run)."""
    if entry["status"] != "ok":
        return "failed", entry.get("error") or f"not built ({entry['status']})"
    failed = [v for v in verifications if v["verdict"] == "failed"]
    if failed:
        return "failed", f"{failed[0]['stage']}: verification failed"
    passed = {v["stage"] for v in verifications if v["verdict"] == "passed"}
    if verify_entries and passed == {e["id"] for e in verify_entries}:
        return "served", "served by " + "; ".join(f"{v['engine']} tp={','.join(str(r['tp']) for r in v['runs'])}"
                                                  + (" with the workbench's reference kernels" if v["kernels"].startswith("reference") else "")
                                                  for v in verifications)
    if not verify_entries:
        return "checked", stage.reason or "no verify entry names it"
    e = next(e for e in verify_entries if e["id"] not in passed)
    verdict = next((v["verdict"] for v in verifications if v["stage"] == e["id"]), None)
    why = e.get("error") or (f"verification {verdict}" if verdict else f"not run ({e['action']})")
    return "checked", f"{e['id']}: {why.splitlines()[0]}" + (f"; {stage.reason}" if stage.reason else "")


def _stage_entry(stage: Stage, result: StageResult | None) -> dict:
    """A stage in the index: what this run did, and the state of its output on disk."""
    if result is None:
        key, status = recorded_key(stage)
        entry = {"id": stage.id, "kind": stage.kind, "action": "not selected", "key": key,
                 "status": status or "missing", "output": str(stage.output)}
    else:
        status = "ok" if result.action in ("built", "cached", "fetched") else result.action  # failed | incomplete | blocked
        entry = {"id": stage.id, "kind": stage.kind, "action": result.action, "key": result.key, "status": status,
                 "output": result.output, "seconds": result.seconds}
        if result.error:
            entry["error"] = result.error
        if result.log:
            entry["log"] = result.log
    if not KINDS[stage.kind].report and entry["status"] == "ok":
        last = last_step(stage.output)
        entry["metrics"] = {k: v for k, v in last.get("metrics", {}).items() if isinstance(v, (int, float, str))}
    return entry


def _verification(stage: Stage, entry: dict, artifact: Path) -> dict | None:
    """A verify stage's report as the index and the manifest keep it; its verdict is "stale" when the bytes
    it served (the report's artifact_sha256) are not ``artifact`` as it is now."""
    try:
        report = json.loads((stage.output / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    runs = []
    for run in report.get("runs", []):
        checks = {c["name"]: c for c in run["checks"]}
        ref = checks.get("reference", {}).get("metrics", {})
        forced = checks.get("teacher-forced", {}).get("metrics", {})
        runs.append({"tp": run["tp"], "passed": verdict_of_checks(run["checks"]) == "passed",
                     "checks": {n: c["status"] for n, c in checks.items()},
                     "token_agreement": ref.get("token_agreement"), "max_logprob_delta": ref.get("max_logprob_delta"),
                     "forced": {k: forced.get(k) for k in ("positions", "mean_logprob_delta", "p99_logprob_delta",
                                                           "top1_agreement", "mean_topk_kl")} if forced else None,
                     "argv": run.get("argv"), "env": run.get("env") or {}, "cpu_env": run.get("cpu_env") or {},
                     "cpu_args": run.get("cpu_args") or [], "kernels_logged": run.get("kernels_logged"),
                     "eval": checks.get("eval", {}).get("metrics", {}).get("recovery")})
    verdict = report.get("verdict") or ("passed" if report.get("passed") else "failed")
    served = report.get("artifact_sha256")
    if served is None or not artifact.exists() or served != content_digest(artifact):
        verdict = "stale"
    return {"stage": stage.id, "engine": report["engine"], "engine_version": report.get("engine_version"), "artifact_sha256": served,
            "kernels": report.get("kernels", "native"), "reference": report.get("reference"),
            "reference_by": report.get("reference_by"), "verdict": verdict, "passed": verdict == "passed" and entry["status"] == "ok",
            "runs": runs, "report": str(stage.output / "report.json")}


def _mark_stale(verify_entries: list[dict], verifications: list[dict]) -> None:
    """A verify stage whose report served other bytes than the artifact's is "stale" in the index, not ok."""
    stale = {v["stage"] for v in verifications if v["verdict"] == "stale"}
    for e in verify_entries:
        if e["id"] in stale and e["status"] == "ok":
            e["status"] = "stale"
            e["error"] = STALE_REASON


def _record_in_manifest(stage: Stage, verifications: list[dict], state: str, reason: str, cluster: dict | None) -> None:
    """The verifications (each with its engine's version) and the state; for a release run over Ray, its version
    and nodes."""
    path = manifest_path(stage.output)
    manifest = read_manifest(stage.output)
    if manifest is None:
        return
    manifest["verifications"] = verifications
    manifest["state"] = {"state": state, "reason": reason, "require": stage.require}
    if cluster:
        manifest["state"]["cluster"] = {"ray": cluster["ray"], "nodes": cluster["nodes"]}
    replace_file(path, json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------- model cards

def _flags(engine: str, argv: list[str], drop: list[str]) -> list[str]:
    """The flags after the model in a verification's argv, without the private --host/--port and the
    CPU-only flags ``drop`` (launch.py appends them as one block)."""
    spec = ENGINES[engine]
    rest = argv[3 + len(model_args(spec, "")):]  # argv: python -m module <subcommand and model> flags...
    at = next((i for i in range(len(rest)) if drop and rest[i:i + len(drop)] == drop), None)
    if at is not None:
        rest = rest[:at] + rest[at + len(drop):]
    dropped = {spec.host_flag, spec.port_flag}
    out, i = [], 0
    while i < len(rest):
        if rest[i] in dropped:
            i += 2
            continue
        out.append(rest[i])
        i += 1
    return out


def serving_command(engine: str, argv: list[str], model_name: str, cpu_args: list[str]) -> str:
    """The command users run (the engine's own entry point, the model by its published name) with the
    flags this verification used, less this machine's CPU-only settings."""
    flags = _flags(engine, argv, cpu_args)
    return " ".join([ENGINES[engine].user_command.format(model=model_name), *map(shlex.quote, flags)])


def cpu_command(engine: str, argv: list[str], model_name: str, cpu_env: dict[str, str]) -> str:
    """The command exactly as it ran here on the CPU, with the settings the workbench added."""
    spec = ENGINES[engine]
    env = [f"{k}={shlex.quote(v)}" for k, v in cpu_env.items()]
    return " ".join([*env, "python", "-m", spec.module, *model_args(spec, model_name), *map(shlex.quote, _flags(engine, argv, []))])


def _front_matter(release: Release, stage: Stage) -> dict:
    source = stage.needs[0]
    kind = dict(KINDS[stage.kind].card_meta(stage))
    meta = {"base_model": release.base_model if source == SOURCE else f"{release.name}-{source}",
            "library_name": kind.pop("library_name", "transformers"), "pipeline_tag": "text-generation"}
    if release.license:
        meta["license"] = release.license
    tags = ["workbench", *kind.pop("tags", [])]
    meta.update(kind)
    return {**meta, "tags": [t for t in dict.fromkeys(tags) if t]}


def _verification_lines(info: dict, model_name: str) -> list[str]:
    state = info["state"]
    verifications = [v for v in info["verifications"] if v["verdict"] != "stale"]  # of other bytes: not this file's
    lines = [f"State: **{state}** ({info['state_reason']})."
             if state != "served" else "State: **served**: an engine loaded it in this release and every check passed.", ""]
    lines += [f"Kernels: {v['kernels']} ({v['engine']})." for v in verifications if v["kernels"] != "native"]
    lines += sorted({f"Kernels {v['engine']} logged choosing: {', '.join(run['kernels_logged'])}."
                     for v in verifications for run in v["runs"] if run.get("kernels_logged")})
    lines += sorted({"Compared with: its base + LoRA adapter evaluated by peft's own layers (not the workbench's merge math)."
                     for v in verifications if (v.get("reference_by") or "").startswith("peft")})
    if not verifications:
        return lines
    lines += ["Each command below served this artifact during verification (bound to 127.0.0.1 on a free port). Its "
              "greedy tokens were scored by the reference (the share that are the reference's top-1, and the largest "
              "|Δlogprob|), and its own log-probabilities of held-out text were compared position by position with the "
              "reference's (mean and p99 |Δlogprob| of the real next tokens, top-1 agreement).", "",
              "| engine | version | TP | result | greedy tokens agreeing | max abs Δlogprob | held-out positions | "
              "mean / p99 abs Δlogprob | held-out top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for v in verifications:
        for run in v["runs"]:
            agree = f"{run['token_agreement']:.1%}" if run["token_agreement"] is not None else "-"
            delta = run["max_logprob_delta"] if run["max_logprob_delta"] is not None else "-"
            forced = run.get("forced") or {}
            held = (f"{forced['positions']} | {forced['mean_logprob_delta']} / {forced['p99_logprob_delta']} | "
                    f"{forced['top1_agreement']:.1%}") if forced.get("positions") else "- | - | -"
            lines.append(f"| {v['engine']} | {v['engine_version'] or '?'} | {run['tp']} | "
                         f"{'passed' if run['passed'] else 'FAILED'} | {agree} | {delta} | {held} |")
    recovered = [(v["engine"], run["tp"], task, metric, r) for v in verifications for run in v["runs"]
                 for task, metrics in (run.get("eval") or {}).items() for metric, r in metrics.items()]
    if recovered:  # verify --eval: lm-eval on the served artifact and on its source
        lines += ["", "| engine | TP | task (lm-eval) | metric | this model | source | recovered |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {engine} | {tp} | {task} | {metric} | {r['artifact']:.4g} | {r['source']:.4g} | {r['recovery']:.1%} |"
                  for engine, tp, task, metric, r in recovered if r["source"] is not None]
    proven = [(v["engine"], run) for v in verifications for run in v["runs"] if run["passed"] and run["argv"]]
    lines.append("")
    for engine, run in proven:
        lines += [f"{engine}, TP={run['tp']}:", "```bash", serving_command(engine, run["argv"], model_name, run["cpu_args"]), "```"]
    on_cpu = [(engine, run) for engine, run in proven if run["cpu_env"] or run["cpu_args"]]
    if on_cpu:
        lines += ["", "On CPU (how it ran in this verification, with every setting the workbench added):", ""]
        if any(v["kernels"].startswith("reference") for v in verifications):
            lines += ["With the workbench's reference kernels, which `workbench verify` loads into the engine through its "
                      "plugin entry points (`workbench/engine_plugins/` on its PYTHONPATH): the command alone runs without them.", ""]
        for engine, run in on_cpu:
            lines += ["```bash", cpu_command(engine, run["argv"], model_name, {**run["env"], **run["cpu_env"]}), "```"]
    return lines


def _card(release: Release, stage: Stage, artifacts: dict, title: str, model_name: str) -> str:
    info = artifacts[stage.id]
    meta = yaml.safe_dump(_front_matter(release, stage), sort_keys=False).strip()
    source = release.base_model if stage.needs[0] == SOURCE else f"{release.name}-{stage.needs[0]}"
    lines = ["---", meta, "---", "", f"# {title}", "",
             f"{KINDS[stage.kind].made(release, source)} by workbench {__version__} (release `{release.name}`). How it was made, step by step, "
             f"with every input's sha256 and the tool versions: `{manifest_path(stage.output).name}`.", "",
             "## Proven serving", "", *_verification_lines(info, model_name), ""]
    quality = KINDS[stage.kind].quality_lines(stage, info["quality"])
    if quality:
        lines += ["## Quality", "", *quality, ""]
    return "\n".join(lines)


def _write_cards(release: Release, artifacts: dict) -> None:
    gguf_sections = []
    for stage in release.artifacts:
        if artifacts[stage.id]["status"] != "ok":
            continue
        if KINDS[stage.kind].gguf_card:  # one card for all of them, beside them
            gguf_sections.append(_card(release, stage, artifacts, stage.output.name, stage.output.name).split("---\n", 2)[2])
            continue
        name = stage.output.name
        card = _card(release, stage, artifacts, name, name)
        replace_file(stage.output / CARD, card)
        _list_in_manifest(stage.output, stage.output / CARD)
    ggufs = [s for s in release.artifacts if KINDS[s.kind].gguf_card and artifacts[s.id]["status"] == "ok"]
    if ggufs:
        meta = yaml.safe_dump({**_front_matter(release, ggufs[0]), "tags": ["workbench", "gguf"]}, sort_keys=False).strip()
        files = ["| file | type | size |", "|---|---|---|"] + [
            f"| {_gguf_name(s.output)} | {s.options['outtype'].upper()} | {sum(p.stat().st_size for p in gguf_parts(s.output)) / 2**20:.1f} MiB |"
            for s in ggufs]
        text = "\n".join(["---", meta, "---", "", f"# {release.gguf_folder.name}", "", *files, "", *gguf_sections])
        replace_file(release.gguf_folder / CARD, text)


def _gguf_name(output: Path) -> str:
    """A GGUF's name in the card: the file, or a split set's folder with its first part, which llama.cpp loads."""
    parts = gguf_parts(output)
    return output.name if len(parts) == 1 and parts[0] == output else f"{output.name}/{parts[0].name} ({len(parts)} parts)"


def _list_in_manifest(folder: Path, card: Path) -> None:
    manifest = read_manifest(folder)
    if manifest is None or artifact_digest(folder) is None:
        return
    manifest["files"][card.name] = {"sha256": sha256_file(card), "size": card.stat().st_size}
    replace_file(manifest_path(folder), json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------- CI reports

def junit_xml(release: Release, index: dict) -> bytes:
    """One test suite for the builds (a failed quality gate is a failure), then each verify report's suites."""
    suites = ET.Element("testsuites", name=f"workbench release {release.name}")
    builds = [e for e in index["stages"] if not KINDS[e["kind"]].report]
    suite = ET.SubElement(suites, "testsuite", name="build", tests=str(len(builds)),
                          failures=str(sum(e["status"] != "ok" for e in builds)))
    for e in builds:
        case = ET.SubElement(suite, "testcase", classname=f"release.{e['kind']}", name=e["id"], time=f"{e.get('seconds') or 0:.3f}")
        if e["status"] != "ok":
            ET.SubElement(case, "failure", message=(e.get("error") or e["status"])[:500]).text = e.get("error") or e["status"]
        else:
            ET.SubElement(case, "system-out").text = f"{e['action']}: {e['output']}"
    for e in index["stages"]:
        if KINDS[e["kind"]].report:
            junit = Path(e["output"]) / "junit.xml"
            if e["status"] == "stale":
                suite = ET.SubElement(suites, "testsuite", name=e["id"], tests="1", skipped="1")
                case = ET.SubElement(suite, "testcase", classname="release.verify", name=e["id"])
                ET.SubElement(case, "skipped", message=e["error"])
            elif junit.is_file():
                for verify_suite in ET.parse(junit).getroot():
                    verify_suite.set("name", f"{e['id']}: {verify_suite.get('name')}")
                    suites.append(verify_suite)
            elif e["status"] != "ok":
                failed = ET.SubElement(suites, "testsuite", name=e["id"], tests="1", failures="1")
                case = ET.SubElement(failed, "testcase", classname="release.verify", name=e["id"])
                ET.SubElement(case, "failure", message=(e.get("error") or e["status"])[:500]).text = e.get("error") or e["status"]
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


def table(index: dict) -> tuple[list[str], list[list[str]]]:
    """Artifacts x checks: build status, quality, and one column per engine and TP size verified."""
    columns: list[str] = []
    for a in index["artifacts"].values():
        for v in a["verifications"]:
            for run in v["runs"]:
                name = f"{v['engine']} tp={run['tp']}"
                if name not in columns:
                    columns.append(name)
    rows = []
    for artifact_id, a in index["artifacts"].items():
        q = a["quality"]
        quality = (f"ppl {q['ppl_delta']:+.2%}, top-1 {q['top1_agreement']:.1%}" if "ppl_delta" in q
                   else f"self-check {q['self_check_max_rel_error']:.1e}" if "self_check_max_rel_error" in q else "")
        cells = {}
        for v in a["verifications"]:
            for run in v["runs"]:
                agree = f" {run['token_agreement']:.0%}" if run["token_agreement"] is not None else ""
                cells[f"{v['engine']} tp={run['tp']}"] = "stale" if v["verdict"] == "stale" else ("pass" if run["passed"] else "FAIL") + agree
        status = {"ok": "ok", "missing": "not built"}.get(a["status"], a["status"].upper())
        state = a["state"] if a["state"] != "failed" else "FAILED"
        if a["kernels"]:  # served: whose kernels computed it
            state += f", {a['kernels']} kernels"
        if not a["meets_requirement"]:
            state += f" (needs {a['require']})"
        rows.append([artifact_id, a["kind"], status, quality, *(cells.get(c, "-") for c in columns), state])
    return ["artifact", "kind", "build", "quality", *columns, "state"], rows


def verdict(index: dict) -> str:
    """The release index's outcome in one word: PASSED, INCOMPLETE (its exit code says incomplete) or FAILED."""
    return "PASSED" if index["passed"] else "INCOMPLETE" if index["exit_code"] == INCOMPLETE else "FAILED"


def summary_markdown(index: dict) -> str:
    """reports/summary.md of a release index: the artifact table, why each artifact not served is not, and each
    stage's action and seconds."""
    header, rows = table(index)
    lines = [f"## workbench release {index['name']}: {verdict(index)}", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"- **{i}** {a['state']}: {a['state_reason']}" for i, a in index["artifacts"].items() if a["state"] != "served"]
    lines += ["", "| stage | action | seconds |", "|---|---|---|"]
    for e in index["stages"]:
        lines.append(f"| {e['id']} | {e['action']}{': ' + e['error'].splitlines()[0] if e.get('error') else ''} | {e.get('seconds', '-')} |")
    return "\n".join(lines) + "\n"
