"""The Grafana dashboard, and the metric names the dashboard and the alert rules use against the
families cdcflow declares in src/metrics/ (mod.rs, edges.rs)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from deploy_files import (
    ALERTS,
    DASHBOARD,
    METRICS_SOURCE,
    Problems,
    declared_metric_families,
    k8s_documents,
    metric_family,
    metric_names,
    read_yaml,
)

# The dashboard's datasource variable: every panel and query goes through it, so that the
# dashboard imports into any Grafana without naming one of its datasources.
DATASOURCE = "${datasource}"
# Template variables the dashboard offers, besides the datasource.
VARIABLES = ("job", "instance", "pipeline")
# Grafana's own interval variables, replaced by a duration so that promtool can parse the
# queries (the template variables only appear inside label matchers' strings).
GRAFANA_INTERVALS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
# The dashboard's fields that hold queries: panel targets' `expr`, and template variables'
# `query` and `definition` (label_values(...), not PromQL: names only).
QUERY_KEYS = ("expr", "query", "definition")


def all_panels(panels: list[Any]) -> Iterator[dict[str, Any]]:
    """Panels, those inside collapsed rows included."""
    for panel in panels:
        if isinstance(panel, dict):
            yield panel
            yield from all_panels(panel.get("panels") or [])


def datasource_uid(value: Any) -> Any:
    return value.get("uid") if isinstance(value, dict) else value


def load_dashboard(root: Path, problems: Problems) -> dict[str, Any] | None:
    try:
        dashboard = json.loads((root / DASHBOARD).read_text())
    except json.JSONDecodeError as error:
        problems.add(DASHBOARD, f"not valid JSON: {error}")
        return None
    if not isinstance(dashboard, dict) or not isinstance(dashboard.get("panels"), list):
        problems.add(DASHBOARD, "not a Grafana dashboard: no top-level object with a `panels` list")
        return None
    return dashboard


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, text) of every query of the dashboard (panel targets, template variables) and
    of its descriptions, which name metrics for the reader."""
    if isinstance(dashboard.get("description"), str):
        yield "description", dashboard["description"]
    for panel in all_panels(dashboard["panels"]):
        if isinstance(panel.get("description"), str):
            yield f'panel {panel.get("id")} "{panel.get("title")}" description', panel["description"]
        for target in panel.get("targets") or []:
            for key in QUERY_KEYS:
                if isinstance(target.get(key), str):
                    yield f'panel {panel.get("id")} "{panel.get("title")}" query {target.get("refId")}', target[key]
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") != "query":
            continue
        seen = set()
        for key in QUERY_KEYS:
            value = variable.get(key)
            if isinstance(value, dict):
                value = value.get("query")
            if isinstance(value, str) and value not in seen:
                seen.add(value)
                yield f'variable {variable.get("name")}', value


