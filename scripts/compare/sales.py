#!/usr/bin/env python3
"""The many-sales part of scripts/compare.sh.

  sales.py summarize OUT    the table, appended to summary.md and summary.json

Two fleets side by side on one Redis, each spike's balancer and four nodes:
one with a file of one sale, one with a file of SALES_MANY sales (10,000)
whose purchases all go to one of them (`/events/E/buy`). Each round runs
both, the order alternating; the ratio (many ÷ one) is taken round by
round, then the median over the rounds (the warm-up round excluded). What
issue 28 asks: a purchase's CPU with 10,000 sales configured within noise
of a single-sale fleet.
"""
import sys

from tokens import append, med, oha_rounds, per_request

KEYS = ("rps", "balancer_us", "node_us", "total_us", "p99")


def summarize(out):
    rows = oha_rounds(out, "sales/")
    for r in rows:
        r["fleet"] = r["scenario"].split("/")[1]
        r["balancer_us"] = per_request(r, "")
        r["node_us"] = per_request(r, "node_")
        both = r["balancer_us"] is not None and r["node_us"] is not None
        r["total_us"] = r["balancer_us"] + r["node_us"] if both else None
    if not rows:
        print("sales: no run", file=sys.stderr)
        return
    by_round = {}
    for r in rows:
        if r["ok"]:
            by_round.setdefault(r["round"], {})[r["fleet"]] = r
    both = [rd for rd in by_round.values() if "one" in rd and "many" in rd]
    ratio = {k: med([rd["many"][k] / rd["one"][k] for rd in both if rd["one"].get(k) and rd["many"].get(k) is not None])
             for k in KEYS}
    fleets = {m: {k: med([r[k] for r in rows if r["fleet"] == m and r["ok"]]) for k in KEYS} for m in ("one", "many")}
    result = {"fleets": fleets, "ratios": ratio, "rounds": len(both),
              "failed": [f"{r['fleet']} round {r['round']}: {r['codes']} {r['errors']}" for r in rows if not r["ok"]]}
    f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731

    def row(name, d):
        p99 = d["p99"] and d["p99"] * 1000
        return (f"| {name} | {f(d['rps'], ',.0f')} | {f(d['balancer_us'], '.1f')} | {f(d['node_us'], '.1f')} "
                f"| {f(d['total_us'], '.1f')} | {f(p99, '.2f')} |")

    text = "\n".join([
        "",
        "### Many sales in one fleet",
        "",
        "spike's balancer and four nodes on a file of one sale, and on a file of many sales with every",
        "purchase in one of them (`/events/E/buy`); both fleets on one Redis, order alternating by round;",
        "CPU µs per purchase (the balancer's, the four nodes' together); ratios many ÷ one, same round,",
        "median over the rounds.",
        "",
        "| file | req/s | balancer µs | nodes µs | both µs | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
        row("one sale", fleets["one"]),
        row("many sales", fleets["many"]),
        f"| many ÷ one | {f(ratio['rps'], '.3f')} | {f(ratio['balancer_us'], '.3f')} | {f(ratio['node_us'], '.3f')} "
        f"| {f(ratio['total_us'], '.3f')} | {f(ratio['p99'], '.3f')} |",
        "",
        f"{len(both)} round(s).",
    ] + (["", "Failed runs: " + "; ".join(result["failed"])] if result["failed"] else [])) + "\n"
    append(out, "many_sales", result, text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summarize":
        summarize(sys.argv[2])
    else:
        sys.exit(__doc__)
