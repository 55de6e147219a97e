#!/usr/bin/env python3
"""The "sale with payments" part of scripts/compare.sh.

  payments.py urls REDIS_PORT EVENT PORT   the pay URL of every reservation
  payments.py summarize OUT                 the table, appended to summary.md

Figures are medians over the rounds (the warm-up round excluded), and
spike's are given as ratios of the other proxies' measured in the same run.
"""
import json
import statistics
import subprocess
import sys


def urls(redis_port, event, port):
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", redis_port, "--raw", "HGETALL",
         f"spike:{{{event}}}:orders"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    for order_id, record in zip(out[0::2], out[1::2]):
        buyer = json.loads(record).get("buyer", "")
        print(f"http://127.0.0.1:{port}/orders/{order_id}/pay?user={buyer}")


def oha(path):
    with open(path) as f:
        s = json.load(f)["summary"]
    return s.get("requestsPerSec") or 0.0


def summarize(out):
    runs = [json.loads(line) for line in open(f"{out}/runs.jsonl") if line.strip()]
    rs = [r for r in runs if r.get("kind") == "payments" and int(r.get("round", r.get("pair", 0))) > 0]
    sides = {}
    for r in rs:
        paid = int(r["paid"])
        sides.setdefault(r["side"], []).append({
            "rush": oha(f"{out}/{r['rush']}"),
            "pay": oha(f"{out}/{r['pay']}"),
            "paid": paid,
            "total": int(r["total"]),
            "calls_per_paid": int(r["redis_evalsha"]) / paid if paid else None,
            "us_per_paid": int(r["redis_usec"]) / paid if paid and "redis_usec" in r else None,
        })
    def med(side, k):
        xs = [x[k] for x in sides.get(side, []) if x[k] is not None]
        return statistics.median(xs) if xs else None

    others = [p for p in ("nginx", "haproxy") if p in sides]
    if "spike" not in sides or not others:
        print("payments: no complete round", file=sys.stderr)
        return
    lines = [
        "",
        "### Sale with payments (`pay_within`)",
        "",
        "Rush: random buyers until sold out (every 200 a reservation); then the pay URL of every",
        "reservation, picked at random by oha (a second payment of an order is the same payment).",
        "",
        "| | spike | " + " | ".join(others) + " | " + " | ".join(f"spike / {p}" for p in others) + " |",
        "|---|---:|" + "---:|" * (2 * len(others)),
    ]
    for label, k, fmt in [
        ("rush, requests/s", "rush", "{:,.0f}"),
        ("payments, requests/s", "pay", "{:,.0f}"),
        ("Redis calls per paid ticket", "calls_per_paid", "{:.2f}"),
        ("Redis µs per paid ticket (rush and payment)", "us_per_paid", "{:.1f}"),
        ("paid (of the total)", "paid", "{:,.0f}"),
    ]:
        s = med("spike", k)
        vals = [med(p, k) for p in others]
        show = lambda v: "n/a" if v is None else fmt.format(v)
        ratios = [f"{s / v:.2f}" if (s is not None and v) else "n/a" for v in vals]
        lines.append(f"| {label} | {show(s)} | " + " | ".join(show(v) for v in vals) + " | " + " | ".join(ratios) + " |")
    text = "\n".join(lines) + "\n"
    with open(f"{out}/summary.md", "a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    if sys.argv[1] == "urls":
        urls(*sys.argv[2:5])
    elif sys.argv[1] == "summarize":
        summarize(sys.argv[2])
    else:
        sys.exit(__doc__)
