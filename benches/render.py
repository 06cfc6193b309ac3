#!/usr/bin/env python3
"""Render the benchmarks' JSON results into docs/performance.md and docs/performance.png.

Run through benches/render.sh, which provides matplotlib and the default paths. Reads
kafka.json, core.json, replay.json and state.json from --results (each optional, at least one
needed), rewrites only the text between the results markers of --doc, and draws the Kafka
contenders into --chart.
"""

import argparse
import json
import os
import sys
import tempfile
import textwrap
from datetime import datetime
from pathlib import Path

BENCHMARKS = ("kafka", "core", "replay", "state")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
NEW_DOC = f"# Performance\n\nMethod: see below.\n\n{BEGIN}\n{END}\n"
MISSING = "—"

# cdcflow in blues, Kafka Streams in oranges, the raw pipe (the ceiling) in grey.
COLOURS = {
    "raw": "#8c8c8c",
    "cdcflow-alo": "#6baed6",
    "cdcflow-eos": "#08519c",
    "kstreams-alo": "#fdae6b",
    "kstreams-eos": "#d94801",
}
FALLBACK_COLOURS = ("#74c476", "#9e9ac8", "#e377c2", "#bcbd22")


class RenderError(Exception):
    pass


def number(value, decimals=0):
    return MISSING if value is None else f"{value:,.{decimals}f}"


def described(template, value):
    """template filled with value, or None (left out of the sentence) when value is unknown."""
    return None if value is None else template.format(value)


