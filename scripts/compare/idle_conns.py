#!/usr/bin/env python3
"""Memory of a balancer holding idle keep-alive clients (standard library only).

    idle_conns.py HOST PORT N PID [BATCH]

Opens N client connections to HOST:PORT, BATCH (default 100, the other
scenarios' concurrency) at a time: sends one keep-alive GET on each of a batch,
reads the batch's answers, then opens the next. Every connection has then been
through the proxy and is an idle keep-alive connection (what the figure is
about; sending all N requests at once would measure a 10,000-request burst
instead). Waits a second, then prints one JSON object with
the memory of PID and its child processes (Nginx's workers): resident set
(VmRSS, summed) and proportional set (Pss, summed, which does not count shared
pages once per worker). The connections are closed on exit.
"""

import json
import os
import resource
import socket
import sys
import time


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def kib(pid, path, key):
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    host, port, n, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, n + 256) if hard != resource.RLIM_INFINITY else n + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 100
    socks, answered, errors = [], 0, 0
    while len(socks) < n:
        group, wanted = [], min(batch, n - len(socks))
        for _ in range(wanted):
            try:
                s = socket.create_connection((host, port), timeout=10)
                s.sendall(request)
                group.append(s)
            except OSError:
                errors += 1
                break
        for s in group:
            try:
                data = s.recv(4096)
                if data.startswith(b"HTTP/1.1 200"):
                    answered += 1
            except OSError:
                errors += 1
        socks.extend(group)
        if len(group) < wanted:
            break
    time.sleep(1.0)
    # Still open on the server side? A closed one reads as EOF right away.
    held = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                continue
        except BlockingIOError:
            held += 1
            continue
        except OSError:
            continue
    pids = [pid] + children(pid)
    print(
        json.dumps(
            {
                "wanted": n,
                "connections": held,
                "answered": answered,
                "errors": errors,
                "processes": len(pids),
                "rss_kib": sum(kib(p, "status", "VmRSS") for p in pids),
                "pss_kib": sum(kib(p, "smaps_rollup", "Pss") for p in pids),
            }
        )
    )
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
