#!/usr/bin/env python3
"""Redis time per sale of an Idempotency-Key (issue 26): `INFO
commandstats`' EVALSHA microseconds divided by the purchases (or payments)
those calls carried, for purchases with and without a key, final and with
a payment window, one purchase per call (a lone buyer) and 16 (a rush);
then a keyed replay and a payment of a keyed reservation. Each case runs
for every version of the scripts given (e.g. main's and this branch's,
`git show main:src/node/deduct.lua > /tmp/d.lua`), alternating, ROUNDS
times; the median is printed. Everything runs on the given redis-server,
under keys of its own (`spike:{kc...}`), one pipelined connection.

    key_cost.py PORT DEDUCT_A ORDERS_A [DEDUCT_B ORDERS_B ...]
"""
import hashlib
import os
import socket
import statistics
import sys
import time

N = int(os.environ.get("N", "20000"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))

port = int(sys.argv[1])
versions = [(sys.argv[i], sys.argv[i + 1]) for i in range(2, len(sys.argv), 2)]
s = socket.create_connection(("127.0.0.1", port))
f = s.makefile("rb")


def enc(args):
    args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def read():
    line = f.readline()
    t = line[:1]
    if t == b"-":
        raise RuntimeError(line)
    if t == b"$":
        n = int(line[1:])
        return f.read(n + 2)[:-2] if n >= 0 else None
    if t == b"*":
        return [read() for _ in range(max(int(line[1:]), 0))]
    return line[1:-2]


def pipeline(cmds):
    for i in range(0, len(cmds), 64):
        chunk = cmds[i:i + 64]
        s.sendall(b"".join(enc(c) for c in chunk))
        for _ in chunk:
            read()


def usec():
    s.sendall(enc(["INFO", "commandstats"]))
    for line in read().decode().split("\r\n"):
        if line.startswith("cmdstat_evalsha:"):
            d = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            return int(d["usec"])
    return 0


shas = []
for deduct, orders in versions:
    pair = []
    for path in (deduct, orders):
        body = open(path, "rb").read()
        pipeline([["SCRIPT", "LOAD", body]])
        pair.append(hashlib.sha1(body).hexdigest())
    shas.append(pair)

run = 0


def sale_keys(ev):
    return [b"spike:{%s}:%s" % (ev, k) for k in
            (b"stock", b"buyers", b"orders", b"buyer_order", b"leases", b"keys", b"due", b"events")]


def fresh(window):
    global run
    run += 1
    keys = sale_keys(b"kc%d" % run)
    pipeline([["DEL", *keys],
              ["HSET", keys[0], "total", N * 4, "limit", 1, "pay_within", window, "epoch", 1,
               "stream_max", 1000000, "stream", 0]])
    return keys


def purchases(sha, keys, batch, keyed, prefix=b"b"):
    deadline = str(int(time.time() * 1000) + 3600000)
    cmds = []
    for start in range(0, N, batch):
        a = ["EVALSHA", sha, "8", *keys, "30000"]
        for i in range(start, start + batch):
            a += ["p", "h", "n1", b"%s%d" % (prefix, i), (b"key-%d-abcdefgh" % i) if keyed else b"",
                  deadline]
        cmds.append(a)
    u0 = usec()
    pipeline(cmds)
    return (usec() - u0) / N


cases = []
for window in (0, 3600000):
    for batch in (1, 16):
        for keyed in (False, True):
            cases.append((f"buy window={'yes' if window else 'no'} batch={batch} key={'yes' if keyed else 'no'}",
                          window, batch, keyed))
results = {c[0]: [[] for _ in versions] for c in cases}
results["replay of a keyed reservation, batch=1"] = [[] for _ in versions]
results["pay a keyed reservation"] = [[] for _ in versions]
for _ in range(ROUNDS):
    for name, window, batch, keyed in cases:
        for v, (deduct, orders) in enumerate(shas):
            results[name][v].append(purchases(deduct, fresh(window), batch, keyed))
    for v, (deduct, orders) in enumerate(shas):
        keys = fresh(3600000)
        purchases(deduct, keys, 16, True)
        results["replay of a keyed reservation, batch=1"][v].append(purchases(deduct, keys, 1, True))
        cmds = [["EVALSHA", orders, "8", *keys, "pay", "1-%d" % (i + 1), "*", "ref"] for i in range(N)]
        u0 = usec()
        pipeline(cmds)
        results["pay a keyed reservation"][v].append((usec() - u0) / N)
    pipeline([["DEL", *sale_keys(b"kc%d" % r)] for r in range(1, run + 1)])

print("Redis us per purchase (EVALSHA usec / purchases; medians of %d rounds of %d):" % (ROUNDS, N))
for v, (deduct, orders) in enumerate(versions):
    print("  v%d: %s %s" % (v + 1, deduct, orders))
print("  %-42s %s" % ("case", "  ".join("%8s" % ("v%d" % (v + 1)) for v in range(len(versions)))))
for name, per in results.items():
    print("  %-42s %s" % (name, "  ".join("%8.2f" % statistics.median(r) for r in per)))
