"""The Kubernetes manifests: schemas, what they promise each other, and the alert rules (their
metric names: checks_metrics.py)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import yaml

from deploy_files import (
    ALERTS,
    ALERTS_TEST,
    CMD,
    CONFIG_PATH,
    CONFIG_SCHEMA,
    CRD_SCHEMAS,
    K8S_DIR,
    KUBERNETES_VERSION,
    REQUIRED_ALERTS,
    SHOP_CONFIG,
    Problems,
    apply_overrides,
    cargo_package,
    config_problems,
    k8s_documents,
    k8s_files,
    listen_port,
    read_yaml,
    selects,
    shutdown_timeout,
    split_image,
)


def check_k8s_schema(root: Path) -> None:
    import kubernetes_validate  # the venv's; imported here so the other checks start faster

    problems = Problems()
    files = k8s_files(root)
    kustomization = [p for p in files if p.name.startswith("kustomization.")]
    others = {p.name for p in files if not p.name.startswith("kustomization.")}
    if not kustomization:
        problems.add(K8S_DIR, "no kustomization.yaml (kubectl apply -k deploy/k8s)")
    else:
        listed = set(read_yaml(kustomization[0]).get("resources") or [])
        rel = str(kustomization[0].relative_to(root))
        for name in sorted(others - listed):
            problems.add(rel, f"resources does not list {name}")
        for name in sorted(listed - others):
            problems.add(rel, f"resources lists {name}, which does not exist")
    counts: dict[str, int] = {}
    for rel, doc in k8s_documents(root):
        kind, api = doc.get("kind"), str(doc.get("apiVersion"))
        name = f"{kind}/{(doc.get('metadata') or {}).get('name')}"
        counts[kind] = counts.get(kind, 0) + 1
        group, _, version = api.rpartition("/")
        if group.endswith("monitoring.coreos.com"):
            schema_file = root / CRD_SCHEMAS / f"{str(kind).lower()}-monitoring-{version}.json"
            if not schema_file.exists():
                problems.add(rel, f"{name}: no schema for {api} {kind} under {CRD_SCHEMAS}")
                continue
            validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text()))
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
                path = ".".join(str(p) for p in error.path) or "(top level)"
                problems.add(rel, f"{name}: {path}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.add(rel, f"{name}: no Kubernetes {KUBERNETES_VERSION} schema for {api} {kind}")
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path) or "(top level)"
            problems.add(rel, f"{name}: {path}: {error.message}")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    problems.finish(f"Kubernetes {KUBERNETES_VERSION} strict schemas + {CRD_SCHEMAS}: {summary}")


def check_k8s(root: Path) -> None:
    """What the manifests promise each other and the image."""
    problems = Problems()
    docs = k8s_documents(root)
    by_kind: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for rel, doc in docs:
        by_kind.setdefault(str(doc.get("kind")), []).append((rel, doc))
    for kind in (
        "StatefulSet",
        "ConfigMap",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
    ):
        if kind not in by_kind:
            problems.add(K8S_DIR, f"no {kind}")
    if "StatefulSet" not in by_kind or "ConfigMap" not in by_kind:
        problems.finish("")
    rel, sts = by_kind["StatefulSet"][0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"].get("labels") or {}
    containers = [c for c in pod.get("containers") or [] if c.get("name") == "cdcflow"] or (
        pod.get("containers") or []
    )[:1]
    container = containers[0] if containers else {}
    version = cargo_package(root)["version"]
    if split_image(str(container.get("image")))[1] != version:
        problems.add(
            rel,
            f"container image `{container.get('image')}`: tag it {version} (Cargo.toml), as the Docker docs build it",
        )
    if container.get("command"):
        problems.add(rel, "container command overrides the image's ENTRYPOINT cdcflow")
    args = container.get("args")
    if args is not None and args != CMD:
        problems.add(rel, f"container args {args} differ from the image's CMD {CMD}")
    if not selects(spec.get("selector") or {}, pod_labels):
        problems.add(rel, "spec.selector does not select the pod template's labels")

    # The config the pods read: ConfigMap TOML + container env, valid and consistent.
    env = {e["name"]: e for e in container.get("env") or []}
    instance = env.get("CDCFLOW__KAFKA__INSTANCE_ID", {})
    if ((instance.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") != "metadata.name":
        problems.add(
            rel, "env CDCFLOW__KAFKA__INSTANCE_ID must come from fieldRef metadata.name (the pod name)"
        )
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    config_mount = mounts.get(str(PurePosixPath(CONFIG_PATH).parent))
    configmap_name = (
        ((volumes.get(config_mount["name"]) or {}).get("configMap") or {}).get("name")
        if config_mount
        else None
    )
    cm = next((d for _, d in by_kind["ConfigMap"] if d["metadata"]["name"] == configmap_name), None)
    if cm is None:
        problems.add(
            rel,
            f"no ConfigMap volume mounted at {PurePosixPath(CONFIG_PATH).parent} (found `{configmap_name}`)",
        )
        problems.finish("")
    cm_rel = next(r for r, d in by_kind["ConfigMap"] if d is cm)
    text = (cm.get("data") or {}).get(PurePosixPath(CONFIG_PATH).name)
    if text is None:
        problems.add(cm_rel, f"ConfigMap/{configmap_name} has no key {PurePosixPath(CONFIG_PATH).name}")
        problems.finish("")
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        problems.add(cm_rel, f"{PurePosixPath(CONFIG_PATH).name} is not valid TOML: {error}")
        problems.finish("")
    config = apply_overrides(config, {k: str(v.get("value", "pod-name")) for k, v in env.items()})
    schema = json.loads((root / CONFIG_SCHEMA).read_text())
    for problem in config_problems(config, schema):
        problems.add(cm_rel, problem)
    with (root / SHOP_CONFIG).open("rb") as f:
        if config.get("pipeline") != tomllib.load(f).get("pipeline"):
            problems.add(cm_rel, f"the [[pipeline]] tables differ from {SHOP_CONFIG}'s")
    if "kafka" not in config or "bootstrap_servers" not in config["kafka"]:
        problems.add(cm_rel, "needs a [kafka] section with bootstrap_servers")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= shutdown_timeout(config):
        problems.add(
            rel,
            f"terminationGracePeriodSeconds {grace} must exceed kafka.shutdown_timeout ({shutdown_timeout(config):g}s)",
        )
    state = PurePosixPath(str(config.get("state", {}).get("path", "cdcflow-state.db")))
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []}
    state_mount = mounts.get(str(state.parent))
    if not state.is_absolute() or state_mount is None or state_mount["name"] not in claims:
        problems.add(
            rel,
            f"state.path {state} must lie directly in a volumeClaimTemplate's mount (claims {sorted(claims)}, mounts {sorted(mounts)})",
        )

    # Probes and ports: /healthz and /readyz on the metrics port.
    port = listen_port(config)
    named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    if port not in named.values():
        problems.add(rel, f"no containerPort {port} (http.listen)")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (container.get(probe) or {}).get("httpGet") or {}
        target = named.get(get.get("port"), get.get("port"))
        if get.get("path") != path or target != port:
            problems.add(
                rel,
                f"{probe} must be httpGet {path} on port {port} (found {get.get('path')} on {get.get('port')})",
            )

    # Security and resources.
    security = pod.get("securityContext") or {}
    csecurity = container.get("securityContext") or {}
    if not (security.get("runAsNonRoot") or csecurity.get("runAsNonRoot")):
        problems.add(rel, "securityContext.runAsNonRoot must be true")
    uid = csecurity.get("runAsUser", security.get("runAsUser"))
    if not uid:
        problems.add(rel, "securityContext.runAsUser must be a non-zero uid (the image's is 10001)")
    if csecurity.get("allowPrivilegeEscalation") is not False:
        problems.add(rel, "container securityContext.allowPrivilegeEscalation must be false")
    resources = container.get("resources") or {}
    for section, key in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
        if key not in (resources.get(section) or {}):
            problems.add(rel, f"resources.{section}.{key} is not set")

    # Services, the ServiceMonitor and the PDB select what they should.
    services = by_kind.get("Service", [])
    headless = [d for _, d in services if d["metadata"]["name"] == spec.get("serviceName")]
    if not headless or headless[0]["spec"].get("clusterIP") != "None":
        problems.add(
            rel, f"serviceName `{spec.get('serviceName')}` must be a headless Service (clusterIP: None)"
        )
    headless_name = headless[0]["metadata"]["name"] if headless else None
    for srel, service in services:
        if not selects({"matchLabels": service["spec"].get("selector") or {}}, pod_labels):
            problems.add(
                srel, f"Service/{service['metadata']['name']} does not select the StatefulSet's pods"
            )
        for p in service["spec"].get("ports") or []:
            if named.get(p.get("targetPort"), p.get("targetPort")) != port:
                problems.add(
                    srel,
                    f"Service/{service['metadata']['name']} port {p.get('name')} does not reach port {port}",
                )
    for mrel, monitor in by_kind.get("ServiceMonitor", []):
        chosen = [
            d
            for _, d in services
            if selects(monitor["spec"].get("selector") or {}, d["metadata"].get("labels") or {})
        ]
        chosen_names = [d["metadata"]["name"] for d in chosen]
        if len(chosen) != 1 or chosen_names[0] == headless_name:
            problems.add(
                mrel,
                f"ServiceMonitor must select exactly one Service, the metrics one, not the headless one (selects {chosen_names})",
            )
            continue
        port_names = {p.get("name") for p in chosen[0]["spec"].get("ports") or []}
        for endpoint in monitor["spec"].get("endpoints") or []:
            if endpoint.get("port") not in port_names or endpoint.get("path", "/metrics") != "/metrics":
                problems.add(
                    mrel,
                    f"endpoint {endpoint} must scrape /metrics on a port of Service/{chosen_names[0]} ({sorted(port_names)})",
                )
        if (chosen[0]["metadata"].get("labels") or {}).get(monitor["spec"].get("jobLabel")) != "cdcflow":
            problems.add(
                mrel,
                'jobLabel must name a Service label whose value is cdcflow: the alerts select up{job="cdcflow"}',
            )
    for prel, pdb in by_kind.get("PodDisruptionBudget", []):
        if not selects(pdb["spec"].get("selector") or {}, pod_labels):
            problems.add(prel, "PodDisruptionBudget does not select the StatefulSet's pods")
        if pdb["spec"].get("maxUnavailable") is None and pdb["spec"].get("minAvailable") is None:
            problems.add(prel, "set maxUnavailable or minAvailable")
    problems.finish(
        f"StatefulSet/{sts['metadata']['name']}: instance id = pod name, state {state} on claim "
        f"{state_mount['name'] if state_mount else '?'}, grace {grace}s > shutdown {shutdown_timeout(config):g}s, "
        f"probes /healthz /readyz on {port}, uid {uid}; Services, ServiceMonitor and PDB select its pods"
    )


def check_rules(root: Path, outdir: Path) -> None:
    """Writes the PrometheusRule's groups to OUTDIR/prometheusrule-groups.yml for promtool and
    checks them against deploy/prometheus/cdcflow-alerts.yml, the alerts the deployment must
    carry, their labels and annotations, and the unit tests' coverage."""
    problems = Problems()
    rules = [(rel, d) for rel, d in k8s_documents(root) if d.get("kind") == "PrometheusRule"]
    if not rules:
        problems.add(K8S_DIR, "no PrometheusRule")
        problems.finish("")
    rel, rule = rules[0]
    groups = (rule.get("spec") or {}).get("groups") or []
    (outdir / "prometheusrule-groups.yml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    names = [g.get("name") for g in groups]
    if len(set(names)) != len(names):
        problems.add(rel, f"group names repeat: {names}")
    compose_groups = (read_yaml(root / ALERTS) or {}).get("groups") or []
    for group in compose_groups:
        twin = next((g for g in groups if g.get("name") == group.get("name")), None)
        if twin is None:
            problems.add(rel, f"lacks the group `{group.get('name')}` of {ALERTS}")
        elif twin != group:
            problems.add(rel, f"group `{group.get('name')}` differs from {ALERTS} (copy it over)")
    alerts = [r for g in groups for r in g.get("rules") or [] if "alert" in r]
    exprs = "\n".join(str(r.get("expr")) for r in alerts)
    for what, pattern in REQUIRED_ALERTS:
        if not re.search(pattern, exprs):
            problems.add(rel, f"no alert on {what} (an expression matching {pattern})")
    # The metric names are checked by the metric-names check (checks_metrics.py).
    names = [str(r["alert"]) for r in alerts]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.add(rel, f"alert {name} is defined {names.count(name)} times: give each its own name")
    for r in alerts:
        annotations = r.get("annotations") or {}
        if "severity" not in (r.get("labels") or {}) or not {"summary", "description"} <= set(annotations):
            problems.add(
                rel, f"alert {r['alert']}: give it a severity label and summary and description annotations"
            )
    # Every alert has a unit test: promtool only runs the cases there are.
    tested = {
        str(case.get("alertname"))
        for test in (read_yaml(root / ALERTS_TEST) or {}).get("tests") or []
        for case in test.get("alert_rule_test") or []
    }
    for name in sorted(set(names) - tested):
        problems.add(ALERTS_TEST, f"no alert_rule_test case for alert {name} of {rel}")
    for name in sorted(tested - set(names)):
        problems.add(ALERTS_TEST, f"cases for alert {name}, which {rel} does not define")
    problems.finish(
        f"{len(groups)} groups, {len(alerts)} alerts, each with a case in {ALERTS_TEST}; "
        f"group(s) {[g.get('name') for g in compose_groups]} equal {ALERTS}"
    )
