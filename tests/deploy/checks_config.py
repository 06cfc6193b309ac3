"""The example configs against the config JSON Schema: every examples/*.toml is a config a user
may copy, so each must be valid TOML and valid against schemas/config.schema.json (the compose
and Kubernetes checks validate the configs those deployments mount)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import jsonschema

from deploy_files import CONFIG_SCHEMA, EXAMPLES_DIR, Problems, config_problems


def check_config_examples(root: Path) -> None:
    problems = Problems()
    schema = json.loads((root / CONFIG_SCHEMA).read_text())
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        problems.add(CONFIG_SCHEMA, f"not a valid JSON Schema (2020-12): {error.message}")
        problems.finish("")
    examples = sorted((root / EXAMPLES_DIR).glob("*.toml"))
    if not examples:
        problems.add(EXAMPLES_DIR, "holds no *.toml config")
    for path in examples:
        rel = str(path.relative_to(root))
        try:
            with path.open("rb") as f:
                config = tomllib.load(f)
        except tomllib.TOMLDecodeError as error:
            problems.add(rel, f"not valid TOML: {error}")
            continue
        for problem in config_problems(config, schema):
            problems.add(rel, problem)
    problems.finish(
        f"{len(examples)} example configs ({', '.join(p.name for p in examples)}) valid against {CONFIG_SCHEMA}"
    )
