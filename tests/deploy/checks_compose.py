"""The Compose checks: pinned images everywhere, the stack's start order and config, and its
versions against the local stack."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from deploy_files import (
    COMPOSE,
    COMPOSE_CONNECTOR,
    CONFIG_PATH,
    CONFIG_SCHEMA,
    CONNECTION_KEYS,
    DOCKERFILE,
    ENV_PREFIX,
    LOCAL_CONNECTOR,
    PROMETHEUS_CONFIG,
    SHOP_CONFIG,
    STATE_DIR,
    Problems,
    apply_overrides,
    cargo_package,
    compose_duration_seconds,
    config_problems,
    containers_of,
    dockerfile_instructions,
    env_list_to_dict,
    from_image,
    k8s_documents,
    listen_port,
    pin_problem,
    pod_specs,
    read_yaml,
    shutdown_timeout,
    split_image,
)


def check_images(root: Path) -> None:
    problems = Problems()
    refs: list[tuple[str, str, str]] = []
    compose = read_yaml(root / COMPOSE)
    for name, service in (compose.get("services") or {}).items():
        if "image" in service:
            refs.append((COMPOSE, f"services.{name}.image", service["image"]))
        else:
            problems.add(
                COMPOSE, f"services.{name} has no image: (a built service needs one, with a pinned tag)"
            )
    stage_names: set[str] = set()
    for instruction in dockerfile_instructions(root / DOCKERFILE):
        if instruction.keyword != "FROM":
            continue
        image, alias = from_image(instruction)
        if image not in stage_names:
            refs.append((DOCKERFILE, f"line {instruction.line}: FROM", image))
        if alias:
            stage_names.add(alias)
    for rel, doc in k8s_documents(root):
        name = (doc.get("metadata") or {}).get("name")
        for pod in pod_specs(doc):
            for container in containers_of(pod):
                refs.append(
                    (
                        rel,
                        f"{doc.get('kind')}/{name} container {container.get('name')}",
                        container.get("image"),
                    )
                )
    for file, where, ref in refs:
        problem = pin_problem(ref)
        if problem:
            problems.add(file, f"{where}: {problem}")
    problems.finish(f"{len(refs)} images pinned ({', '.join(sorted({r for _, _, r in refs}))})")


def check_compose_versions(root: Path) -> None:
    """The compose stack runs what the local stack and the build use."""
    problems = Problems()
    services = read_yaml(root / COMPOSE).get("services") or {}
    version = cargo_package(root)["version"]
    images = {name: split_image(str(s.get("image", ""))) for name, s in services.items()}

    kafka_sh = root / "deploy/local/kafka.sh"
    wanted = re.search(r'KAFKA_VERSION="\$\{CDCFLOW_KAFKA_VERSION:-([^}]+)\}"', kafka_sh.read_text())
    kafka_tags = {
        n: t for n, (image, t, _) in images.items() if image in ("apache/kafka", "docker.io/apache/kafka")
    }
    if not wanted:
        problems.add("deploy/local/kafka.sh", "no KAFKA_VERSION default found")
    elif not kafka_tags:
        problems.add(COMPOSE, "no service runs apache/kafka")
    for name, tag in kafka_tags.items():
        if wanted and tag != wanted[1]:
            problems.add(
                COMPOSE,
                f"services.{name}: apache/kafka:{tag}, but deploy/local/kafka.sh runs Kafka {wanted[1]}",
            )

    debezium = None
    connect_sh = root / "deploy/local/connect.sh"
    pom = root / "deploy/local/debezium-pom.xml"
    if connect_sh.exists():
        found = re.search(r'DEBEZIUM_VERSION="\$\{[A-Z_]+:-([^}]+)\}"', connect_sh.read_text())
        debezium = (found[1], "deploy/local/connect.sh") if found else None
    if debezium is None and pom.exists():
        found = re.search(r"<debezium.version>([^<]+)</debezium.version>", pom.read_text())
        debezium = (found[1], "deploy/local/debezium-pom.xml") if found else None
    connect_tags = {n: t for n, (image, t, _) in images.items() if image.endswith("debezium/connect")}
    if debezium is None:
        problems.add(
            "deploy/local",
            "the local stack names no Debezium version (connect.sh DEBEZIUM_VERSION or debezium-pom.xml)",
        )
    elif not connect_tags:
        problems.add(COMPOSE, "no service runs quay.io/debezium/connect")
    for name, tag in connect_tags.items():
        if debezium and tag != debezium[0]:
            problems.add(
                COMPOSE,
                f"services.{name}: debezium/connect:{tag}, but {debezium[1]} uses Debezium {debezium[0]}",
            )

    for name, service in services.items():
        if "build" in service:
            image, tag, _ = images[name]
            if tag != version:
                problems.add(
                    COMPOSE,
                    f"services.{name}.image `{service.get('image')}`: the tag must be Cargo.toml's version {version}",
                )
    problems.finish(
        f"Kafka {wanted[1] if wanted else '?'} as deploy/local/kafka.sh, Debezium "
        f"{debezium[0] if debezium else '?'} as {debezium[1] if debezium else '?'}, cdcflow:{version} as Cargo.toml"
    )


def check_compose(root: Path) -> None:
    problems = Problems()
    compose = read_yaml(root / COMPOSE)
    services: dict[str, dict[str, Any]] = compose.get("services") or {}

    def one_shot(name: str) -> bool:
        # A one-shot says so: restart: "no" written out (long-running services omit it).
        return str(services[name].get("restart")) == "no"

    def has_healthcheck(name: str) -> bool:
        check = services[name].get("healthcheck") or {}
        test = check.get("test")
        return bool(test) and not check.get("disable") and test not in (["NONE"], "NONE")

    # Start order: long-form depends_on with a condition that waits for something real.
    edges: dict[str, list[str]] = {}
    for name, service in services.items():
        depends = service.get("depends_on")
        if depends is None:
            continue
        if not isinstance(depends, dict):
            problems.add(
                COMPOSE, f"services.{name}.depends_on: use the long form with a condition for each service"
            )
            continue
        edges[name] = list(depends)
        for target, options in depends.items():
            condition = (options or {}).get("condition")
            where = f"services.{name}.depends_on.{target}"
            if target not in services:
                problems.add(COMPOSE, f"{where}: no such service")
            elif condition == "service_healthy":
                if not has_healthcheck(target):
                    problems.add(
                        COMPOSE,
                        f"{where}: waits for service_healthy but services.{target} has no healthcheck",
                    )
            elif condition == "service_completed_successfully":
                if not one_shot(target):
                    problems.add(
                        COMPOSE,
                        f'{where}: waits for completion but services.{target} restarts (make it restart: "no")',
                    )
            else:
                problems.add(
                    COMPOSE,
                    f"{where}: condition `{condition}`; use service_healthy or service_completed_successfully",
                )

    if "cdcflow" not in services:
        problems.add(COMPOSE, "no service `cdcflow`")
        problems.finish("")
    # Everything cdcflow waits for, directly or not: long-running services must be healthy.
    reachable, todo = set(), list(edges.get("cdcflow", []))
    while todo:
        target = todo.pop()
        if target in reachable or target not in services:
            continue
        reachable.add(target)
        todo.extend(edges.get(target, []))
        if not one_shot(target) and not has_healthcheck(target):
            problems.add(COMPOSE, f"services.{target}: cdcflow depends on it, so it needs a healthcheck")
    direct = (
        (services["cdcflow"].get("depends_on") or {})
        if isinstance(services["cdcflow"].get("depends_on"), dict)
        else {}
    )
    kafka_dep = [
        t
        for t in direct
        if str(services.get(t, {}).get("image", "")).startswith("apache/kafka") and not one_shot(t)
    ]
    if not kafka_dep:
        problems.add(COMPOSE, "services.cdcflow.depends_on: must wait for the Kafka broker (service_healthy)")

    # Bind mounts point at files of the repository.
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else (volume or {}).get("source", "")
            if str(source).startswith((".", "/")) and not (root / source).exists():
                problems.add(COMPOSE, f"services.{name}.volumes: `{source}` does not exist")

    def mounts(name: str) -> dict[str, str]:
        result = {}
        for volume in services[name].get("volumes") or []:
            if isinstance(volume, str):
                parts = volume.split(":")
                if len(parts) >= 2:
                    result[parts[1]] = parts[0]
        return result

    # PostgreSQL: logical decoding and the example schema.
    postgres = [
        n
        for n, s in services.items()
        if split_image(str(s.get("image", "")))[0] in ("postgres", "docker.io/library/postgres")
    ]
    for name in postgres:
        command = services[name].get("command", "")
        command = " ".join(command) if isinstance(command, list) else str(command)
        if not re.search(r"-c\s+wal_level=logical\b", command):
            problems.add(
                COMPOSE, f"services.{name}.command: needs `-c wal_level=logical` (Debezium's pgoutput)"
            )
        if not any(
            target.startswith("/docker-entrypoint-initdb.d/") and source.endswith("postgres-shop.sql")
            for target, source in mounts(name).items()
        ):
            problems.add(
                COMPOSE,
                f"services.{name}.volumes: mount deploy/local/sql/postgres-shop.sql into /docker-entrypoint-initdb.d",
            )
    if not postgres:
        problems.add(COMPOSE, "no postgres service")

    # cdcflow's effective config: the mounted file plus the environment, as cdcflow reads it.
    cdcflow = services["cdcflow"]
    env = env_list_to_dict(cdcflow.get("environment"))
    config_source = mounts("cdcflow").get(CONFIG_PATH)
    port = 9464
    config: dict[str, Any] = {}
    if not config_source:
        problems.add(
            COMPOSE, f"services.cdcflow.volumes: mount a config at {CONFIG_PATH} (the image's CMD reads it)"
        )
    elif (root / config_source).exists():
        with (root / config_source).open("rb") as f:
            config = apply_overrides(tomllib.load(f), env)
        schema = json.loads((root / CONFIG_SCHEMA).read_text())
        for problem in config_problems(config, schema):
            problems.add(COMPOSE, f"services.cdcflow ({config_source} + environment): {problem}")
        port = listen_port(config)
        kafka = config.get("kafka", {})
        for server in str(kafka.get("bootstrap_servers", "127.0.0.1:9092")).split(","):
            host = server.strip().rsplit(":", 1)[0]
            if host not in services:
                problems.add(
                    COMPOSE, f"services.cdcflow: kafka.bootstrap_servers `{server}` is not a compose service"
                )
        if not kafka.get("instance_id"):
            problems.add(
                COMPOSE, "services.cdcflow: set CDCFLOW__KAFKA__INSTANCE_ID (a stable transactional id)"
            )
        state = str(config.get("state", {}).get("path", "cdcflow-state.db"))
        if not state.startswith(STATE_DIR + "/"):
            problems.add(
                COMPOSE,
                f"services.cdcflow: state.path `{state}` is not under {STATE_DIR} (the image's writable directory)",
            )
        grace = compose_duration_seconds(cdcflow.get("stop_grace_period", "10s"))
        if grace is None or grace <= shutdown_timeout(config):
            problems.add(
                COMPOSE,
                f"services.cdcflow.stop_grace_period `{cdcflow.get('stop_grace_period', '10s')}` must exceed kafka.shutdown_timeout ({shutdown_timeout(config):g}s)",
            )
        # Every pipeline input is created before cdcflow starts.
        created = set()
        for name, service in services.items():
            command = service.get("command")
            text = " ".join(command) if isinstance(command, list) else str(command or "")
            if "kafka-topics.sh" in text and "--create" in text:
                found = re.search(r"for \w+ in ([^;]+);", text)
                created |= set(found[1].split()) if found else set()
                created |= set(re.findall(r"--topic\s+([\w.-]+)", text))
        for pipeline in config.get("pipeline", []):
            for topic in pipeline.get("topics", []):
                if topic not in created:
                    problems.add(
                        COMPOSE,
                        f"pipeline `{pipeline.get('name')}` reads `{topic}`, which no one-shot service creates (cdcflow refuses a missing input)",
                    )
    ports = [str(p) for p in cdcflow.get("ports") or []]
    if not any(p.rsplit(":", 1)[-1].split("/")[0] == str(port) for p in ports):
        problems.add(COMPOSE, f"services.cdcflow.ports: publish the HTTP port {port} (http.listen)")
    test = " ".join(str(t) for t in (cdcflow.get("healthcheck") or {}).get("test") or [])
    if f"/{port}" not in test and f":{port}" not in test or "/readyz" not in test:
        problems.add(COMPOSE, f"services.cdcflow.healthcheck: must ask /readyz on port {port}")

    # Prometheus scrapes cdcflow's port and has the alert rules next to its config.
    prometheus = [
        n for n, s in services.items() if split_image(str(s.get("image", "")))[0].endswith("prom/prometheus")
    ]
    if not prometheus:
        problems.add(COMPOSE, "no prom/prometheus service")
    promconfig = read_yaml(root / PROMETHEUS_CONFIG)
    for name in prometheus:
        mounted = mounts(name)
        config_target = next((t for t, s in mounted.items() if s.lstrip("./") == PROMETHEUS_CONFIG), None)
        if config_target is None:
            problems.add(COMPOSE, f"services.{name}.volumes: mount {PROMETHEUS_CONFIG}")
            continue
        for rule_file in promconfig.get("rule_files") or []:
            target = str(PurePosixPath(config_target).parent / rule_file)
            if target not in mounted:
                problems.add(
                    COMPOSE,
                    f"services.{name}.volumes: {PROMETHEUS_CONFIG} loads rule file {rule_file}, not mounted at {target}",
                )
    targets = [
        t
        for job in promconfig.get("scrape_configs") or []
        if job.get("job_name") == "cdcflow"
        for static in job.get("static_configs") or []
        for t in static.get("targets") or []
    ]
    if f"cdcflow:{port}" not in targets:
        problems.add(PROMETHEUS_CONFIG, f"job `cdcflow` must scrape cdcflow:{port} (found {targets})")

    # The connector the one-shot registers: the compose databases and topics, and the same
    # settings as the local stack's connector.
    check_compose_connector(root, services, problems, mounts)
    problems.finish(
        f"{len(services)} services; cdcflow waits for {', '.join(sorted(reachable))}; "
        f"config {config_source} + {len([k for k in env if k.startswith(ENV_PREFIX)])} overrides valid; port {port}"
    )


def check_compose_connector(
    root: Path, services: dict[str, Any], problems: Problems, mounts: Callable[[str], dict[str, str]]
) -> None:
    registrar = [
        n
        for n, s in services.items()
        if COMPOSE_CONNECTOR in " ".join(str(v) for v in s.get("volumes") or [])
    ]
    if not registrar:
        problems.add(COMPOSE, f"no service mounts {COMPOSE_CONNECTOR} to register it")
        return
    connector = json.loads((root / COMPOSE_CONNECTOR).read_text())
    if not isinstance(connector, dict) or "config" in connector:
        problems.add(COMPOSE_CONNECTOR, "must be the flat config object (PUT /connectors/NAME/config)")
        return
    host = connector.get("database.hostname")
    if host not in services:
        problems.add(COMPOSE_CONNECTOR, f"database.hostname `{host}` is not a compose service")
    else:
        env = env_list_to_dict(services[host].get("environment"))
        for key, variable in (
            ("database.user", "POSTGRES_USER"),
            ("database.password", "POSTGRES_PASSWORD"),
            ("database.dbname", "POSTGRES_DB"),
        ):
            if str(connector.get(key)) != env.get(variable):
                problems.add(
                    COMPOSE_CONNECTOR,
                    f"{key} `{connector.get(key)}` differs from services.{host}.environment.{variable} `{env.get(variable)}`",
                )
        if str(connector.get("database.port")) != "5432":
            problems.add(COMPOSE_CONNECTOR, "database.port must be the container's 5432")
    # Topics: <topic.prefix>.<schema>.<table> for each captured table.
    prefix = connector.get("topic.prefix")
    topics = {
        f"{prefix}.{table.strip()}"
        for table in str(connector.get("table.include.list", "")).split(",")
        if table.strip()
    }
    with (root / SHOP_CONFIG).open("rb") as f:
        inputs = {t for p in tomllib.load(f).get("pipeline", []) for t in p.get("topics", [])}
    for topic in sorted(inputs - topics):
        problems.add(
            COMPOSE_CONNECTOR,
            f"{SHOP_CONFIG} reads `{topic}`, which this connector does not write (topic.prefix + table.include.list)",
        )
    local = root / LOCAL_CONNECTOR
    if not local.exists():
        problems.add(LOCAL_CONNECTOR, f"missing: {COMPOSE_CONNECTOR} mirrors it")
        return

    # connect.sh fills ${VARIABLE:-default} placeholders from the environment: compare with
    # the defaults.
    def resolve(value: Any) -> str:
        return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", str(value))

    whole = json.loads(local.read_text())
    original = {k: resolve(v) for k, v in (whole.get("config") or {}).items()}
    name = resolve(whole.get("name"))
    registered = env_list_to_dict(services[registrar[0]].get("environment")).get("CONNECTOR_NAME")
    if registered != name:
        problems.add(
            COMPOSE,
            f"services.{registrar[0]}: CONNECTOR_NAME `{registered}`, but {LOCAL_CONNECTOR} names it `{name}`",
        )
    for key in sorted((set(original) | set(connector)) - CONNECTION_KEYS):
        if str(original.get(key)) != str(connector.get(key)):
            problems.add(
                COMPOSE_CONNECTOR,
                f"`{key}` is `{connector.get(key)}` but `{original.get(key)}` in {LOCAL_CONNECTOR} (only {', '.join(sorted(CONNECTION_KEYS))} may differ)",
            )
