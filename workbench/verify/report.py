"""Verification reports for CI: report.json (everything), junit.xml (test results), summary.md (job summary)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from ..checkpoint import replace_file


def write_reports(folder: Path, report: dict) -> dict[str, Path]:
    """Write a verify ``report`` into ``folder`` as report.json, junit.xml and summary.md; returns their paths
    ("json", "junit", "markdown")."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "junit": folder / "junit.xml", "markdown": folder / "summary.md"}
    # each a new file renamed into place: never written through a link planted at its name
    replace_file(paths["json"], json.dumps(report, indent=2) + "\n")
    replace_file(paths["junit"], junit_xml(report))
    replace_file(paths["markdown"], markdown(report))
    return paths


def junit_xml(report: dict) -> bytes:
    """A verify report as JUnit XML: a test suite per TP run, a test case per check (failed: a failure;
    incomplete: an error, never a pass; skipped: skipped)."""
    suites = ET.Element("testsuites", name="workbench verify")
    for run in report["runs"]:
        checks = run["checks"]
        suite = ET.SubElement(
            suites, "testsuite", name=f"{report['engine']} tp={run['tp']}",
            tests=str(len(checks)), failures=str(sum(c["status"] == "failed" for c in checks)),
            errors=str(sum(c["status"] == "incomplete" for c in checks)),
            skipped=str(sum(c["status"] == "skipped" for c in checks)), time=f"{sum(c['seconds'] for c in checks):.3f}",
        )
        for c in checks:
            case = ET.SubElement(suite, "testcase", classname=f"verify.{report['engine']}.tp{run['tp']}", name=c["name"], time=f"{c['seconds']:.3f}")
            if c["status"] == "failed":
                ET.SubElement(case, "failure", message=c["detail"][:500]).text = c["detail"]
            elif c["status"] == "incomplete":  # could not run: an error, never a pass
                ET.SubElement(case, "error", message=f"incomplete: {c['detail']}"[:500]).text = c["detail"]
            elif c["status"] == "skipped":
                ET.SubElement(case, "skipped", message=c["detail"])
            else:
                ET.SubElement(case, "system-out").text = c["detail"]
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


def markdown(report: dict) -> str:
    """summary.md of a verify report: verdict, artifact, engine and reference, the TP preflight, a table of the
    checks per TP run, and a line for each check that did not pass."""
    lines = [f"## workbench verify: {report['verdict'].upper()}", "", f"- artifact: `{report['artifact']}` ({report['kind']})",
             f"- engine: {report['engine']} {report.get('engine_version') or ''}; kernels: {report.get('kernels', 'native')}",
             "- reference: " + _reference_line(report), ""]
    if report.get("preflight"):
        lines += ["| TP | preflight |", "|---|---|"]
        for tp, reasons in report["preflight"].items():
            lines.append(f"| {tp} | {'loads' if not reasons else '; '.join(reasons)} |")
        lines.append("")
    names = list(dict.fromkeys(c["name"] for run in report["runs"] for c in run["checks"]))
    if report["runs"]:
        lines += ["| TP | ready (s) | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        marks = {"passed": "✅", "failed": "❌", "incomplete": "⚠️", "skipped": "➖"}
        for run in report["runs"]:
            by_name = {c["name"]: c for c in run["checks"]}
            cells = [marks[by_name[n]["status"]] if n in by_name else "" for n in names]
            lines.append(f"| {run['tp']} | {run.get('startup_seconds') or '-'} | " + " | ".join(cells) + " |")
        lines.append("")
        for run in report["runs"]:
            if run.get("engine_error"):
                lines.append(f"- tp={run['tp']} engine error: `{run['engine_error']}`")
            for c in run["checks"]:
                if c["status"] != "passed":
                    lines.append(f"- tp={run['tp']} **{c['name']}** {c['status']}: {c['detail'].splitlines()[0] if c['detail'] else ''}")
            if run.get("kernels_logged"):
                lines.append(f"- tp={run['tp']} kernels the engine logged: {', '.join(run['kernels_logged'])}")
            if run.get("argv"):
                lines.append(f"- tp={run['tp']} command: `{' '.join(run['argv'])}`")
    return "\n".join(lines) + "\n"


def _reference_line(report: dict) -> str:
    """The model compared with, and by whose code: peft's layers for base + adapter, else transformers'."""
    if not report.get("reference"):
        return report.get("reference_note") or "none"
    line = f"`{report['reference']}`"
    if report.get("reference_adapter"):
        line += f" + adapter `{report['reference_adapter']}`, by peft's own LoRA layers"
    return line + (f" ({report['reference_note']})" if report.get("reference_note") else "")
