#!/usr/bin/env python3
"""The arithmetic of scripts/compare.sh: standard library only.

    report.py check FILE EXPECT [USER SYS HZ]  one oha JSON run -> one line for the log
                                               (with the proxy's CPU ticks in the run)
    report.py record RUNS key=value ...        append one run record (JSON line) to RUNS
    report.py summarize DIR                    DIR/runs.jsonl -> summary.json, summary.md, chart.svg

A run is verified before it counts: every answer must carry the status code the
scenario expects (EXPECT, e.g. 200 or 409) and no request may fail, apart from
the ones oha itself cancels at its -z deadline. A run that fails the check is
reported as FAILED and left out of every median and ratio; a ratio of spike to
another proxy is taken within a round, and only when both runs passed.

CPU per request = the user + system clock ticks the proxy's processes (every
thread, and Nginx's workers) spent during the run, read from /proc before and
after it by compare.sh, in µs, ÷ the requests answered in the run.
"""

import glob
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


def cpu_per_request(r):
    """Adds cpu_us, user_us and sys_us (µs of the proxy's CPU per answered
    request) to run r, when it carries the proxy's clock ticks."""
    if "cpu_user_ticks" in r and r.get("requests") and r.get("hz"):
        us = 1e6 / r["hz"] / r["requests"]
        r["user_us"] = r["cpu_user_ticks"] * us
        r["sys_us"] = r["cpu_sys_ticks"] * us
        r["cpu_us"] = r["user_us"] + r["sys_us"]
    return r


def cmd_check(path, expect, cpu=()):
    r = read_oha(path, expect)
    codes = " ".join(f"{k}:{v}" for k, v in sorted(r.get("codes", {}).items()))
    if r["ok"]:
        extra = ""
        if cpu:
            r.update(cpu_user_ticks=int(cpu[0]), cpu_sys_ticks=int(cpu[1]), hz=int(cpu[2]))
            cpu_per_request(r)
            extra = f"  cpu {r['cpu_us']:5.1f} µs/req ({r['user_us']:.1f} user + {r['sys_us']:.1f} sys)"
        print(f"{r['rps']:10.0f} req/s  p99 {r['p99']:7.2f} ms{extra}  [{codes}]")
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


def median_interval(xs, level=0.95):
    """A distribution-free interval for the median of xs: the order
    statistics a sign test allows, (low, high, coverage), or None with too
    few values. Why: rounds on a shared 2-core machine move by 10% and more
    (an AOF rewrite, another process), so a median ratio of 1.00 can be a
    tie or a lead; the interval says which. No normality is assumed, so a
    single wild round cannot stretch it."""
    xs = sorted(x for x in xs if x is not None)
    n = len(xs)
    if n < 6:
        return None
    # The largest k with P(Binomial(n, 1/2) < k) <= (1 - level) / 2.
    tail, k = 0.0, 0
    while True:
        nxt = tail + math.comb(n, k) / 2.0**n
        if nxt > (1.0 - level) / 2.0:
            break
        tail, k = nxt, k + 1
    if k == 0:
        return None
    return xs[k - 1], xs[n - k], 1.0 - 2.0 * tail


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
        # Results of the two-proxy script called a round a pair.
        if "round" not in r and "pair" in r:
            r["round"] = r.pop("pair")
        if r.get("kind") == "oha":
            r.update(read_oha(os.path.join(d, r["file"]), r["expect"]))
            cpu_per_request(r)
            if r["ok"] and "redis_evalsha" in r and r.get("requests"):
                sold = r.get("sold_delta", 0)
                r["redis_per_sale"] = (r["redis_evalsha"] / sold) if sold else None
                if "redis_usec" in r:
                    # Redis's one thread: the time a sale costs it.
                    r["redis_us_per_sale"] = (r["redis_usec"] / sold) if sold else None
    return runs