def plain_number(value):
    """A result of unknown scale: integers for large values, 4 significant digits otherwise."""
    if value is None:
        return MISSING
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def load_results(results_dir):
    loaded = {}
    for name in BENCHMARKS:
        path = results_dir / f"{name}.json"
        if not path.exists():
            continue
        try:
            loaded[name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RenderError(f"cannot read {path}: {error}") from error
        if not isinstance(loaded[name], dict):
            raise RenderError(f"{path}: expected a JSON object at the top level")
    if not loaded:
        wanted = ", ".join(f"{name}.json" for name in BENCHMARKS)
        raise RenderError(
            f"no results in {results_dir} (expected any of {wanted}): run the benches first "
            "(cargo bench --bench ...), or point --results / CDCFLOW_BENCH_RESULTS at their output"
        )
    return loaded


def day(timestamp):
    try:
        return datetime.fromisoformat(timestamp).strftime("%Y-%m-%d")
    except (TypeError, ValueError):
        return str(timestamp or "an unknown date")


def machine_summary(machine):
    machine = machine or {}
    parts = [
        described("{} CPUs", machine.get("cpus")),
        machine.get("cpu_model"),
        described("{:,} MiB RAM", machine.get("memory_mib")),
        described("Linux {}", machine.get("kernel")),
        machine.get("rustc"),
        machine.get("java"),
    ]
    return ", ".join(filter(None, parts)) or "an undescribed machine"


def common_machine(machines):
    """The machines merged into one when no field disagrees (a bench may leave out `java`), else None."""
    merged = {}
    for machine in machines:
        for field, value in (machine or {}).items():
            if value is not None and merged.setdefault(field, value) != value:
                return None
    return merged


def by_value(values_by_benchmark):
    """'X' when every benchmark shares it, else 'X (kafka, core); Y (replay)'."""
    groups = {}
    for benchmark, value in values_by_benchmark.items():
        groups.setdefault(value, []).append(benchmark)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{value} ({', '.join(names)})" for value, names in groups.items())


def table(header, alignments, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(alignments) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def kafka_section(kafka, chart_link):
    method = kafka.get("method") or {}
    heading = ", ".join(filter(None, [
        "### Kafka: the same preloaded topic",
        described("broker pinned to CPU {}", method.get("broker_cpu")),
        described("contender to CPU {}", method.get("contender_cpu")),
    ]))
    workload = ", ".join(filter(None, [
        described("{:,} records", method.get("records")),
        described("{:,} entities", method.get("entities")),
        described("{} partitions", method.get("partitions")),
        described("values of {:,.0f} bytes on average", method.get("value_bytes_avg")),
    ]))
    rows = []
    for contender in kafka.get("contenders") or []:
        latency = contender.get("latency") or {}
        floor = contender.get("latency_floor") or {}
        rows.append([
            contender.get("name") or contender.get("id"),
            number(contender.get("throughput_rps")),
            number(contender.get("cpu_s_per_million"), 1),
            number(contender.get("peak_rss_mib")),
            number(latency.get("rate_rps")),
            number(latency.get("p50_ms"), 1),
            number(latency.get("p99_ms"), 1),
            number(latency.get("max_ms"), 1),
            number(floor.get("p50_ms"), 1),
            number(floor.get("p99_ms"), 1),
        ])
    header = ["Contender", "records/s", "CPU s per 1M records", "peak RSS MiB",
              "latency rate (rec/s)", "p50 ms", "p99 ms", "max ms",
              "floor p50 ms", "floor p99 ms"]
    parts = [heading]
    if workload:
        parts.append(workload[0].upper() + workload[1:] + ".")
    parts.append(table(header, [":---"] + ["---:"] * 9, rows))
    parts.append("The floor is the broker and the harness alone at the same rate: the generator's "
                 "topic read directly by the probe, no contender between them.")
    parts.append(f"![Kafka benchmark]({chart_link})")
    return parts


def targets_section(loaded):
    rows = []
    for benchmark, result in loaded.items():
        for index, target in enumerate(result.get("targets") or []):
            met = {True: "✅", False: "❌"}.get(target.get("met"), MISSING)
            rows.append([benchmark if index == 0 else "", target.get("name") or MISSING,
                         target.get("target") or MISSING, target.get("measured") or MISSING, met])
    if not rows:
        return []
    header = ["Benchmark", "Target", "wanted", "measured", "met"]
    return ["### Targets", table(header, [":---", ":---", ":---", ":---", ":---:"], rows)]


def results_section(benchmark, result):
    rows = [[item.get("name") or MISSING, plain_number(item.get("value")), item.get("unit") or ""]
            for item in result.get("results") or []]
    return [f"### {benchmark.capitalize()}", table(["name", "value", "unit"], [":---", "---:", ":---"], rows)]


def render_markdown(loaded, chart_link):
    dates = by_value({name: day(result.get("date")) for name, result in loaded.items()})
    machine = common_machine(result.get("machine") for result in loaded.values())
    machines = machine_summary(machine) if machine is not None else by_value(
        {name: machine_summary(result.get("machine")) for name, result in loaded.items()})
    parts = [f"Generated by `benches/render.sh` from the JSON results of {dates} on {machines}."]
    if "kafka" in loaded:
        parts += kafka_section(loaded["kafka"], chart_link)
    parts += targets_section(loaded)
    for benchmark in BENCHMARKS[1:]:
        if benchmark in loaded:
            parts += results_section(benchmark, loaded[benchmark])
    return "\n\n".join(parts) + "\n"


def replace_between_markers(document, generated, doc_path):
    lines = document.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if not begins and not ends:
        # A blank line between the human text and the markers, without changing that text.
        trailing_newlines = len(document) - len(document.rstrip("\n"))
        separator = "\n" * max(0, 2 - trailing_newlines) if document else ""
        return f"{document}{separator}{BEGIN}\n\n{generated}\n{END}\n"
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise RenderError(
            f"{doc_path}: expected one '{BEGIN}' line followed by one '{END}' line, found "
            f"{len(begins)} and {len(ends)} (lines {[i + 1 for i in begins]} and {[i + 1 for i in ends]}): "
            "fix the markers by hand"
        )
    before, after = lines[: begins[0] + 1], lines[ends[0]:]
    if not before[-1].endswith("\n"):
        before[-1] += "\n"
    return "".join(before) + f"\n{generated}\n" + "".join(after)


def write_atomically(path, write):
    """Write through a temporary file beside path, so a failure leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(descriptor)
    try:
        # mkstemp makes the file 0600; keep the old file's mode, else the usual one of a work tree.
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def colour_of(contender_id, index):
    return COLOURS.get(contender_id) or FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)]


def bar_panel(axis, title, names, colours, values, decimals, labels=None, headroom=1.28):
    """Horizontal bars, one per contender, each labelled with its value or 'n/a'."""
    present = [value for value in values if value is not None]
    limit = max(present, default=0) or 1
    for row, (value, colour) in enumerate(zip(values, colours)):
        if value is None:
            axis.text(limit * 0.01, row, "n/a", va="center", color="#666666", style="italic")
            continue
        axis.barh(row, value, color=colour, height=0.65)
        label = labels[row] if labels else number(value, decimals)
        axis.text(value + limit * 0.01, row, label, va="center", fontsize=10)
    axis.set_title(title, loc="left", fontsize=12, fontweight="bold")
    axis.set_yticks(range(len(names)), names)
    axis.set_ylim(len(names) - 0.5, -0.5)  # first contender on top
    axis.set_xlim(0, limit * headroom)  # room for the label right of the longest bar
    axis.xaxis.set_major_formatter(lambda value, _: f"{value:,.0f}" if limit >= 10 else f"{value:,.1f}")
    if not present:
        axis.set_xticks([])  # an axis of nothing would only suggest a scale
    axis.grid(axis="x", color="#e6e6e6")
    axis.set_axisbelow(True)
    for side in ("top", "right"):
        axis.spines[side].set_visible(False)


def render_chart(kafka, chart_path):
    try:
        import matplotlib
    except ImportError as error:
        raise RenderError("matplotlib is missing: run benches/render.sh, which installs it") from error
    matplotlib.use("Agg")
    from matplotlib import pyplot

    contenders = kafka.get("contenders") or []
    if not contenders:
        raise RenderError("kafka.json has no contenders to chart")
    names = [contender.get("name") or contender.get("id") for contender in contenders]
    colours = [colour_of(contender.get("id"), index) for index, contender in enumerate(contenders)]
    latencies = [contender.get("latency") or {} for contender in contenders]
    p50 = [latency.get("p50_ms") for latency in latencies]
    p99 = [latency.get("p99_ms") for latency in latencies]

    # One set of contender names on the left: the right column reads across by row and colour.
    figure, axes = pyplot.subplots(2, 2, figsize=(14, 8), dpi=100, layout="constrained", sharey=True)
    bar_panel(axes[0][0], "Throughput (records/s, higher is better)", names, colours,
              [contender.get("throughput_rps") for contender in contenders], 0)
    bar_panel(axes[0][1], "CPU seconds per 1M records (lower is better)", names, colours,
              [contender.get("cpu_s_per_million") for contender in contenders], 1)
    bar_panel(axes[1][0], "Peak RSS (MiB, lower is better)", names, colours,
              [contender.get("peak_rss_mib") for contender in contenders], 0)
    latency_labels = [f"p99 {number(high, 1)}  (p50 {number(low, 1)})" for low, high in zip(p50, p99)]
    latency_axis = axes[1][1]
    bar_panel(latency_axis, "Latency at half load (ms, lower is better), p50 pale", names, colours, p99, 1,
              latency_labels, headroom=1.6)
    for row, value in enumerate(p50):
        if value is not None and p99[row] is not None:
            # Whitening the inner part of the p99 bar shows p50 in the contender's own colour family.
            latency_axis.barh(row, value, color="white", alpha=0.55, height=0.65)

    method = kafka.get("method") or {}
    subtitle = ", ".join(filter(None, [
        described("{:,} records", method.get("records")),
        described("{} partitions", method.get("partitions")),
        described("broker on CPU {}", method.get("broker_cpu")),
        described("contender on CPU {}", method.get("contender_cpu")),
    ]))
    for axis in axes[:, 1]:
        axis.tick_params(labelleft=False)
    # The machine summary (CPU, kernel, rustc, java) outgrows the figure's width: wrap it.
    title = f"Kafka benchmark, {day(kafka.get('date'))}: {machine_summary(kafka.get('machine'))}"
    figure.suptitle("\n".join(textwrap.wrap(title, 140))
                    + (f"\n{subtitle}" if subtitle else ""), fontsize=13)
    write_atomically(chart_path, lambda temporary: figure.savefig(temporary, format="png"))
    pyplot.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="directory of the benches' JSON files")
    parser.add_argument("--doc", type=Path, required=True, help="markdown file whose results section is rewritten")
    parser.add_argument("--chart", type=Path, required=True, help="PNG file drawn from kafka.json")
    args = parser.parse_args()
    try:
        loaded = load_results(args.results)
        chart_link = Path(os.path.relpath(args.chart.resolve(), args.doc.resolve().parent)).as_posix()
        document = args.doc.read_text(encoding="utf-8") if args.doc.exists() else NEW_DOC
        updated = replace_between_markers(document, render_markdown(loaded, chart_link), args.doc)
        if "kafka" in loaded:
            render_chart(loaded["kafka"], args.chart)
        write_atomically(args.doc, lambda temporary: temporary.write_text(updated, encoding="utf-8"))
    except (RenderError, OSError) as error:
        sys.exit(f"render.py: error: {error}")
    except (TypeError, ValueError, AttributeError) as error:
        sys.exit(f"render.py: error: a results file does not have the expected shape ({error!r})")
    chart_note = f" and {args.chart}" if "kafka" in loaded else f" (no kafka.json: {args.chart} left as it was)"
    print(f"render.py: wrote {args.doc}{chart_note} from {', '.join(loaded)} in {args.results}")


if __name__ == "__main__":
    main()
