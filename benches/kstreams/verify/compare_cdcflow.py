#!/usr/bin/env python3
"""Compares a contender's events (key<TAB>value lines) with `cdcflow replay` output (JSON
Lines) of the same input records: every CloudEvents document must be equal, field by field
(object key order aside), with the same Kafka key.

  compare_cdcflow.py replay-out.jsonl events.tsv
"""
import json
import sys


def main():
    replay_path, events_path = sys.argv[1], sys.argv[2]
    reference = {}
    for line in open(replay_path):
        record = json.loads(line)
        if record.get("kind") == "event":
            event = json.loads(record["payload"])
            reference[event["id"]] = (record["key"], event)
    ours = {}
    for line in open(events_path):
        key, _, value = line.rstrip("\n").partition("\t")
        event = json.loads(value)
        ours[event["id"]] = (key, event)
    only_reference = reference.keys() - ours.keys()
    only_ours = ours.keys() - reference.keys()
    different = [i for i in reference.keys() & ours.keys() if reference[i] != ours[i]]
    print(json.dumps({"cdcflow_events": len(reference), "contender_events": len(ours),
                      "identical": len(reference.keys() & ours.keys()) - len(different),
                      "different": len(different), "only_cdcflow": len(only_reference),
                      "only_contender": len(only_ours)}))
    for identifier in different[:3]:
        print("  cdcflow:  ", reference[identifier], "\n  contender:", ours[identifier], file=sys.stderr)
    sys.exit(1 if different or only_reference or only_ours else 0)


if __name__ == "__main__":
    main()