SUBJECT = "spike"  # the proxy every ratio is about: spike ÷ each of the others
NAMES = {
    "spike": "spike",
    "base": "spike (BASE_SPIKE)",
    "nginx": "Nginx",
    "haproxy": "HAProxy",
    "direct": "direct, no proxy",
}
# Medians kept per proxy, and the ratios taken round by round (name, run key).
PER_SIDE = ("rps", "p99", "cpu_us", "user_us", "sys_us", "redis_per_sale", "redis_us_per_sale", "redis_evalsha")
RATIO_KEYS = (("cpu", "cpu_us"), ("user", "user_us"), ("sys", "sys_us"), ("rps", "rps"), ("p99", "p99"))


def by_round(rs):
    out = {}
    for r in rs:
        out.setdefault(r["round"], {})[r["side"]] = r
    return out


def ratios(rounds, sides, keys):
    """spike ÷ each other proxy, taken within each round where both runs
    passed, for every key both runs carry; the median over those rounds."""
    out = {}
    for other in sides:
        if other == SUBJECT:
            continue
        per = []
        for rd in sorted(rounds):
            a, b = rounds[rd].get(SUBJECT), rounds[rd].get(other)
            if a and b and a.get("ok") and b.get("ok"):
                per.append(
                    {
                        name: a[k] / b[k] if a.get(k) is not None and b.get(k) else None
                        for name, k in keys
                    }
                )
        out[other] = {name: median([p[name] for p in per]) for name, _ in keys}
        out[other]["rounds"] = len(per)
        out[other]["intervals"] = {
            name: median_interval([p[name] for p in per]) for name, _ in keys
        }
    return out


def summarize_rounds(runs, scenario, sides, keys=RATIO_KEYS, per_side=PER_SIDE):
    """Every proxy's medians over its passed runs, and spike's ratios to the
    others round by round (warm-up, round 0, excluded)."""
    rs = [r for r in runs if r.get("scenario") == scenario and r.get("round", 0) > 0]
    rounds = by_round(rs)
    out = {
        "scenario": scenario,
        "failed": [f"{r['side']} round {r['round']}: {r.get('reason')}" for r in rs if not r.get("ok")],
        "sides": {},
    }
    for side in sides:
        mine = [r for r in rs if r["side"] == side]
        if mine:
            ok = [r for r in mine if r.get("ok")]
            out["sides"][side] = {k: median([r.get(k) for r in ok]) for k in per_side}
            out["sides"][side]["runs"] = len(ok)
    present = list(out["sides"])
    out["ratios"] = ratios(rounds, present, keys)
    out["n_rounds_planned"] = len(rounds)
    out["n_rounds"] = sum(
        1 for rd in rounds.values() if all(rd.get(s, {}).get("ok") for s in present)
    )
    out["status"] = "ok" if out["sides"].get(SUBJECT, {}).get("runs") else "FAILED"
    return out


def summarize_ab(runs, sides):
    rs = [r for r in runs if r.get("kind") == "ab" and r.get("round", 0) > 0]
    for r in rs:
        cpu_per_request(r)  # ab's requests: every one it completed, 200 or 409
        r["ok"] = bool(r.get("complete")) and r.get("sold") == r.get("total") and not r.get(
            "failed_conn"
        )
        r["reason"] = (
            f"complete={r.get('complete')} sold={r.get('sold')}/{r.get('total')} "
            f"non2xx={r.get('non2xx')}"
        )
    out = summarize_rounds(runs, "ab", sides, per_side=("rps", "p99", "cpu_us", "user_us", "sys_us"))
    for side, v in out["sides"].items():
        mine = [r for r in rs if r["side"] == side]
        v.update(
            sold_equals_total=all(r.get("sold") == r.get("total") for r in mine),
            sold=[r.get("sold") for r in mine],
            total=mine[0].get("total"),
        )
    return out


def summarize_single(runs, scenario):
    rs = [r for r in runs if r.get("scenario") == scenario and r.get("round", 0) > 0]
    ok = [r for r in rs if r.get("ok")]
    return {
        "scenario": scenario,
        "sides": {"direct": {"rps": median([r["rps"] for r in ok]), "p99": median([r["p99"] for r in ok]), "runs": len(ok)}},
        "failed": [f"run {r['round']}: {r.get('reason')}" for r in rs if not r.get("ok")],
        "status": "ok" if ok else "FAILED",
    }