def check_dashboard(root: Path, outdir: Path) -> None:
    """deploy/grafana/cdcflow.json: valid JSON, a Grafana dashboard that queries Prometheus only
    through the ${datasource} variable, offers the job, instance and pipeline variables, with
    unique panel ids. Writes its panel queries as recording rules to OUTDIR/dashboard-queries.yml
    for `promtool check rules` (the shell script runs it)."""
    problems = Problems()
    dashboard = load_dashboard(root, problems)
    if dashboard is None:
        problems.finish("")
    schema_version = dashboard.get("schemaVersion")
    if not isinstance(schema_version, int) or schema_version < 36:
        problems.add(DASHBOARD, f"schemaVersion {schema_version!r}: export it from Grafana 9 or later (36+)")
    for key in ("uid", "title"):
        if not isinstance(dashboard.get(key), str) or not dashboard[key]:
            problems.add(DASHBOARD, f"no {key}: provisioning and links need a fixed one")
    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list") or []}
    source = variables.get("datasource") or {}
    if source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.add(DASHBOARD, "templating needs a `datasource` variable of type datasource, query prometheus")
    for name in VARIABLES:
        variable = variables.get(name)
        if variable is None or variable.get("type") != "query":
            problems.add(DASHBOARD, f"templating needs a query variable `{name}` (label_values)")
        elif datasource_uid(variable.get("datasource")) != DATASOURCE:
            problems.add(DASHBOARD, f"variable {name}: query it through {DATASOURCE}")
    ids: dict[Any, str] = {}
    rules = []
    panels = list(all_panels(dashboard["panels"]))
    for panel in panels:
        where = f'panel {panel.get("id")} "{panel.get("title")}"'
        if panel.get("id") in ids:
            problems.add(DASHBOARD, f"{where}: id repeats that of \"{ids[panel.get('id')]}\"")
        ids[panel.get("id")] = str(panel.get("title"))
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")) or grid["x"] + grid["w"] > 24:
            problems.add(DASHBOARD, f"{where}: gridPos needs x, y, w, h within the 24 columns")
        if panel.get("type") == "row":
            continue
        if datasource_uid(panel.get("datasource")) != DATASOURCE:
            problems.add(DASHBOARD, f"{where}: datasource must be {DATASOURCE}, not {panel.get('datasource')}")
        targets = panel.get("targets") or []
        if not targets:
            problems.add(DASHBOARD, f"{where}: no query")
        for target in targets:
            if datasource_uid(target.get("datasource", DATASOURCE)) != DATASOURCE:
                problems.add(DASHBOARD, f"{where} query {target.get('refId')}: datasource must be {DATASOURCE}")
            expr = target.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.add(DASHBOARD, f"{where} query {target.get('refId')}: no expr")
                continue
            rules.append(
                {
                    "record": f"dashboard:panel_{panel.get('id')}_{target.get('refId')}",
                    "expr": GRAFANA_INTERVALS.sub("5m", expr),
                }
            )
    (outdir / "dashboard-queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False)
    )
    problems.finish(
        f"{DASHBOARD}: schemaVersion {schema_version}, {len(panels)} panels, {len(rules)} queries "
        f"through {DATASOURCE}, variables {', '.join(VARIABLES)}"
    )


def check_metric_names(root: Path) -> None:
    """Every cdcflow_ name in the dashboard's queries and descriptions and in the alert rules
    (expressions and annotations, both files) is a family declared in src/metrics/*.rs, or a
    histogram's _bucket/_sum/_count series of one."""
    problems = Problems()
    declared = declared_metric_families(root)
    if not declared:
        problems.add(METRICS_SOURCE, 'declares no "cdcflow_..." family: has the registry moved?')
        problems.finish("")
    used: dict[str, set[str]] = {}  # family -> files naming it

    def check(file: str, where: str, text: str) -> None:
        for name in sorted(metric_names(text)):
            family = metric_family(name, declared)
            if family is None:
                problems.add(file, f"{where}: `{name}` is not a metric family declared in {METRICS_SOURCE}")
            else:
                used.setdefault(family, set()).add(file)

    dashboard = load_dashboard(root, problems)
    queries = 0
    if dashboard is not None:
        for where, text in dashboard_queries(dashboard):
            queries += "description" not in where
            check(DASHBOARD, where, text)
    rule_files: list[tuple[str, list[Any]]] = [(ALERTS, (read_yaml(root / ALERTS) or {}).get("groups") or [])]
    for rel, doc in k8s_documents(root):
        if doc.get("kind") == "PrometheusRule":
            rule_files.append((rel, (doc.get("spec") or {}).get("groups") or []))
    rules = 0
    for file, groups in rule_files:
        for group in groups:
            for rule in group.get("rules") or []:
                rules += 1
                where = f"alert {rule['alert']}" if "alert" in rule else f"rule {rule.get('record')}"
                texts = [str(rule.get("expr", ""))] + [str(v) for v in (rule.get("annotations") or {}).values()]
                check(file, where, "\n".join(texts))
    shown = {f for f, files in used.items() if DASHBOARD in files}
    missing = sorted(declared - shown)
    problems.finish(
        f"{queries} dashboard queries and {rules} rules of {len(rule_files)} files name "
        f"{len(used)} families, all declared in {METRICS_SOURCE}; the dashboard shows "
        f"{len(shown)} of its {len(declared)}" + (f" (not {', '.join(missing)})" if missing else "")
    )
