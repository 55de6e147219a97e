#!/usr/bin/env python3
"""The "waiting room" part of scripts/compare.sh.

  waiting.py summarize OUT    the table, appended to summary.md and summary.json

What a buyer in a waiting room's line costs spike's balancer and Redis:
a buyer asking again with their place (answered from memory), a buyer
joining (one store call), against the sold-out edge answer measured in
the same round. CPU in µs per answer (the balancer's user + system time
÷ answers), ratios taken round by round against the edge answer, then
the median over the rounds (the warm-up round excluded). Redis calls per
answer: every command Redis ran in the run (INFO commandstats) ÷ answers,
and the waiting room's own store calls (its /metrics) ÷ answers.
"""
import json
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from tokens import append, oha, per_request  # noqa: E402


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(out):
    runs = [json.loads(line) for line in open(f"{out}/runs.jsonl") if line.strip()]
    rows, room = {}, {}
    for r in runs:
        scen = r.get("scenario", "")
        if not scen.startswith("waiting/") or int(r.get("round", 0)) == 0:
            continue
        if r.get("kind") == "room":
            room[(scen, r["round"])] = r.get("room_calls")
            continue
        if r.get("kind") != "oha":
            continue
        o = oha(f"{out}/{r['file']}")
        r.update(o)
        r["ok"] = o["requests"] > 0 and set(o["codes"]) == {str(r["expect"])} and not o["errors"]
        r["cpu_us"] = per_request(r, "")
        r["redis_per_answer"] = r.get("redis_all", 0) / o["requests"] if o["requests"] else None
        rows[(scen.split("/", 1)[1], r["round"])] = r
    if not rows:
        print("waiting: no run", file=sys.stderr)
        return
    for (kind, rnd), r in rows.items():
        calls = room.get((f"waiting/{kind}", rnd))
        r["room_calls_per_answer"] = calls / r["requests"] if calls is not None and r["requests"] else None
    rounds = sorted({rnd for _, rnd in rows})
    result = {"failed": [f"{k} round {rnd}: {r['codes']} {r['errors']}"
                         for (k, rnd), r in rows.items() if not r["ok"]]}
    f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "",
        "### The waiting room",
        "",
        "spike's balancer in front of a sale with `[waiting_room]` that has not opened: a buyer asking",
        "again with their place (`spike_queue`, answered from memory) and a buyer joining (one store",
        "call), against the sold-out edge answer in the same round. CPU in µs per answer; the ratio is",
        "to the edge answer, round by round, median over the rounds.",
        "",
        "| answer | req/s | CPU µs per answer | CPU ÷ edge answer | Redis commands per answer | waiting room's store calls per answer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, name in (("soldout_edge", "sold-out edge answer (409)"),
                       ("answer", "waiting, with a place (202)"),
                       ("join", "waiting, joining (202)")):
        mine = [rows[(kind, rnd)] for rnd in rounds if (kind, rnd) in rows and rows[(kind, rnd)]["ok"]]
        if not mine:
            continue
        ratio = med([rows[(kind, rnd)]["cpu_us"] / rows[("soldout_edge", rnd)]["cpu_us"]
                     for rnd in rounds
                     if (kind, rnd) in rows and ("soldout_edge", rnd) in rows
                     and rows[(kind, rnd)].get("cpu_us") and rows[("soldout_edge", rnd)].get("cpu_us")])
        m = {k: med([r.get(k) for r in mine]) for k in ("rps", "cpu_us", "redis_per_answer", "room_calls_per_answer")}
        m["cpu_ratio_to_edge"] = ratio
        result[kind] = m
        lines.append(f"| {name} | {f(m['rps'], ',.0f')} | {f(m['cpu_us'], '.1f')} | {f(ratio, '.2f')}"
                     f" | {f(m['redis_per_answer'], '.5f')} | {f(m['room_calls_per_answer'], '.5f')} |")
    if result["failed"]:
        lines += ["", "Failed runs: " + "; ".join(result["failed"])]
    append(out, "waiting", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summarize":
        summarize(sys.argv[2])
    else:
        sys.exit(__doc__)