def spike(p, key):
    """spike's median `key` in scenario summary p (None when not measured)."""
    return ((p or {}).get("sides", {}).get(SUBJECT) or {}).get(key)


def targets(summary):
    """Issue 13's targets (proxy only, against HAProxy in the same run), and
    the sale path and memory figures kept from before, met or missed."""
    t = []
    for s in STRATEGIES:
        r = ((summary["proxy"].get(s) or {}).get("ratios") or {}).get("haproxy") or {}
        for name, key, better in (
            ("CPU per request ≤ HAProxy's", "cpu", lambda v: v <= 1.0),
            ("req/s ≥ HAProxy's", "rps", lambda v: v >= 1.0),
            ("p99 ≤ HAProxy's", "p99", lambda v: v <= 1.0),
        ):
            v = r.get(key) if r.get("rounds") else None
            t.append(
                (
                    f"proxy {s}: {name}",
                    None if v is None else better(v),
                    "no valid round with HAProxy" if v is None else f"{v:.2f}×",
                )
            )
    # Issue 25: over HTTPS, spike's CPU per request at most Nginx's.
    for name in HTTPS_ORDER:
        p = summary.get("https", {}).get(name)
        if not p:
            continue
        r = (p.get("ratios") or {}).get("nginx") or {}
        v = r.get("cpu") if r.get("rounds") else None
        t.append(
            (
                f"HTTPS, {HTTPS_LABELS[name]}: CPU per request ≤ Nginx's",
                None if v is None else v <= 1.0,
                "no valid round with Nginx" if v is None else f"{v:.2f}×",
            )
        )
    base_rps = spike(summary["proxy"].get(summary.get("sale_strategy", "round_robin")), "rps")
    so, su = summary.get("sale_sold_out"), summary.get("sale_success")
    if spike(so, "rps") and base_rps:
        r = spike(so, "rps") / base_rps
        t.append(("sold-out path ≥ 0.9× proxy-only (spike)", r >= 0.9, f"{r:.2f}×"))
    else:
        t.append(("sold-out path ≥ 0.9× proxy-only (spike)", None, "not measured"))
    if spike(su, "rps") and base_rps:
        r = spike(su, "rps") / base_rps
        t.append(("success path ≥ 0.7× proxy-only (spike)", r >= 0.7, f"{r:.2f}×"))
        c = spike(su, "redis_per_sale")
        t.append(
            (
                "success path: at most one Redis call per sale",
                None if c is None else c <= 1.0 + 1e-9,
                fmt(c, ".3f"),
            )
        )
    else:
        t.append(("success path ≥ 0.7× proxy-only (spike)", None, "not measured"))
    # Issue 26: the sale itself against Nginx in front of the same nodes.
    for name, p, key, higher in (
        ("success path: req/s ≥ Nginx-fronted", summary.get("sale_success"), "rps", True),
        ("success path: CPU per request ≤ Nginx's", summary.get("sale_success"), "cpu", False),
        ("ab: CPU per request ≤ Nginx's", summary.get("ab"), "cpu", False),
    ):
        if p is None:
            continue
        t.append((name, *against_nginx(p, key, higher)))
    mem = summary.get("memory", {})
    if mem.get(SUBJECT) and mem.get("nginx"):
        a, b = mem[SUBJECT], mem["nginx"]
        held = all(x.get("connections", 0) >= x.get("wanted", 0) for x in (a, b))
        t.append(
            (
                f"PSS with {a.get('wanted')} idle clients ≤ Nginx's",
                (a["pss_kib"] <= b["pss_kib"]) if held else None,
                f"{a['pss_kib'] / 1024.0:.1f} MiB against {b['pss_kib'] / 1024.0:.1f}",
            )
        )
    m = mem.get(SUBJECT)
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


