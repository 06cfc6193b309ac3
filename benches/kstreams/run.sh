#!/usr/bin/env bash
# Builds (when needed) and runs the Kafka Streams contender of the Kafka benchmark.
#
#   benches/kstreams/run.sh --bootstrap 127.0.0.1:19092 --input TOPIC --output TOPIC \
#       --application-id ID --guarantee exactly_once_v2|at_least_once --expect N [...]
#   benches/kstreams/run.sh --build-only      # resolve and build, run nothing
#
# Maven resolves Kafka Streams and Jackson from Maven Central into
# $CDCFLOW_KSTREAMS_M2 (default ~/.cache/cdcflow/m2) on the first build; the jar and its
# dependencies land in benches/kstreams/target. The build's output goes to stderr: stdout
# carries only the application's one-line JSON summary. The script execs java, so its pid is
# the JVM's (for /proc CPU and RSS readings). JVM options: $CDCFLOW_KSTREAMS_JAVA_OPTS
# (default -Xms64m -Xmx512m).
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
M2="${CDCFLOW_KSTREAMS_M2:-$HOME/.cache/cdcflow/m2}"
JAR="$DIR/target/cdcflow-kstreams.jar"

log() { printf 'kstreams/run.sh: %s\n' "$*" >&2; }

command -v java >/dev/null 2>&1 || { log "java not found (Java 17+ needed: apt-get install -y openjdk-17-jdk-headless)"; exit 1; }

# Up to date: the jar and its lib/ exist and nothing under src/ or the pom is newer.
up_to_date() {
    [[ -f "$JAR" && -d "$DIR/target/lib" ]] || return 1
    [[ -z "$(find "$DIR/pom.xml" "$DIR/src" -newer "$JAR" -print -quit)" ]]
}

build() {
    command -v mvn >/dev/null 2>&1 || { log "mvn not found (apt-get install -y maven)"; exit 1; }
    mkdir -p "$M2"
    exec 8>"$DIR/.build.lock"
    flock -w 600 8 || { log "timed out waiting for another build"; exit 1; }
    if ! up_to_date; then
        log "building with Maven (first build resolves from Maven Central into $M2) ..."
        local t0=$SECONDS
        rm -rf -- "$DIR/target/lib"
        # Maven 3.8 prints colour resets even with style.color=never: strip them.
        if ! mvn -q -B -Dstyle.color=never -Dmaven.repo.local="$M2" -f "$DIR/pom.xml" package 2>&1 |
            sed 's/\x1b\[[0-9;]*m//g' >&2; then # pipefail: mvn's failure fails the pipeline
            log "maven build failed (see above)"
            exit 1
        fi
        log "built $JAR in $((SECONDS - t0)) s"
    fi
    exec 8>&-
}

if [[ "${1:-}" == "--build-only" ]]; then
    up_to_date || build
    exit 0
fi
up_to_date || build
# shellcheck disable=SC2086 # JAVA_OPTS is a word list on purpose.
exec java ${CDCFLOW_KSTREAMS_JAVA_OPTS:--Xms64m -Xmx512m} -jar "$JAR" "$@"
