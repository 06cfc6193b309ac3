"""What the checks of check_deploy.py share: the files' paths, the image's contract, and
readers for Compose, Dockerfile, Kubernetes and cdcflow config files."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# The Kubernetes version the manifests are validated against (kubernetes-validate vendors
# schemas for 1.25 to 1.37).
KUBERNETES_VERSION = "1.30"

COMPOSE = "docker-compose.yml"
DOCKERFILE = "deploy/docker/Dockerfile"
K8S_DIR = "deploy/k8s"
ALERTS = "deploy/prometheus/cdcflow-alerts.yml"
ALERTS_TEST = "tests/deploy/alerts.test.yml"
DASHBOARD = "deploy/grafana/cdcflow.json"
# Where cdcflow declares every metric family, each name a string literal: the files of this
# directory (mod.rs, and edges.rs for the webhook and ingress families).
METRICS_SOURCE = "src/metrics/"
# Families written outside the /metrics registry: `cdcflow reconcile` writes its own to a
# textfile or a Pushgateway.
PUSHED_METRICS_SOURCES = ("src/cli/reconcile.rs",)
PROMETHEUS_CONFIG = "deploy/prometheus/prometheus.yml"
CONFIG_SCHEMA = "schemas/config.schema.json"
SHOP_CONFIG = "examples/shop.toml"
EXAMPLES_DIR = "examples"
README = "README.md"
CRD_SCHEMAS = "tests/deploy/crd-schemas"
# The compose copy of the Postgres connector and the local stack's original.
COMPOSE_CONNECTOR = "deploy/docker/postgres-shop.connector.json"
LOCAL_CONNECTOR = "deploy/debezium/postgres-shop.json"
# Connector keys that differ between the local stack and the containers: where the database is.
CONNECTION_KEYS = {"database.hostname", "database.port"}

# The image's contract, as the README documents it.
CONFIG_PATH = "/etc/cdcflow/cdcflow.toml"
ENTRYPOINT = ["cdcflow"]
CMD = ["run", "--config", CONFIG_PATH]
STATE_DIR = "/var/lib/cdcflow"
ENV_PREFIX = "CDCFLOW__"

# Alerts the deployment must carry: (what, a pattern its expression must match).
REQUIRED_ALERTS = [
    ("a rising DLQ rate", r"rate\(cdcflow_dlq_records_total\b"),
    ("the DLQ's share of the input", r"increase\(cdcflow_dlq_records_total\[[^]]+\]\)\)\s*/"),
    ("parked entities", r"\(cdcflow_parked_entities\) > 0"),
    ("retried batches", r'cdcflow_batches_total\{[^}]*result="retried"'),
    ("aborted transactions", r'cdcflow_transactions_total\{[^}]*result="aborted"'),
    ("a stale last commit", r"time\(\) - cdcflow_last_commit_timestamp_seconds"),
    ("a growing committed lag", r"deriv\(cdcflow_consumer_committed_lag_records\["),
    ("lag without progress", r"increase\(cdcflow_records_total\[[^]]+\]\)\) == 0"),
    ("an instance that is not ready", r"cdcflow_ready == 0"),
    ("unreachable brokers", r"cdcflow_kafka_brokers_reachable == 0"),
    ("a pod that is not ready", r'kube_pod_status_ready\{[^}]*condition="true"'),
]


class Problems:
    """Collects `file: problem` lines; `finish` prints them (or the detail) and exits."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, file: str, message: str) -> None:
        self.lines.append(f"{file}: {message}")

    def finish(self, detail: str) -> None:
        if self.lines:
            print("\n".join(self.lines))
            sys.exit(1)
        print(detail)
        sys.exit(0)


# ------------------------------------------------------------------------------ metrics --


def declared_metric_families(root: Path) -> set[str]:
    """The families of src/metrics/*.rs and of the pushed metrics (PUSHED_METRICS_SOURCES):
    every string literal that is a whole cdcflow_ name."""
    paths = sorted((root / METRICS_SOURCE).glob("*.rs")) + [root / p for p in PUSHED_METRICS_SOURCES]
    return {
        name
        for path in paths
        if path.exists()
        for name in re.findall(r'"(cdcflow_[a-z0-9_]+)"', path.read_text())
    }


def metric_names(text: str) -> set[str]:
    """Every cdcflow_ name in a PromQL expression or a text. Label values such as job="cdcflow"
    or pod=~"cdcflow-0" are not one; a label value spelled like a metric name would count."""
    return set(re.findall(r"(?<![A-Za-z0-9_:])(cdcflow_[A-Za-z0-9_:]*[A-Za-z0-9_])", text))


def metric_family(name: str, declared: set[str]) -> str | None:
    """The declared family a series name belongs to: itself, or a histogram's family without
    its _bucket, _sum or _count suffix; None when there is none."""
    if name in declared:
        return name
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base if base in declared else None


# ------------------------------------------------------------------------------ readers --