def against_nginx(p, key, higher):
    """(met, text) of spike's median ratio to Nginx on `key`: met when the
    median is on the right side of 1.0; the text adds the median's interval
    and whether it shows a lead or only a tie."""
    r = (p.get("ratios") or {}).get("nginx") or {}
    v = r.get(key) if r.get("rounds") else None
    if v is None:
        return None, "no valid round with Nginx"
    met = v >= 1.0 if higher else v <= 1.0
    iv = (r.get("intervals") or {}).get(key)
    if not iv:
        return met, f"{v:.2f}× ({r['rounds']} rounds, too few for an interval)"
    lo, hi, cover = iv
    ahead = lo > 1.0 if higher else hi < 1.0
    behind = hi < 1.0 if higher else lo > 1.0
    verdict = "ahead" if ahead else ("behind" if behind else "the interval holds 1.00: a tie")
    return met, (
        f"{v:.2f}× over {r['rounds']} rounds, {cover:.0%} interval of the median "
        f"{lo:.2f}–{hi:.2f}: {verdict}"
    )


def not_exact(d):
    """Where HAProxy is not exact, in the words of the comments `spike
    haproxy-conf` printed ("Not exact: …", "Not equivalent: …") in each
    haproxy.cfg compare.sh ran (it keeps a copy as logs/haproxy-NAME.cfg):
    {NAME: [comment, ...]}."""
    out = {}
    for path in sorted(glob.glob(os.path.join(d, "logs", "haproxy-*.cfg"))):
        name = os.path.basename(path)[len("haproxy-") : -len(".cfg")]
        blocks, cur = [], None
        with open(path) as f:
            for line in f:
                t = line.strip()
                if not t.startswith("#"):
                    cur = None
                    continue
                text = t.lstrip("#").strip()
                if text.startswith(("Not exact", "Not equivalent")):
                    cur = [text]
                    blocks.append(cur)
                elif cur is not None and not cur[-1].endswith("."):
                    cur.append(text)  # the same sentence, on the next line
                else:
                    cur = None
        out[name] = [" ".join(b) for b in blocks]
    return out


def summarize(d):
    runs = load_runs(d)
    env = {}
    env_path = os.path.join(d, "env.json")
    if os.path.exists(env_path):
        with open(env_path) as f:
            env = json.load(f)
    seen = {r["side"] for r in runs if r.get("side") not in (None, "direct")}
    sides = env.get("proxies") or [SUBJECT] + sorted(seen - {SUBJECT})
    summary = {
        "env": env,
        "proxies": sides,
        "proxy": {},
        "sale_strategy": env.get("sale_strategy", "round_robin"),
    }
    scen = {r.get("scenario") for r in runs}
    for s in STRATEGIES:
        if f"proxy/{s}" in scen:
            summary["proxy"][s] = summarize_rounds(runs, f"proxy/{s}", sides)
    if "sale/success" in scen:
        summary["sale_success"] = summarize_rounds(runs, "sale/success", sides)
    if "sale/sold_out" in scen:
        summary["sale_sold_out"] = summarize_rounds(runs, "sale/sold_out", sides)
    if any(r.get("kind") == "ab" for r in runs):
        summary["ab"] = summarize_ab(runs, sides)
    summary["https"] = {}
    for s in sorted(x for x in scen if x and x.startswith("https/")):
        summary["https"][s.split("/", 1)[1]] = summarize_rounds(runs, s, sides)
    summary["direct"] = {}
    for s in sorted(x for x in scen if x and x.startswith("direct/")):
        summary["direct"][s.split("/", 1)[1]] = summarize_single(runs, s)
    mem = [r for r in runs if r.get("kind") == "memory"]
    summary["memory"] = {r["side"]: r for r in mem}
    summary["haproxy_not_exact"] = not_exact(d)
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


