#!/usr/bin/env python3
"""The "buyers with tokens" part of scripts/compare.sh.

  tokens.py summarize OUT    the table, appended to summary.md and summary.json

The same sale with and without `[auth]`, the same crowd client: what a
token per buyer costs on the success path and on the sold-out path. The
ratios are taken round by round (with [auth] / without it, same proxy, same
round), then the median over the rounds (the warm-up round excluded).
"""
import json
import statistics
import sys


def oha(path):
    with open(path) as f:
        data = json.load(f)
    codes = data.get("statusCodeDistribution") or {}
    return {
        "rps": data["summary"].get("requestsPerSec") or 0.0,
        "requests": sum(int(v) for v in codes.values()),
        "codes": codes,
        "errors": data.get("errorDistribution") or {},
        "p99": (data.get("latencyPercentiles") or {}).get("p99"),
    }


def per_request(r, prefix):
    n, hz = r.get("requests"), r.get("hz")
    u, s = r.get(prefix + "cpu_user_ticks"), r.get(prefix + "cpu_sys_ticks")
    if not n or not hz or u is None or s is None:
        return None
    return (u + s) * 1e6 / hz / n


def read_runs(out):
    """The records compare.sh wrote to OUT/runs.jsonl (`record`), in order."""
    with open(f"{out}/runs.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def oha_rounds(out, prefix, runs=None):
    """The oha runs of the scenarios under `prefix` (e.g. "sales/"), the
    warm-up round (0) left out, in the file's order: each record with its oha
    figures added (see `oha`) and `ok`: answered, every answer the status it
    expects (its `expect`), no error. Why it exists: the parts of the table
    (tokens.py, sales.py, accesslog.py) read their rounds this one way, so
    a change to what runs.jsonl or oha writes is made once. `runs`: the
    records if the caller has read them already."""
    rows = []
    for r in read_runs(out) if runs is None else runs:
        scen = r.get("scenario", "")
        if r.get("kind") != "oha" or not scen.startswith(prefix) or int(r.get("round", 0)) == 0:
            continue
        o = oha(f"{out}/{r['file']}")
        r.update(o)
        r["ok"] = o["requests"] > 0 and set(o["codes"]) == {str(r["expect"])} and not o["errors"]
        rows.append(r)
    return rows


def load(out):
    rows = oha_rounds(out, "tokens/")
    for r in rows:
        _, path, send = r["scenario"].split("/")
        r.update(path=path, send=send)
        r["balancer_us"] = per_request(r, "")
        r["node_us"] = per_request(r, "node_")
        both = r["balancer_us"] is not None and r["node_us"] is not None
        # A round without one of the figures has no total (not a KeyError
        # in the summary).
        r["total_us"] = r["balancer_us"] + r["node_us"] if both else None
        sold = r.get("sold_delta")
        r["redis_us_per_sale"] = r["redis_usec"] / sold if sold and "redis_usec" in r else None
    return rows


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(out):
    rows = load(out)
    if not rows:
        print("tokens: no run", file=sys.stderr)
        return
    keys = ["rps", "balancer_us", "node_us", "total_us", "p99", "redis_us_per_sale"]
    result = {"failed": [f"{r['scenario']} {r['side']} round {r['round']}: {r['codes']} {r['errors']}"
                         for r in rows if not r["ok"]]}
    lines = [
        "",
        "### Buyers with tokens (`[auth]`)",
        "",
        "The same sale with and without `[auth]`, the same client (examples/crowd.rs), every request",
        "another buyer: `?user=` without [auth], that buyer's own HS256 token with it. CPU in µs per",
        "request, of the proxy and of the four nodes; ratios are with [auth] / without, same proxy, same",
        "round, median over the rounds.",
        "",
        "| path | proxy | req/s without | req/s with | req/s ratio | proxy CPU ratio | node CPU µs without → with | total CPU ratio | Redis µs per sale without → with |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in ("success", "soldout"):
        for side in ("spike", "nginx"):
            mine = [r for r in rows if r["path"] == path and r["side"] == side and r["ok"]]
            if not mine:
                continue
            by_round = {}
            for r in mine:
                by_round.setdefault(r["round"], {})[r["send"]] = r
            ratio = {k: med([rd["token"][k] / rd["query"][k]
                             for rd in by_round.values()
                             if "token" in rd and "query" in rd
                             and rd["token"].get(k) is not None and rd["query"].get(k)])
                     for k in keys}
            sides = {send: {k: med([r[k] for r in mine if r["send"] == send]) for k in keys}
                     for send in ("query", "token")}
            result.setdefault(path, {})[side] = {"medians": sides, "ratios": ratio,
                                                 "rounds": len(by_round)}
            f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
            lines.append(
                f"| {path} | {side} | {f(sides['query']['rps'], ',.0f')} | {f(sides['token']['rps'], ',.0f')}"
                f" | {f(ratio['rps'], '.3f')} | {f(ratio['balancer_us'], '.3f')}"
                f" | {f(sides['query']['node_us'], '.1f')} → {f(sides['token']['node_us'], '.1f')}"
                f" | {f(ratio['total_us'], '.3f')}"
                f" | {f(sides['query']['redis_us_per_sale'], '.1f')} → {f(sides['token']['redis_us_per_sale'], '.1f')} |"
            )
    if result["failed"]:
        lines += ["", "Failed runs: " + "; ".join(result["failed"])]
    append(out, "tokens", result, "\n".join(lines) + "\n")


def append(out, key, result, text):
    """Appends `text` to summary.md and `result` as `key` to summary.json
    (made if report.py wrote none), and prints the text."""
    with open(f"{out}/summary.md", "a") as fh:
        fh.write(text)
    try:
        with open(f"{out}/summary.json") as fh:
            summary = json.load(fh)
    except FileNotFoundError:
        summary = {}
    summary[key] = result
    with open(f"{out}/summary.json", "w") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summarize":
        summarize(sys.argv[2])
    else:
        sys.exit(__doc__)
