#!/usr/bin/env python3
"""The access log part of scripts/compare.sh.

  accesslog.py summarize OUT    the table, appended to summary.md and summary.json

spike alone in front of the static backends (proxy only, round_robin), the
same file without and with `access_log` (combined): what one line per
request costs. The ratio is taken round by round (with the log / without,
same round), then the median over the rounds (the warm-up round excluded).
The target (issue 25): CPU per proxied request with the log at most 1.1x.
"""
import sys

from tokens import append, med, oha_rounds, per_request, read_runs


def summarize(out):
    runs = read_runs(out)
    written = [r for r in runs if r.get("kind") == "accesslog" and int(r.get("round", 0)) > 0]
    rows = oha_rounds(out, "accesslog/", runs)
    for r in rows:
        r["mode"] = r["scenario"].split("/")[1]
        r["cpu_us"] = per_request(r, "")
    if not rows:
        print("accesslog: no run", file=sys.stderr)
        return
    by_round = {}
    for r in rows:
        if r["ok"]:
            by_round.setdefault(r["round"], {})[r["mode"]] = r
    both = [rd for rd in by_round.values() if "on" in rd and "off" in rd]
    ratio = {k: med([rd["on"][k] / rd["off"][k] for rd in both if rd["off"].get(k) and rd["on"].get(k)])
             for k in ("cpu_us", "rps")}
    modes = {m: {k: med([r[k] for r in rows if r["mode"] == m and r["ok"]]) for k in ("cpu_us", "rps", "p99")}
             for m in ("off", "on")}
    dropped = sum(int(w.get("dropped", 0)) for w in written)
    lines_short = [w for w in written if int(w.get("lines", 0)) != int(w.get("written", 0))]
    result = {"modes": modes, "ratios": ratio, "rounds": len(both), "dropped": dropped,
              "failed": [f"{r['mode']} round {r['round']}: {r['codes']} {r['errors']}" for r in rows if not r["ok"]],
              "met": ratio["cpu_us"] is not None and ratio["cpu_us"] <= 1.1}
    f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    text = "\n".join([
        "",
        "### Access log",
        "",
        "spike alone, proxy only (round_robin), without and with `access_log` (combined), order",
        "alternating by round; ratios with / without, same round, median over the rounds.",
        "",
        "| | CPU µs per request | req/s | p99 ms |",
        "|---|---:|---:|---:|",
        f"| without | {f(modes['off']['cpu_us'], '.1f')} | {f(modes['off']['rps'], ',.0f')} | {f(modes['off']['p99'] and modes['off']['p99'] * 1000, '.2f')} |",
        f"| with | {f(modes['on']['cpu_us'], '.1f')} | {f(modes['on']['rps'], ',.0f')} | {f(modes['on']['p99'] and modes['on']['p99'] * 1000, '.2f')} |",
        "",
        f"CPU per request ratio {f(ratio['cpu_us'], '.3f')} (target ≤ 1.1: {'met' if result['met'] else 'NOT met'}),"
        f" req/s ratio {f(ratio['rps'], '.3f')}, {len(both)} round(s); lines dropped: {dropped}"
        + ("" if not lines_short else f"; runs whose file has fewer lines than written: {len(lines_short)}"),
    ] + (["", "Failed runs: " + "; ".join(result["failed"])] if result["failed"] else [])) + "\n"
    append(out, "access_log", result, text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summarize":
        summarize(sys.argv[2])
    else:
        sys.exit(__doc__)