def scenarios(s):
    """(label, short label, summary) of every scenario measured, in order."""
    out = []
    for st in STRATEGIES:
        if st in s["proxy"]:
            out.append((f"1. proxy only, {st}", f"proxy {st}", s["proxy"][st]))
    if "sale_success" in s:
        out.append(("2. sale, success path (200 sold)", "sale success", s["sale_success"]))
    if "sale_sold_out" in s:
        out.append(("2. sale, sold-out path (409)", "sale sold-out", s["sale_sold_out"]))
    ab = s.get("ab")
    if ab:
        total = (ab["sides"].get(SUBJECT) or {}).get("total")
        out.append((f"3. `ab -n 10000 -c 100`, sale of {total}", "ab -n 10000", ab))
    for name, d in s.get("direct", {}).items():
        out.append((f"4. direct, no proxy: {name}", f"direct {name}", d))
    for name in HTTPS_ORDER:
        if name in s.get("https", {}):
            out.append((f"5. HTTPS, {HTTPS_LABELS[name]}", f"https {name}", s["https"][name]))
    return out


# The HTTPS scenarios of compare.sh, in the order of the table.
HTTPS_ORDER = ["h1_keepalive", "h2", "new_conn"]
HTTPS_LABELS = {
    "h1_keepalive": "keep-alive, HTTP/1.1",
    "h2": "keep-alive, HTTP/2",
    "new_conn": "a new TLS connection per request",
}


