#!/usr/bin/env python3
"""The arithmetic of scripts/compare.sh: standard library only.

    report.py check FILE EXPECT          one oha JSON run -> one line for the log
    report.py record RUNS key=value ...  append one run record (JSON line) to RUNS
    report.py summarize DIR              DIR/runs.jsonl -> summary.json, summary.md, chart.svg

A run is verified before it counts: every answer must carry the status code the
scenario expects (EXPECT, e.g. 200 or 409) and no request may fail, apart from
the ones oha itself cancels at its -z deadline. A run that fails the check is
reported as FAILED and left out of every median and ratio; a pair counts only
when both of its runs passed.
"""

import json
import math
import os
import statistics
import sys

# ---------------------------------------------------------------------------
# One oha run.
# ---------------------------------------------------------------------------


def read_oha(path, expect):
    """Returns a dict: ok, reason, rps, p50/p99 (ms), codes, requests."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return {"ok": False, "reason": f"no oha JSON ({e})", "rps": None, "p99": None}
    summary = data.get("summary", {})
    pct = data.get("latencyPercentiles", {})
    codes = {str(k): int(v) for k, v in (data.get("statusCodeDistribution") or {}).items()}
    errors = {
        k: int(v)
        for k, v in (data.get("errorDistribution") or {}).items()
        # -z cancels the requests in flight at the deadline: not an answer.
        if "deadline" not in k.lower()
    }
    answered = sum(codes.values())
    wrong = {k: v for k, v in codes.items() if k != str(expect)}
    reason = ""
    if answered == 0:
        reason = "no answers"
    elif wrong:
        reason = "unexpected status " + ", ".join(f"{k}x{v}" for k, v in sorted(wrong.items()))
    if errors:
        reason = (reason + "; " if reason else "") + "errors " + ", ".join(
            f"{k}x{v}" for k, v in sorted(errors.items())
        )
    ms = lambda v: None if v is None else float(v) * 1000.0  # noqa: E731
    return {
        "ok": not reason,
        "reason": reason,
        "rps": summary.get("requestsPerSec"),
        "p50": ms(pct.get("p50")),
        "p99": ms(pct.get("p99")),
        "codes": codes,
        "requests": answered,
        "errors": errors,
    }


def cmd_check(path, expect):
    r = read_oha(path, expect)
    codes = " ".join(f"{k}:{v}" for k, v in sorted(r.get("codes", {}).items()))
    if r["ok"]:
        print(f"{r['rps']:10.0f} req/s  p99 {r['p99']:7.2f} ms  [{codes}]")
    else:
        print(f"FAILED: {r['reason']}  [{codes}]")


def parse_value(v):
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    if v in ("true", "false"):
        return v == "true"
    return v


def cmd_record(runs, pairs):
    rec = {}
    for p in pairs:
        k, _, v = p.partition("=")
        rec[k] = parse_value(v)
    with open(runs, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------
# The summary.
# ---------------------------------------------------------------------------

STRATEGIES = ["round_robin", "weighted_round_robin", "ip_hash", "least_conn"]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, spec=".0f", none="—"):
    return none if v is None else format(v, spec)


def load_runs(d):
    runs = []
    with open(os.path.join(d, "runs.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    for r in runs:
        if r.get("kind") == "oha":
            r.update(read_oha(os.path.join(d, r["file"]), r["expect"]))
            if r["ok"] and "redis_evalsha" in r and r.get("requests"):
                sold = r.get("sold_delta", 0)
                r["redis_per_sale"] = (r["redis_evalsha"] / sold) if sold else None
    return runs


def summarize_pairs(runs, scenario):
    """Spike/Nginx ratios pair by pair (warm-up, pair 0, excluded)."""
    rs = [r for r in runs if r.get("scenario") == scenario and r.get("pair", 0) > 0]
    out = {"scenario": scenario, "pairs": [], "failed": []}
    by_pair = {}
    for r in rs:
        by_pair.setdefault(r["pair"], {})[r["side"]] = r
        if not r.get("ok"):
            out["failed"].append(f"{r['side']} pair {r['pair']}: {r.get('reason')}")
    for p in sorted(by_pair):
        s, n = by_pair[p].get("spike"), by_pair[p].get("nginx")
        if not (s and n and s.get("ok") and n.get("ok")):
            continue
        out["pairs"].append(
            {
                "pair": p,
                "spike_rps": s["rps"],
                "nginx_rps": n["rps"],
                "spike_p99": s["p99"],
                "nginx_p99": n["p99"],
                "rps_ratio": s["rps"] / n["rps"] if n["rps"] else None,
                "p99_ratio": s["p99"] / n["p99"] if n["p99"] else None,
                "spike_redis_per_sale": s.get("redis_per_sale"),
                "nginx_redis_per_sale": n.get("redis_per_sale"),
                "spike_redis_calls": s.get("redis_evalsha"),
                "nginx_redis_calls": n.get("redis_evalsha"),
            }
        )
    ps = out["pairs"]
    for k in (
        "spike_rps",
        "nginx_rps",
        "spike_p99",
        "nginx_p99",
        "rps_ratio",
        "p99_ratio",
        "spike_redis_per_sale",
        "nginx_redis_per_sale",
        "spike_redis_calls",
        "nginx_redis_calls",
    ):
        out[k] = median([p[k] for p in ps])
    out["status"] = "ok" if ps else "FAILED"
    out["n_pairs"] = len(ps)
    out["n_pairs_planned"] = len({r["pair"] for r in rs})
    return out


def summarize_single(runs, scenario):
    rs = [r for r in runs if r.get("scenario") == scenario and r.get("pair", 0) > 0]
    ok = [r for r in rs if r.get("ok")]
    return {
        "scenario": scenario,
        "rps": median([r["rps"] for r in ok]),
        "p99": median([r["p99"] for r in ok]),
        "runs": len(ok),
        "failed": [f"run {r['pair']}: {r.get('reason')}" for r in rs if not r.get("ok")],
        "status": "ok" if ok else "FAILED",
    }


def summarize_ab(runs):
    out = {"pairs": [], "failed": [], "runs": {}}
    rs = [r for r in runs if r.get("kind") == "ab" and r.get("pair", 0) > 0]
    by_pair = {}
    for r in rs:
        r["ok"] = bool(r.get("complete")) and r.get("sold") == r.get("total") and not r.get(
            "failed_conn"
        )
        if not r["ok"]:
            out["failed"].append(
                f"{r['side']} pair {r['pair']}: complete={r.get('complete')} "
                f"sold={r.get('sold')}/{r.get('total')} non2xx={r.get('non2xx')}"
            )
        by_pair.setdefault(r["pair"], {})[r["side"]] = r
    for side in ("spike", "nginx"):
        mine = [r for r in rs if r["side"] == side]
        out["runs"][side] = {
            "rps": median([r["rps"] for r in mine if r["ok"]]),
            "p99": median([r.get("p99") for r in mine if r["ok"]]),
            "sold_equals_total": all(r.get("sold") == r.get("total") for r in mine) if mine else None,
            "sold": [r.get("sold") for r in mine],
            "total": mine[0].get("total") if mine else None,
        }
    for p in sorted(by_pair):
        s, n = by_pair[p].get("spike"), by_pair[p].get("nginx")
        if s and n and s["ok"] and n["ok"]:
            out["pairs"].append({"pair": p, "rps_ratio": s["rps"] / n["rps"]})
    out["rps_ratio"] = median([p["rps_ratio"] for p in out["pairs"]])
    out["status"] = "ok" if out["pairs"] else "FAILED"
    return out


def targets(summary):
    """The targets spike is measured against here, met or missed."""
    t = []
    for s in STRATEGIES:
        p = summary["proxy"].get(s)
        if not p or p["status"] != "ok":
            t.append((f"proxy {s}: req/s ≥ 1.3× Nginx", None, "no valid pair"))
            t.append((f"proxy {s}: p99 ≤ Nginx", None, "no valid pair"))
            continue
        t.append((f"proxy {s}: req/s ≥ 1.3× Nginx", p["rps_ratio"] >= 1.3, f"{p['rps_ratio']:.2f}×"))
        t.append((f"proxy {s}: p99 ≤ Nginx", p["p99_ratio"] <= 1.0, f"{p['p99_ratio']:.2f}×"))
    base = summary["proxy"].get(summary.get("sale_strategy", "round_robin"))
    base_rps = base.get("spike_rps") if base else None
    so, su = summary.get("sale_sold_out"), summary.get("sale_success")
    if so and so["status"] == "ok" and base_rps:
        r = so["spike_rps"] / base_rps
        t.append(("sold-out path ≥ 0.9× proxy-only (spike)", r >= 0.9, f"{r:.2f}×"))
    else:
        t.append(("sold-out path ≥ 0.9× proxy-only (spike)", None, "not measured"))
    if su and su["status"] == "ok" and base_rps:
        r = su["spike_rps"] / base_rps
        t.append(("success path ≥ 0.7× proxy-only (spike)", r >= 0.7, f"{r:.2f}×"))
        c = su.get("spike_redis_per_sale")
        t.append(
            (
                "success path: at most one Redis call per sale",
                None if c is None else c <= 1.0 + 1e-9,
                fmt(c, ".3f"),
            )
        )
    else:
        t.append(("success path ≥ 0.7× proxy-only (spike)", None, "not measured"))
    m = summary.get("memory", {}).get("spike")
    if m:
        ok = m.get("connections", 0) >= m.get("wanted", 0)
        t.append(
            (
                f"RSS with {m.get('wanted')} idle keep-alive clients < 64 MiB",
                (m["rss_kib"] / 1024.0 < 64) if ok else None,
                f"{m['rss_kib'] / 1024.0:.1f} MiB ({m.get('connections')} held)",
            )
        )
    return t


def summarize(d):
    runs = load_runs(d)
    env = {}
    env_path = os.path.join(d, "env.json")
    if os.path.exists(env_path):
        with open(env_path) as f:
            env = json.load(f)
    summary = {"env": env, "proxy": {}, "sale_strategy": env.get("sale_strategy", "round_robin")}
    scen = {r.get("scenario") for r in runs}
    for s in STRATEGIES:
        if f"proxy/{s}" in scen:
            summary["proxy"][s] = summarize_pairs(runs, f"proxy/{s}")
    if "sale/success" in scen:
        summary["sale_success"] = summarize_pairs(runs, "sale/success")
    if "sale/sold_out" in scen:
        summary["sale_sold_out"] = summarize_pairs(runs, "sale/sold_out")
    if any(r.get("kind") == "ab" for r in runs):
        summary["ab"] = summarize_ab(runs)
    summary["direct"] = {}
    for s in sorted(x for x in scen if x and x.startswith("direct/")):
        summary["direct"][s.split("/", 1)[1]] = summarize_single(runs, s)
    mem = [r for r in runs if r.get("kind") == "memory"]
    summary["memory"] = {r["side"]: r for r in mem}
    summary["targets"] = [
        {"target": n, "met": m, "value": v} for (n, m, v) in targets(summary)
    ]
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    md = render_md(summary)
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write(md)
    with open(os.path.join(d, "chart.svg"), "w") as f:
        f.write(render_svg(summary))
    print(md)


def render_md(s):
    e = s["env"]
    lines = []
    lines.append(f"Date: {e.get('date', '?')}  ")
    lines.append(f"Machine: {e.get('nproc', '?')} CPUs, {e.get('cpu', '?')}; load before: {e.get('load', '?')}  ")
    lines.append(
        f"Versions: spike {e.get('spike_rev', '?')}, {e.get('nginx', '?')}, "
        f"{e.get('redis', '?')}, {e.get('oha', '?')}, {e.get('rustc', '?')}  "
    )
    lines.append(
        f"Runs: {e.get('pairs', '?')} spike/nginx pairs after a discarded warm-up pair, "
        f"{e.get('duration', '?')} each, -c {e.get('concurrency', '?')}; "
        f"nginx workers = spike runtime threads = {e.get('workers', '?')}.  "
    )
    lines.append(
        "The client (oha/ab), the proxy, the backends and Redis all share these "
        f"{e.get('nproc', '?')} CPUs: every number is a same-machine figure.  "
    )
    lines.append("")
    lines.append(
        "| scenario | spike req/s | nginx req/s | req/s spike÷nginx | spike p99 ms | nginx p99 ms | p99 spike÷nginx | pairs |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")

    def row(name, p, extra=""):
        if not p or p["status"] != "ok":
            why = "; ".join((p or {}).get("failed", [])[:2]) or "not run"
            lines.append(f"| {name} | FAILED | | | | | | 0 ({why}) |")
            return
        failed = f", {len(p['failed'])} FAILED run(s)" if p["failed"] else ""
        lines.append(
            f"| {name}{extra} | {fmt(p['spike_rps'])} | {fmt(p['nginx_rps'])} | "
            f"**{fmt(p['rps_ratio'], '.2f')}** | {fmt(p['spike_p99'], '.2f')} | "
            f"{fmt(p['nginx_p99'], '.2f')} | **{fmt(p['p99_ratio'], '.2f')}** | "
            f"{p['n_pairs']}/{p['n_pairs_planned']}{failed} |"
        )

    for st in STRATEGIES:
        if st in s["proxy"]:
            row(f"1. proxy only, {st}", s["proxy"][st])
    if "sale_success" in s:
        row("2. sale, success path (200 sold)", s["sale_success"])
    if "sale_sold_out" in s:
        row("2. sale, sold-out path (409)", s["sale_sold_out"])
    ab = s.get("ab")
    if ab:
        sp, ng = ab["runs"].get("spike", {}), ab["runs"].get("nginx", {})
        lines.append(
            f"| 3. `ab -n 10000 -c 100`, sale of {sp.get('total')} | {fmt(sp.get('rps'))} | "
            f"{fmt(ng.get('rps'))} | **{fmt(ab.get('rps_ratio'), '.2f')}** | "
            f"{fmt(sp.get('p99'), '.0f')} | {fmt(ng.get('p99'), '.0f')} | | {len(ab['pairs'])} |"
        )
    for name, d in s.get("direct", {}).items():
        lines.append(
            f"| 4. direct, no balancer: {name} | {fmt(d['rps'])} | | | {fmt(d['p99'], '.2f')} | | | {d['runs']} runs |"
        )
    lines.append("")
    notes = []
    if "sale_success" in s and s["sale_success"]["status"] == "ok":
        su = s["sale_success"]
        notes.append(
            f"Redis calls per sale (EVALSHA ÷ tickets sold, success path): spike {fmt(su['spike_redis_per_sale'], '.3f')}, "
            f"nginx {fmt(su['nginx_redis_per_sale'], '.3f')} (the nodes make the calls; the proxy only passes them through)."
        )
    if "sale_sold_out" in s and s["sale_sold_out"]["status"] == "ok":
        so = s["sale_sold_out"]
        notes.append(
            f"Redis calls during a sold-out run: spike {fmt(so['spike_redis_calls'])}, nginx {fmt(so['nginx_redis_calls'])}."
        )
    if ab:
        for side in ("spike", "nginx"):
            r = ab["runs"].get(side, {})
            notes.append(
                f"ab through {side}: sold equals total after every run: "
                f"{'yes' if r.get('sold_equals_total') else 'NO'} (sold {r.get('sold')} of {r.get('total')}); "
                "p99 column is ab's 99% in ms."
            )
    for side, m in s.get("memory", {}).items():
        notes.append(
            f"Memory, {side}: {m.get('rss_kib', 0) / 1024.0:.1f} MiB resident, "
            f"{m.get('pss_kib', 0) / 1024.0:.1f} MiB proportional (shared pages counted once) "
            f"over {m.get('processes', 1)} process(es), holding {m.get('connections')} of {m.get('wanted')} "
            "idle keep-alive client connections."
        )
    for n in notes:
        lines.append(f"- {n}")
    failed = []
    for key, p in list(("proxy/" + k, v) for k, v in s["proxy"].items()) + [
        ("sale/success", s.get("sale_success")),
        ("sale/sold_out", s.get("sale_sold_out")),
        ("ab", s.get("ab")),
    ] + [("direct/" + k, v) for k, v in s.get("direct", {}).items()]:
        for f in (p or {}).get("failed", []):
            failed.append(f"{key}: {f}")
    if failed:
        lines.append("")
        lines.append("FAILED runs (left out of the medians):")
        for f in failed:
            lines.append(f"- {f}")
    lines.append("")
    lines.append("Targets:")
    lines.append("")
    for t in s["targets"]:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"- {t['target']}: {t['value']} — {mark}")
    lines.append("")
    return "\n".join(lines)


def esc(t):
    return str(t).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def nice_axis(top, most=6):
    """An axis from 0 that holds `top` with a little room, in at most `most`
    steps of a round size (1, 2, 2.5 or 5 times a power of ten), so that
    every tick reads as a round number. Returns (axis maximum, step)."""
    top = top * 1.05 if top > 0 else 1.0
    power = 10.0 ** math.floor(math.log10(top / most))
    for m in (1, 2, 2.5, 5, 10):
        step = m * power
        if math.ceil(top / step) <= most:
            break
    return math.ceil(top / step) * step, step


def tick_label(v, step):
    """A tick's label with as many decimals as the step needs (none for
    whole steps; thousands separated)."""
    decimals = 0
    while decimals < 3 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-9:
        decimals += 1
    return f"{v:,.{decimals}f}"


def render_svg(s):
    """Two grouped bar charts (req/s, p99), spike next to nginx per scenario."""
    groups = []
    for st in STRATEGIES:
        p = s["proxy"].get(st)
        if p:
            groups.append((f"proxy {st}", p))
    for key, name in (("sale_success", "sale success"), ("sale_sold_out", "sale sold-out")):
        if key in s:
            groups.append((name, s[key]))
    ab = s.get("ab")
    if ab:
        groups.append(
            (
                "ab -n 10000",
                {
                    "spike_rps": ab["runs"].get("spike", {}).get("rps"),
                    "nginx_rps": ab["runs"].get("nginx", {}).get("rps"),
                    "spike_p99": ab["runs"].get("spike", {}).get("p99"),
                    "nginx_p99": ab["runs"].get("nginx", {}).get("p99"),
                },
            )
        )
    for name, d in s.get("direct", {}).items():
        groups.append((f"direct {name}", {"spike_rps": d["rps"], "spike_p99": d["p99"], "direct": True}))
    W, panel_h, top, left = 60 + 110 * max(len(groups), 1), 260, 50, 120
    H = top + 2 * (panel_h + 150) + 10
    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W + left}" height="{H}" '
        'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    e = s["env"]
    o.append(
        f'<text x="{left}" y="20" font-size="14" font-weight="bold">spike vs Nginx — '
        f'{esc(e.get("date", ""))}, {esc(e.get("nproc", "?"))} CPUs ({esc(e.get("cpu", ""))})</text>'
    )
    o.append(
        f'<text x="{left}" y="36" fill="#555">medians of {esc(e.get("pairs", "?"))} pairs; '
        "client, proxy, backends and Redis share the same CPUs; FAILED runs excluded</text>"
    )
    colors = {"spike": "#d9480f", "nginx": "#1c7ed6", "direct": "#868e96"}
    for pi, (metric, title) in enumerate((("rps", "requests/s (higher is better)"), ("p99", "p99 latency, ms (lower is better)"))):
        y0 = top + pi * (panel_h + 150)
        vals = []
        for _, g in groups:
            for side in ("spike", "nginx"):
                v = g.get(f"{side}_{metric}")
                if v is not None:
                    vals.append(v)
        vmax, step = nice_axis(max(vals) if vals else 1.0)
        ticks = round(vmax / step)
        o.append(f'<text x="{left}" y="{y0 + 12}" font-size="13" font-weight="bold">{esc(title)}</text>')
        base = y0 + 20 + panel_h
        o.append(f'<line x1="{left}" y1="{base}" x2="{left + W - 40}" y2="{base}" stroke="#333"/>')
        for k in range(ticks + 1):
            v = step * k
            y = base - panel_h * k / ticks
            o.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + W - 40}" y2="{y:.1f}" stroke="#eee"/>')
            label = tick_label(v, step)
            o.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{label}</text>')
        for gi, (name, g) in enumerate(groups):
            x = left + 20 + gi * 110
            sides = [("direct", g.get(f"spike_{metric}"))] if g.get("direct") else [
                ("spike", g.get(f"spike_{metric}")),
                ("nginx", g.get(f"nginx_{metric}")),
            ]
            for si, (side, v) in enumerate(sides):
                bx = x + si * 40
                if v is None:
                    o.append(f'<text x="{bx + 18}" y="{base - 4}" text-anchor="middle" fill="#c00">FAILED</text>')
                    continue
                h = panel_h * v / vmax
                o.append(
                    f'<rect x="{bx}" y="{base - h:.1f}" width="36" height="{h:.1f}" fill="{colors[side]}">'
                    f"<title>{esc(name)} {side}: {v:.2f}</title></rect>"
                )
                t = f"{v:.0f}" if metric == "rps" else f"{v:.2f}"
                o.append(f'<text x="{bx + 18}" y="{base - h - 3:.1f}" text-anchor="middle">{t}</text>')
            o.append(
                f'<text x="{x + 40}" y="{base + 14}" text-anchor="end" '
                f'transform="rotate(-25 {x + 40} {base + 14})">{esc(name)}</text>'
            )
        ly = base + 110
        for li, (side, label) in enumerate((("spike", "spike"), ("nginx", "nginx"), ("direct", "direct to one backend"))):
            lx = left + li * 120
            o.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{colors[side]}"/>')
            o.append(f'<text x="{lx + 14}" y="{ly}">{esc(label)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def main(argv):
    if len(argv) >= 3 and argv[1] == "check":
        cmd_check(argv[2], argv[3])
    elif len(argv) >= 3 and argv[1] == "record":
        cmd_record(argv[2], argv[3:])
    elif len(argv) == 3 and argv[1] == "summarize":
        summarize(argv[2])
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