def read_yaml_docs(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def read_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def cargo_package(root: Path) -> dict[str, Any]:
    with (root / "Cargo.toml").open("rb") as f:
        return tomllib.load(f)["package"]


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """`name[:tag][@digest]` -> (name, tag, digest); a registry port is not a tag."""
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
    slash, colon = ref.rfind("/"), ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :], digest
    return ref, None, digest


def pin_problem(ref: str) -> str | None:
    """Why an image reference is not pinned, or None. A pinned tag names a release with at
    least two numeric parts (4.4.0, 15.18, v3.16.0, 3.7.0.Final, 12.15-slim); floating tags
    (latest, 15, 1-bookworm, bookworm-slim) and variables are refused."""
    if not isinstance(ref, str) or not ref.strip():
        return "no image"
    if "$" in ref:
        return f"`{ref}` is set by a variable, so its tag is not pinned in the file"
    name, tag, digest = split_image(ref)
    if digest is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        return f"`{ref}` has a malformed digest"
    if tag is None:
        return f"`{ref}` has no tag (it means `latest`)"
    if tag == "latest":
        return f"`{ref}` uses the floating tag `latest`"
    if not re.match(r"v?\d+\.\d+", tag):
        return f"`{ref}`: tag `{tag}` is not a release version (e.g. 1.2.3 or 15.18-bookworm)"
    return None


def duration_seconds(value: Any) -> float | None:
    """cdcflow's durations: "250ms", "10s", "2m", "24h", "3d", or a number of milliseconds."""
    if isinstance(value, int):
        return value / 1000
    match = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|d)\s*", str(value))
    if not match:
        return None
    number, unit = int(match[1]), match[2]
    return {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}[unit] * number


def compose_duration_seconds(value: Any) -> float | None:
    """Compose durations: "40s", "1m30s", "500ms"."""
    text = str(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def apply_overrides(config: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """`CDCFLOW__A__B=value` sets a.b, the value read as TOML when it parses, else as text
    (what src/config/mod.rs does)."""
    for variable, value in sorted(env.items()):
        if not variable.startswith(ENV_PREFIX):
            continue
        segments = [s.lower() for s in variable[len(ENV_PREFIX) :].split("__")]
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = str(value)
        table = config
        for segment in segments[:-1]:
            table = table.setdefault(segment, {})
        table[segments[-1]] = parsed
    return config


def config_problems(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(e.path)):
        key = ".".join(str(p) for p in error.path) or "(top level)"
        problems.append(f"config key `{key}`: {error.message}")
    return problems


def listen_port(config: dict[str, Any]) -> int:
    listen = config.get("http", {}).get("listen", "0.0.0.0:9464")
    return int(str(listen).rsplit(":", 1)[1])


def shutdown_timeout(config: dict[str, Any]) -> float:
    seconds = duration_seconds(config.get("kafka", {}).get("shutdown_timeout", "30s"))
    return 30.0 if seconds is None else seconds


def env_list_to_dict(env: Any) -> dict[str, str]:
    if isinstance(env, dict):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    result = {}
    for item in env or []:
        key, _, value = str(item).partition("=")
        result[key] = value
    return result


# -------------------------------------------------------------------------- Dockerfile --


class Instruction:
    def __init__(self, line: int, keyword: str, args: str) -> None:
        self.line, self.keyword, self.args = line, keyword.upper(), args

    def exec_form(self) -> list[str] | None:
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines inside one are dropped, as
    Docker does."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        instructions.append(Instruction(start, keyword, args.strip()))
        buffer = ""
    return instructions


def dockerfile_stages(instructions: list[Instruction]) -> list[tuple[Instruction, list[Instruction]]]:
    stages: list[tuple[Instruction, list[Instruction]]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append((instruction, []))
        elif stages:
            stages[-1][1].append(instruction)
    return stages


def from_image(instruction: Instruction) -> tuple[str, str | None]:
    words = [w for w in instruction.args.split() if not w.startswith("--")]
    image = words[0] if words else ""
    alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
    return image, alias


# --------------------------------------------------------------------- Kubernetes files --


def k8s_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / K8S_DIR).iterdir() if p.suffix in (".yaml", ".yml"))


def k8s_documents(root: Path) -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in k8s_files(root):
        if path.name.startswith("kustomization."):
            continue
        rel = str(path.relative_to(root))
        for doc in read_yaml_docs(path):
            docs.append((rel, doc))
    return docs


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return [spec]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [((spec.get("template") or {}).get("spec")) or {}]
    if kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        return [((job.get("template") or {}).get("spec")) or {}]
    return []


def containers_of(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for key in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(key) or []]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels, matchExpressions) selects these labels; an empty
    selector counts as selecting nothing here (it would select every pod)."""
    match = (selector or {}).get("matchLabels") or {}
    expressions = (selector or {}).get("matchExpressions") or []
    if not match and not expressions:
        return False
    for e in expressions:
        value, values = labels.get(e.get("key")), e.get("values") or []
        ok = {
            "In": value in values,
            "NotIn": value not in values,
            "Exists": e.get("key") in labels,
            "DoesNotExist": e.get("key") not in labels,
        }.get(e.get("operator"), False)
        if not ok:
            return False
    return all(labels.get(k) == v for k, v in match.items())
