"""The Dockerfile's contract, and the documented docker commands that use it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from deploy_files import (
    CMD,
    COMPOSE,
    CONFIG_PATH,
    DOCKERFILE,
    ENTRYPOINT,
    README,
    Problems,
    cargo_package,
    dockerfile_instructions,
    dockerfile_stages,
    from_image,
    split_image,
)


def readme_commands(root: Path) -> tuple[str, list[str]]:
    """The documented docker commands: README's "Docker" section."""
    for source in (README,):
        if not (root / source).exists():
            continue
        lines = [l.strip() for l in (root / source).read_text().splitlines()]
        commands = [l for l in lines if re.match(r"docker (build|run|compose) ", l)]
        if any(c.startswith("docker build ") for c in commands):
            return source, commands
    return README, []


def check_dockerfile(root: Path) -> None:
    problems = Problems()
    instructions = dockerfile_instructions(root / DOCKERFILE)
    stages = dockerfile_stages(instructions)
    version = cargo_package(root)["version"]
    rust_version = cargo_package(root).get("rust-version")
    if len(stages) < 2:
        problems.add(DOCKERFILE, "must be multi-stage: a Rust builder and a slim runtime")
        problems.finish("")
    (build_from, build), (final_from, final) = stages[0], stages[-1]
    builder_image, builder_alias = from_image(build_from)
    _, tag, _ = split_image(builder_image)
    if not split_image(builder_image)[0].endswith("rust"):
        problems.add(DOCKERFILE, f"line {build_from.line}: the first stage must build on the rust image")
    elif (
        rust_version
        and tag
        and tuple(int(x) for x in re.findall(r"\d+", tag)[:2])
        < tuple(int(x) for x in rust_version.split(".")[:2])
    ):
        problems.add(
            DOCKERFILE,
            f"line {build_from.line}: rust {tag} is older than Cargo.toml's rust-version {rust_version}",
        )
    runs = " ".join(i.args for i in build if i.keyword == "RUN")
    if not re.search(r"cargo build --release --locked\b", runs):
        problems.add(DOCKERFILE, "the builder must run `cargo build --release --locked`")
    for package in ("build-essential", "cmake", "libcurl4-openssl-dev"):
        if not re.search(rf"apt-get install[^&;]*\b{re.escape(package)}\b", runs):
            problems.add(DOCKERFILE, f"the builder must install {package}")
    final_image = from_image(final_from)[0]
    if not re.search(r"(debian:[\w.]*slim|-slim$)", final_image):
        problems.add(
            DOCKERFILE, f"line {final_from.line}: the runtime stage must be debian slim, not `{final_image}`"
        )
    # The hadolint-style rules that carry the most weight, with messages naming the fix.
    for instruction in instructions:
        if instruction.keyword != "RUN":
            continue
        for install in re.findall(r"apt-get\s+(?:-\S+\s+)*install\b[^&;|]*", instruction.args):
            if "--no-install-recommends" not in install:
                problems.add(
                    DOCKERFILE, f"line {instruction.line}: apt-get install without --no-install-recommends"
                )
        if "apt-get update" in instruction.args and "rm -rf /var/lib/apt/lists/*" not in instruction.args:
            problems.add(
                DOCKERFILE,
                f"line {instruction.line}: apt-get update without `rm -rf /var/lib/apt/lists/*` in the same RUN",
            )
    users = [i for i in final if i.keyword == "USER"]
    if not users:
        problems.add(DOCKERFILE, "the runtime stage sets no USER (it would run as root)")
    else:
        user = users[-1].args.split(":")[0]
        if not user.isdigit() or int(user) == 0:
            problems.add(
                DOCKERFILE,
                f"line {users[-1].line}: USER `{users[-1].args}` must be a numeric non-root uid (Kubernetes runAsNonRoot verifies only numbers)",
            )
    copied = [
        i
        for i in final
        if i.keyword == "COPY" and f"--from={builder_alias}" in i.args and "/usr/local/bin/cdcflow" in i.args
    ]
    if not copied:
        problems.add(
            DOCKERFILE,
            f"the runtime stage must COPY --from={builder_alias} the binary to /usr/local/bin/cdcflow",
        )
    entrypoint = [i for i in final if i.keyword == "ENTRYPOINT"]
    cmd = [i for i in final if i.keyword == "CMD"]
    if not entrypoint or entrypoint[-1].exec_form() != ENTRYPOINT:
        problems.add(DOCKERFILE, f"ENTRYPOINT must be {json.dumps(ENTRYPOINT)}")
    if not cmd or cmd[-1].exec_form() != CMD:
        problems.add(DOCKERFILE, f"CMD must be {json.dumps(CMD)}")
    readme = (root / README).read_text()
    port = 9464
    default_listen = re.search(r"`http\.listen`\s*\|\s*`([^`]+)`", readme)
    if not default_listen:
        problems.add(README, "the configuration reference names no default for http.listen")
    else:
        port = int(default_listen[1].rsplit(":", 1)[1])
    if not any(i.keyword == "EXPOSE" and str(port) in i.args.split() for i in final):
        problems.add(
            DOCKERFILE,
            f"EXPOSE {port}: README's default http.listen is {default_listen[1] if default_listen else '?'}",
        )
    for i in final:
        if i.keyword == "HEALTHCHECK" and (f"/{port}" not in i.args or "/healthz" not in i.args):
            problems.add(DOCKERFILE, f"line {i.line}: HEALTHCHECK must ask /healthz on port {port}")
    if "`cdcflow run --config FILE`" not in readme:
        problems.add(README, "no longer documents `cdcflow run --config FILE`, the image's CMD")

    # The documented build and run commands work with this Dockerfile.
    source, commands = readme_commands(root)
    header = " ".join(
        l.lstrip("# ").strip() for l in (root / DOCKERFILE).read_text().splitlines() if l.startswith("#")
    )
    builds = [c for c in commands if c.startswith("docker build ")]
    if not builds:
        problems.add(source, "documents no `docker build` command")
    for command in builds:
        words = shlex.split(command)
        file = words[words.index("-f") + 1] if "-f" in words else "Dockerfile"
        tag = words[words.index("-t") + 1] if "-t" in words else None
        if file != DOCKERFILE:
            problems.add(source, f"`{command}`: -f must be {DOCKERFILE}")
        if words[-1] != ".":
            problems.add(source, f"`{command}`: the build context must be the repository root `.`")
        if tag != f"cdcflow:{version}":
            problems.add(
                source,
                f"`{command}`: tag the image cdcflow:{version} (Cargo.toml), as docker-compose.yml and deploy/k8s do",
            )
        if command not in header:
            problems.add(DOCKERFILE, f"the header comment must show the documented build command `{command}`")
    for command in (c for c in commands if c.startswith("docker run ")):
        if f":{CONFIG_PATH}" not in command or f"-p {port}:{port}" not in command:
            problems.add(source, f"`{command}`: mount the config at {CONFIG_PATH} and publish {port}")
    compose_header = (root / COMPOSE).read_text()
    for command in (c for c in commands if c.startswith("docker compose ")):
        bare = command.split("#", 1)[0].strip()
        if bare not in compose_header:
            problems.add(COMPOSE, f"the header comment must show the documented command `{bare}`")
    if not any(c.startswith("docker compose up") for c in commands):
        problems.add(source, "documents no `docker compose up` command")
    problems.finish(
        f"{len(stages)} stages, USER {users[-1].args if users else '?'}, ENTRYPOINT/CMD = cdcflow run --config {CONFIG_PATH}, "
        f"EXPOSE {port}; {len(commands)} docker commands of {source} match"
    )