def render_md(s):
    e = s["env"]
    sides = s["proxies"]
    others = [x for x in sides if x != SUBJECT]
    lines = []
    lines.append(f"Date: {e.get('date', '?')}  ")
    lines.append(f"Machine: {e.get('nproc', '?')} CPUs, {e.get('cpu', '?')}; load before: {e.get('load', '?')}  ")
    versions = [f"spike {e.get('spike_rev', '?')}", e.get("nginx", "?")]
    if e.get("haproxy"):
        versions.append(e["haproxy"])
    versions += [e.get("redis", "?"), e.get("oha", "?"), e.get("ab", "?"), e.get("rustc", "?")]
    lines.append(f"Versions: {', '.join(versions)}  ")
    rounds = e.get("rounds", e.get("pairs", "?"))
    threads = {"spike": "spike worker threads", "nginx": "Nginx workers", "haproxy": "HAProxy nbthread"}
    files = {"nginx": "nginx.conf (`spike nginx-conf`)", "haproxy": "haproxy.cfg (`spike haproxy-conf`)"}
    lines.append(
        f"Runs: {rounds} round(s) after a discarded warm-up round; each round runs "
        f"{', '.join(NAMES.get(x, x) for x in sides)} once, in an order that rotates from round to round; "
        f"{e.get('duration', '?')} each, -c {e.get('concurrency', '?')}; "
        + " = ".join(threads[x] for x in sides if x in threads)
        + f" = {e.get('workers', '?')}; "
        + "the other proxies' files as spike prints them: "
        + ", ".join(files[x] for x in sides if x in files)
        + " (copies in logs/).  "
    )
    lines.append(
        "The client (oha/ab), the proxy, the backends and Redis all share these "
        f"{e.get('nproc', '?')} CPUs: every number is a same-machine figure.  "
    )
    lines.append(
        "CPU per request: user + system time of the proxy's processes (all threads; Nginx's "
        "master and workers) during the run, from /proc/PID/stat, ÷ the requests answered; "
        "medians of the rounds. Ratios are spike ÷ the other proxy, taken within each round.  "
    )
    lines.append("")
    lines.append("| scenario | proxy | CPU µs per request | user | sys | req/s | p99 ms | runs |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, _, p in scenarios(s):
        for side, v in p["sides"].items():
            if not v.get("runs"):
                lines.append(f"| {label} | {NAMES.get(side, side)} | FAILED | | | | | 0 |")
                continue
            lines.append(
                f"| {label} | {NAMES.get(side, side)} | {fmt(v.get('cpu_us'), '.1f')} | "
                f"{fmt(v.get('user_us'), '.1f')} | {fmt(v.get('sys_us'), '.1f')} | "
                f"{fmt(v.get('rps'))} | {fmt(v.get('p99'), '.2f')} | {v['runs']} |"
            )
    lines.append("")
    if others:
        head = ["scenario"]
        for what in ("CPU", "req/s", "p99"):
            head += [f"{what} spike÷{NAMES.get(o, o)}" for o in others]
        head.append("rounds")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|" + "---:|" * (len(head) - 1))
        for label, _, p in scenarios(s):
            rat = p.get("ratios")
            if rat is None:
                continue
            cells = [label]
            for key in ("cpu", "rps", "p99"):
                vs = [rat.get(o, {}).get(key) for o in others]
                # Bold where spike is ahead: less CPU or p99, more req/s.
                ahead = (lambda v: v > 1) if key == "rps" else (lambda v: v < 1)
                cells += [
                    "—" if v is None else (f"**{v:.2f}**" if ahead(round(v, 2)) else f"{v:.2f}")
                    for v in vs
                ]
            cells.append(
                f"{p['n_rounds']}/{p['n_rounds_planned']}"
                + (f", {len(p['failed'])} FAILED run(s)" if p["failed"] else "")
            )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    notes = []
    rr = s["proxy"].get(s.get("sale_strategy", "round_robin"))
    if rr:
        split = [
            f"{fmt(r.get('user'), '.2f')}× / {fmt(r.get('sys'), '.2f')}× {NAMES.get(o, o)}'s"
            for o, r in rr["ratios"].items()
            if r.get("rounds")
        ]
        if split:
            notes.append(
                f"Proxy only, {rr['scenario'].split('/', 1)[1]}: spike's user / system time per request is "
                + "; ".join(split)
                + "."
            )
    su = s.get("sale_success")
    if su:
        notes.append(
            "Redis calls per sale (EVALSHA ÷ tickets sold, success path): "
            + ", ".join(f"{NAMES.get(x, x)} {fmt(v.get('redis_per_sale'), '.3f')}" for x, v in su["sides"].items())
            + " (the nodes make the calls; the proxy only passes them through; spike's balancer "
            "adds an Idempotency-Key to each purchase, the others do not). Redis time per sale "
            "(µs of its one thread, every command, ÷ tickets sold): "
            + ", ".join(f"{NAMES.get(x, x)} {fmt(v.get('redis_us_per_sale'), '.1f')}" for x, v in su["sides"].items())
            + "."
        )
    so = s.get("sale_sold_out")
    if so:
        notes.append(
            "Redis calls during a sold-out run: "
            + ", ".join(f"{NAMES.get(x, x)} {fmt(v.get('redis_evalsha'))}" for x, v in so["sides"].items())
            + "."
        )
    ab = s.get("ab")
    if ab:
        for side, r in ab["sides"].items():
            notes.append(
                f"ab through {NAMES.get(side, side)}: sold equals total after every run: "
                f"{'yes' if r.get('sold_equals_total') else 'NO'} (sold {r.get('sold')} of {r.get('total')}); "
                "p99 column is ab's 99% in ms."
            )
    for side, m in s.get("memory", {}).items():
        notes.append(
            f"Memory, {NAMES.get(side, side)}: {m.get('rss_kib', 0) / 1024.0:.1f} MiB resident, "
            f"{m.get('pss_kib', 0) / 1024.0:.1f} MiB proportional (shared pages counted once) "
            f"over {m.get('processes', 1)} process(es), holding {m.get('connections')} of {m.get('wanted')} "
            "idle keep-alive client connections"
            + (
                "."
                if m.get("connections", 0) >= m.get("wanted", 0)
                else f" (the proxy closed or refused the rest, {m.get('errors', 0)} error(s): "
                "not comparable with a proxy that held them all)."
            )
        )
    ne = s.get("haproxy_not_exact") or {}
    if ne:
        common = set.intersection(*(set(v) for v in ne.values()))
        for c in sorted(common):
            notes.append(f"HAProxy, every config run: {c}")
        for name, blocks in ne.items():
            for b in blocks:
                if b not in common:
                    notes.append(f"HAProxy, {name}: {b}")
    for n in notes:
        lines.append(f"- {n}")
    failed = []
    for _, short, p in scenarios(s):
        for f in p.get("failed", []):
            failed.append(f"{short}: {f}")
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


COLORS = {"spike": "#d9480f", "base": "#f59f00", "nginx": "#1c7ed6", "haproxy": "#2f9e44", "direct": "#868e96"}
PANELS = (
    ("rps", "requests/s (higher is better)"),
    ("p99", "p99 latency, ms (lower is better)"),
    ("cpu_us", "proxy CPU per request, µs (lower is better; solid: user, light: system)"),
)


def render_svg(s):
    """Three grouped bar charts (req/s, p99, CPU per request), the proxies
    side by side per scenario."""
    sides = s["proxies"]
    groups = [(short, p) for _, short, p in scenarios(s)]
    bar, gw = 40, 40 * len(sides) + 30
    W, panel_h, top, left = 60 + gw * max(len(groups), 1), 260, 50, 120
    H = top + len(PANELS) * (panel_h + 150) + 10
    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W + left}" height="{H}" '
        'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    e = s["env"]
    title = " vs ".join(NAMES.get(x, x) for x in sides)
    o.append(
        f'<text x="{left}" y="20" font-size="14" font-weight="bold">{esc(title)} — '
        f'{esc(e.get("date", ""))}, {esc(e.get("nproc", "?"))} CPUs ({esc(e.get("cpu", ""))})</text>'
    )
    o.append(
        f'<text x="{left}" y="36" fill="#555">medians of {esc(e.get("rounds", e.get("pairs", "?")))} rounds; '
        "client, proxy, backends and Redis share the same CPUs; FAILED runs excluded</text>"
    )
    for pi, (metric, title) in enumerate(PANELS):
        y0 = top + pi * (panel_h + 150)
        vals = [v.get(metric) for _, g in groups for v in g["sides"].values()]
        vals = [v for v in vals if v is not None]
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
            x = left + 20 + gi * gw
            for si, (side, sv) in enumerate(g["sides"].items()):
                bx = x + si * bar
                v = sv.get(metric)
                if v is None:
                    # CPU is not read for ab's runs nor without a proxy.
                    if metric != "cpu_us" or sv.get("runs") == 0:
                        o.append(f'<text x="{bx + 18}" y="{base - 4}" text-anchor="middle" fill="#c00">FAILED</text>')
                    continue
                h = panel_h * v / vmax
                parts = [(v, 1.0)]
                if metric == "cpu_us" and sv.get("user_us") is not None:
                    parts = [(sv["user_us"], 1.0), (sv["sys_us"], 0.45)]
                y = base
                for pv, opacity in parts:
                    ph = panel_h * pv / vmax
                    y -= ph
                    o.append(
                        f'<rect x="{bx}" y="{y:.1f}" width="36" height="{ph:.1f}" fill="{COLORS[side]}" '
                        f'fill-opacity="{opacity}"><title>{esc(name)} {side}: {pv:.2f}</title></rect>'
                    )
                t = f"{v:.0f}" if metric == "rps" else (f"{v:.1f}" if metric == "cpu_us" else f"{v:.2f}")
                o.append(f'<text x="{bx + 18}" y="{base - h - 3:.1f}" text-anchor="middle">{t}</text>')
            o.append(
                f'<text x="{x + bar}" y="{base + 14}" text-anchor="end" '
                f'transform="rotate(-25 {x + bar} {base + 14})">{esc(name)}</text>'
            )
        ly = base + 110
        for li, side in enumerate(list(sides) + ["direct"]):
            lx = left + li * 120
            label = NAMES.get(side, side)
            o.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{COLORS[side]}"/>')
            o.append(f'<text x="{lx + 14}" y="{ly}">{esc(label)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"

def main(argv):
    if len(argv) in (4, 7) and argv[1] == "check":
        cmd_check(argv[2], argv[3], argv[4:])
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
