#!/usr/bin/env python3
"""Checks the events a contender wrote against gen_orders.py's reference.

Input: `key<TAB>value` lines (console consumer with print.key=true, key.separator=TAB,
isolation.level=read_committed) on stdin or in a file. Prints a JSON report; exits 1 on a
mismatch. `--allow-redelivery` (at-least-once) accepts an expected event more than once.

  check_events.py --expected exp.json events.tsv
"""
import argparse
import collections
import json
import re
import sys

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TRANSITIONS = {"com.example.shop.OrderPaid": "pending", "com.example.shop.OrderShipped": "paid",
               "com.example.shop.OrderCancelled": "shipped"}
COMPARED = ("type", "subject", "data", "entityversion", "sequence", "correlationid")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--expected", required=True)
    parser.add_argument("--allow-redelivery", action="store_true")
    parser.add_argument("events", nargs="?", default="-")
    args = parser.parse_args()
    expected = json.load(open(args.expected))
    want = {event["id"]: event for event in expected["expected"]}
    lines = (sys.stdin if args.events == "-" else open(args.events)).read().splitlines()

    problems = []
    seen = collections.Counter()
    by_type = collections.Counter()
    last_sequence = {}
    for number, line in enumerate(lines, 1):
        key, _, value = line.partition("\t")
        event = json.loads(value)
        seen[event["id"]] += 1
        by_type[event["type"]] += 1
        if not (key == event["subject"] == event["partitionkey"]):
            problems.append(f"line {number}: key {key!r} != subject/partitionkey")
        if event["specversion"] != "1.0" or event["datacontenttype"] != "application/json":
            problems.append(f"line {number}: bad specversion/datacontenttype")
        if event["source"] != "/cdcflow/pipelines/orders" or not TIME.match(event.get("time", "")):
            problems.append(f"line {number}: bad source/time {event.get('source')} {event.get('time')}")
        if not re.match(r"^[^/]+/\d+/\d+$", event.get("causationid", "")):
            problems.append(f"line {number}: bad causationid {event.get('causationid')}")
        reference = want.get(event["id"])
        if reference is None:
            problems.append(f"line {number}: unexpected event {event['id']} {event['type']} {event['subject']}")
        else:
            for field in COMPARED:
                if event.get(field) != reference[field]:
                    problems.append(f"line {number}: {field} {event.get(field)!r} != {reference[field]!r}")
        if event["type"] in TRANSITIONS and event["data"]["from_status"] != TRANSITIONS[event["type"]]:
            problems.append(f"line {number}: {event['type']} from_status {event['data']['from_status']}")
        # One entity's events leave in version order (same key, same partition).
        if key in last_sequence and event["sequence"] < last_sequence[key] and not args.allow_redelivery:
            problems.append(f"line {number}: entity {key} went back to {event['sequence']}")
        last_sequence[key] = max(event["sequence"], last_sequence.get(key, ""))

    missing = [identifier for identifier in want if identifier not in seen]
    repeated = {identifier: count for identifier, count in seen.items() if count > 1}
    if missing:
        problems.append(f"{len(missing)} expected events missing, e.g. {want[missing[0]]}")
    if repeated and not args.allow_redelivery:
        problems.append(f"{len(repeated)} event ids seen more than once")
    report = {"events": len(lines), "expected_events": len(want), "distinct_ids": len(seen),
              "repeated_ids": len(repeated), "missing": len(missing),
              "by_type": dict(sorted(by_type.items())), "problems": len(problems)}
    print(json.dumps(report))
    for problem in problems[:20]:
        print("  " + problem, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
