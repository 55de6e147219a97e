#!/usr/bin/env python3
"""Fills a sale on a real redis-server through its own deduct.lua: N
purchases by N distinct buyers (one ticket each), every one with an
Idempotency-Key, in batches of BATCH per EVALSHA, as a node would send
them. Prints RESP on stdout for `redis-cli --pipe`, so the data has the
real shape (orders, buyers, buyer_order, keys, due, the stream) at the
speed of Redis alone.

    fill.py EVENT N DEDUCT_LUA_PATH [BATCH] | redis-cli -p PORT --pipe
"""
import hashlib
import sys
import time


def resp(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def main():
    event, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 500
    script = open(path, "rb").read()
    sha = hashlib.sha1(script).hexdigest()
    keys = [
        f"spike:{{{event}}}:{k}"
        for k in ("stock", "buyers", "orders", "buyer_order", "leases", "keys", "due", "events")
    ]
    w = sys.stdout.buffer
    w.write(resp([b"SCRIPT", b"LOAD", script]))
    # Deadlines far ahead: the fill must never be "too late".
    deadline = str(int(time.time() * 1000) + 24 * 3600 * 1000)
    done = 0
    while done < n:
        k = min(batch, n - done)
        args = [b"EVALSHA", sha, b"8", *keys, b"30000"]
        for i in range(done, done + k):
            args += [b"p", b"fill", b"n1", b"buyer%d" % i, b"key-%d" % i, deadline]
        w.write(resp(args))
        done += k


main()
