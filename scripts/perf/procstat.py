"""What the perf scripts share: free loopback ports, and the CPU a process
tree has used, from /proc (in clock ticks; HZ of them a second).

    procstat.py cpu PID... prints "USER SYS HZ": the clock ticks the PIDs and
                           their descendants have spent in user and system mode

(scripts/compare.sh reads it before and after each run of a proxy.)
"""
import os
import socket
import sys

HZ = os.sysconf("SC_CLK_TCK")


def free_ports(n):
    """n distinct ports that were free a moment ago (held together while
    picked, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tree(pid):
    """pid and its descendants (Nginx's workers, say)."""
    out = [pid]
    try:
        for c in open(f"/proc/{pid}/task/{pid}/children").read().split():
            out += tree(int(c))
    except FileNotFoundError:
        pass
    return out


def cpu(pids):
    """(user, system) clock ticks used by pids; a process gone counts 0.
    /proc/PID/stat's utime and stime (fields 14 and 15) are the whole
    process's: every thread, live or finished, is in them."""
    u = s = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        u, s = u + int(f[11]), s + int(f[12])
    return u, s


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "cpu":
        sys.exit(__doc__)
    print(*cpu([p for arg in sys.argv[2:] for p in tree(int(arg))]), HZ)
