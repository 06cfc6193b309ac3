#!/usr/bin/env python3
"""Debezium Postgres changes of an `orders` table, shaped exactly like `order_changes` in
benches/support/mod.rs (no schema wrapper, key {"id":N}, sorted-key compact JSON as serde_json
writes it), with injected re-sends: duplicates (the same record again) and stale records (an
older change of an entity that has moved on).

Writes `key<TAB>value` lines for the console producer (parse.key=true, key.separator=TAB,
null.marker=NULL for the tombstones after --deletes) to
stdout, and what a correct consumer must see (records, applied, duplicate, stale, events by
type, and every expected event) as JSON to --expected.

  gen_orders.py --records 5000 --entities 500 --duplicates 150 --stale 100 --expected exp.json
"""
import argparse
import json
import random
import sys
import uuid

STATUSES = ["pending", "paid", "shipped", "cancelled"]
MASK = (1 << 64) - 1
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cdcflow:business-event")


def order_changes(records, entities):
    """The Rust generator, step for step (xorshift64 with wrapping shifts)."""
    steps = [0] * entities
    rand = 0x2545_F491_4F6C_DD1D
    for offset in range(records):
        if offset < entities:
            ident = offset
        else:
            rand ^= (rand << 13) & MASK
            rand ^= rand >> 7
            rand ^= (rand << 17) & MASK
            ident = rand % entities
        step = steps[ident]
        steps[ident] += 1
        lsn = 24_000_000 + offset * 64
        value = {
            "before": None,
            "after": {"id": ident, "customer_id": ident % 977, "status": STATUSES[min(step, 3)],
                      "amount": f"{100 + step // 2}.{ident % 100:02}", "currency": "EUR",
                      "created_at": "2024-11-25T09:58:00.000000Z", "note": None},
            "source": {"version": "2.7.3.Final", "connector": "postgresql", "name": "shop",
                       "ts_ms": 1_732_528_800_000 + offset, "snapshot": "false", "db": "shop",
                       "sequence": f'["{lsn - 32}","{lsn}"]', "schema": "public",
                       "table": "orders", "txId": 10_000 + offset, "lsn": lsn, "xmin": None},
            "op": "c" if step == 0 else "u", "ts_ms": 1_732_528_800_100 + offset,
            "transaction": None}
        yield ident, value


def dumps(value):
    # serde_json's Value without preserve_order: sorted keys, compact.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def seq_text(commit, change):
    return f"{commit:016x}.{change:016x}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--entities", type=int, default=500)
    parser.add_argument("--duplicates", type=int, default=150)
    parser.add_argument("--stale", type=int, default=100)
    parser.add_argument("--deletes", type=int, default=0,
                        help="then delete this many entities (before = key only), each followed by a tombstone")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--expected", required=True)
    args = parser.parse_args()
    pick = random.Random(args.seed)

    base = list(order_changes(args.records, args.entities))
    # Where re-sends go: after the base record at that index.
    dup_at = set(pick.sample(range(len(base)), args.duplicates))
    stale_at = set(pick.sample(range(args.entities * 2, len(base)), args.stale))

    out = sys.stdout
    history = {}  # entity -> its changes so far, in order
    emitted = []
    counts = {"duplicate": 0, "stale": 0}
    for index, (ident, value) in enumerate(base):
        history.setdefault(ident, []).append(value)
        emitted.append((ident, value))
        if index in dup_at:
            emitted.append((ident, value))
            counts["duplicate"] += 1
        if index in stale_at:
            # An older change of some entity that has at least two changes already.
            candidates = [e for e in (pick.randrange(args.entities) for _ in range(20))
                          if len(history.get(e, [])) >= 2]
            if candidates:
                entity = candidates[0]
                older = history[entity][pick.randrange(len(history[entity]) - 1)]
                emitted.append((entity, older))
                counts["stale"] += 1
    for number, ident in enumerate(pick.sample(range(args.entities), args.deletes)):
        offset = args.records + number
        lsn = 24_000_000 + offset * 64
        last = history[ident][-1]
        value = {"before": {name: (ident if name == "id" else None) for name in last["after"]},
                 "after": None, "source": dict(last["source"], ts_ms=1_732_528_800_000 + offset,
                                               sequence=f'["{lsn - 32}","{lsn}"]', lsn=lsn,
                                               txId=10_000 + offset),
                 "op": "d", "ts_ms": 1_732_528_800_100 + offset, "transaction": None}
        emitted.append((ident, value))
        emitted.append((ident, None))  # the tombstone
    for ident, value in emitted:
        out.write(dumps({"id": ident}) + "\t" + ("NULL" if value is None else dumps(value)) + "\n")

    # The reference: the gate and the six rules of the orders pipeline.
    state = {}
    events = []
    applied = duplicate = stale = 0
    skipped = 0
    for ident, value in emitted:
        if value is None:
            skipped += 1
            continue
        source = value["source"]
        commit_text, change_text = json.loads(source["sequence"])
        change = source["lsn"] if source.get("lsn") is not None else int(change_text)
        commit = int(commit_text) if commit_text is not None else change
        version = (commit, change)
        stored = state.get(ident)
        if stored is not None and version == stored[0]:
            duplicate += 1
            continue
        if stored is not None and version < stored[0]:
            stale += 1
            continue
        applied += 1
        op, before, after = value["op"], value["before"], value["after"]
        previous = stored[1] if stored is not None else None
        old = before if before is not None else previous
        fired = []
        if op == "c":
            fired.append(("created", "com.example.shop.OrderCreated",
                          {"order_id": after["id"], "customer_id": after["customer_id"],
                           "amount": after["amount"], "status": after["status"]}))
        if op == "u" and old is not None:
            for status, rule, kind in (("paid", "paid", "OrderPaid"), ("shipped", "shipped", "OrderShipped"),
                                       ("cancelled", "cancelled", "OrderCancelled")):
                if after["status"] == status and old.get("status") != status:
                    data = {"order_id": after["id"], "from_status": old.get("status")}
                    if rule in ("paid", "cancelled"):
                        data["amount"] = after["amount"]
                    fired.append((rule, "com.example.shop." + kind, data))
            if old.get("amount") != after.get("amount"):
                fired.append(("amount_changed", "com.example.shop.OrderAmountChanged",
                              {"order_id": after["id"], "from": old.get("amount"), "to": after["amount"]}))
        if op == "d":
            fired.append(("deleted", "com.example.shop.OrderDeleted",
                          {"order_id": ident, "last_status": previous.get("status") if previous else None}))
        sequence = seq_text(*version)
        for rule, kind, data in fired:
            name = "\x1f".join(["orders", rule, str(ident), sequence])
            events.append({"id": str(uuid.uuid5(NAMESPACE, name)), "type": kind, "subject": str(ident),
                           "data": data, "entityversion": f"{commit}.{change}", "sequence": sequence,
                           "correlationid": str(source["txId"])})
        state[ident] = (version, None if op == "d" else after)

    by_type = {}
    for event in events:
        by_type[event["type"]] = by_type.get(event["type"], 0) + 1
    assert duplicate == counts["duplicate"] and stale == counts["stale"], (duplicate, stale, counts)
    with open(args.expected, "w") as handle:
        json.dump({"records": len(emitted), "applied": applied, "duplicate": duplicate,
                   "stale": stale, "skipped": skipped, "events": len(events), "events_by_type": by_type,
                   "expected": events}, handle)
    print(f"gen_orders: {len(emitted)} records ({applied} to apply, {duplicate} duplicates, "
          f"{stale} stale), {len(events)} events expected: {by_type}", file=sys.stderr)


if __name__ == "__main__":
    main()
