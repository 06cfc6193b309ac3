#!/usr/bin/env python3
"""The checks of tests/check-deploy-files.sh that read files against each other.

The shell script runs the external tools (check-jsonschema, hadolint, promtool); these files hold
the checks they cannot do: pinned images, the Compose start order and config (checks_compose.py),
the Dockerfile against the README (checks_docker.py), the Kubernetes schemas, what the manifests
promise each other and the alert rules (checks_k8s.py), the Grafana dashboard and the metric
names the dashboard and the alerts use against src/metrics/ (checks_metrics.py), the example
configs against the config schema (checks_config.py), with shared readers in deploy_files.py.
One subcommand per check line. A check prints one line of detail and exits 0, or prints
`FILE: PROBLEM` lines and exits 1. Runs in the tools venv (PyYAML, jsonschema,
kubernetes-validate); Python 3.11+ for tomllib.

    check_deploy.py ROOT images|compose|compose-versions|dockerfile|k8s-schema|k8s|metrics|config-examples
    check_deploy.py ROOT rules|dashboard OUTDIR
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Callable

import yaml

from checks_compose import check_compose, check_compose_versions, check_images
from checks_config import check_config_examples
from checks_docker import check_dockerfile
from checks_k8s import check_k8s, check_k8s_schema, check_rules
from checks_metrics import check_dashboard, check_metric_names


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    root, check = Path(sys.argv[1]).resolve(), sys.argv[2]
    checks: dict[str, Callable[[], None]] = {
        "images": lambda: check_images(root),
        "compose": lambda: check_compose(root),
        "compose-versions": lambda: check_compose_versions(root),
        "dockerfile": lambda: check_dockerfile(root),
        "k8s-schema": lambda: check_k8s_schema(root),
        "k8s": lambda: check_k8s(root),
        "rules": lambda: check_rules(root, Path(sys.argv[3])),
        "dashboard": lambda: check_dashboard(root, Path(sys.argv[3])),
        "metrics": lambda: check_metric_names(root),
        "config-examples": lambda: check_config_examples(root),
    }
    if check not in checks:
        sys.exit(f"unknown check {check}; one of {', '.join(checks)}")
    try:
        checks[check]()
    except (
        OSError,
        yaml.YAMLError,
        json.JSONDecodeError,
        tomllib.TOMLDecodeError,
        KeyError,
        TypeError,
        ValueError,
        IndexError,
    ) as error:
        # A file missing, or a field of an unexpected type where a check expected structure
        # (the schema checks name the field): one line, never a traceback.
        print(f"{check}: cannot check: {type(error).__name__}: {error}")
        sys.exit(1)


if __name__ == "__main__":
    main()
