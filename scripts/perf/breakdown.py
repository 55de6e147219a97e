#!/usr/bin/env python3
"""CPU per request, split by process: where a same-machine figure goes.

  scripts/perf/breakdown.py SPIKE_BINARY [ROUNDS=3] [DUR=4s]

Runs, on free loopback ports, the three setups of scripts/compare.sh through
`spike balancer`: proxy only (four `return 200` Nginx backends, 2 workers),
the sold-out sale and the success path (four `spike node` processes with
`threads = 1`, Redis, a fresh sale per run). Each round runs `oha -z DUR
-c 100` on each and prints requests/s and, per request, the user and
system CPU of each group of processes (from /proc), of oha (getrusage) and
the Redis calls per sale. On a machine whose CPUs every process shares,
these add up to (CPUs ÷ requests/s): the budget the issue's ratios are
checked against. Everything started is stopped on exit."""
import json, os, resource, signal, socket, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procstat import cpu, free_ports, tree, HZ  # noqa: E402

SPIKE = sys.argv[1]
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
DUR = sys.argv[3] if len(sys.argv) > 3 else "4s"
WORK = tempfile.mkdtemp(prefix="breakdown.")
procs = []


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def spawn(args):
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(f"{WORK}/log", "a"),
                         env={**os.environ, "RUST_LOG": "warn"})
    procs.append(p)
    return p


def ticks(group):
    return cpu([pid for p in group for pid in tree(p.pid)])


def evalsha(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def run(label, url, groups, redis_port=None):
    regex = "[" in url
    before = {g: ticks(ps) for g, ps in groups.items()}
    calls = evalsha(redis_port) if redis_port else 0
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["oha", "--no-tui", "--output-format", "json", "-z", DUR, "-c", "100"]
                         + (["--rand-regex-url"] if regex else []) + [url],
                         capture_output=True, text=True).stdout
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    j = json.loads(out)
    n = sum(j["statusCodeDistribution"].values())
    line = f"{label:9s} {j['summary']['requestsPerSec']:8.0f} req/s {dict(j['statusCodeDistribution'])} |"
    total = 0.0
    for g, ps in groups.items():
        (u, s), (bu, bs) = ticks(ps), before[g]
        us, ss = (u - bu) / HZ * 1e6 / n, (s - bs) / HZ * 1e6 / n
        total += us + ss
        line += f" {g} {us:.1f}+{ss:.1f}"
    ou, os_ = (r1.ru_utime - r0.ru_utime) * 1e6 / n, (r1.ru_stime - r0.ru_stime) * 1e6 / n
    total += ou + os_
    line += f" oha {ou:.1f}+{os_:.1f} = {total:.1f} us/req (user+sys)"
    if redis_port:
        line += f", redis calls/req {(evalsha(redis_port) - calls) / n:.3f}"
    print(line, flush=True)


try:
    bports = free_ports(4)
    with open(f"{WORK}/backends.conf", "w") as f:
        f.write("worker_processes 2; pid nginx.pid; error_log stderr warn; events { worker_connections 20480; }\n"
                "http { access_log off; keepalive_requests 1000000; client_body_temp_path cbt; proxy_temp_path pt;"
                " fastcgi_temp_path ft; uwsgi_temp_path ut; scgi_temp_path st;\n")
        for i, p in enumerate(bports):
            f.write(f'server {{ listen 127.0.0.1:{p}; location / {{ return 200 "b{i + 1}\\n"; }} }}\n')
        f.write("}\n")
    backends = spawn(["nginx", "-p", WORK, "-c", f"{WORK}/backends.conf", "-g", "daemon off;"])
    for p in bports:
        wait_port(p)
    rport, plisten, padmin = free_ports(3)
    redis = spawn(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "yes", "--dir", WORK])
    wait_port(rport)
    with open(f"{WORK}/proxy.toml", "w") as f:
        f.write(f'[balancer]\nlisten = "127.0.0.1:{plisten}"\nadmin = "127.0.0.1:{padmin}"\n')
        for p in bports:
            f.write(f'[[balancer.upstream]]\naddr = "127.0.0.1:{p}"\n')
    proxy = spawn([SPIKE, "balancer", "--config", f"{WORK}/proxy.toml"])
    wait_port(plisten)

    def sale(name, total):
        nports = free_ports(4)
        listen, admin = free_ports(2)
        path = f"{WORK}/{name}.toml"
        with open(path, "w") as f:
            f.write(f'[sale]\nevent = "{name}"\ntotal = {total}\nper_user_limit = 1\n'
                    f'[redis]\nurl = "redis://127.0.0.1:{rport}"\n'
                    f'[balancer]\nlisten = "127.0.0.1:{listen}"\nadmin = "127.0.0.1:{admin}"\n')
            for i, p in enumerate(nports):
                f.write(f'[[node]]\nname = "n{i + 1}"\nlisten = "127.0.0.1:{p}"\nthreads = 1\n')
        subprocess.run([SPIKE, "stock", "init", "--trust-client-buyer-ids", "--config", path, "--force"], check=True, capture_output=True)
        nodes = [spawn([SPIKE, "node", "--config", path, "--name", f"n{i + 1}"]) for i in range(4)]
        for p in nports:
            wait_port(p)
        return path, nodes, nports, listen

    # Sold out: each node hears it from Redis, then answers from memory.
    sold_cfg, sold_nodes, sold_ports, _ = sale("soldout", 1000)
    for p in sold_ports:
        subprocess.run(["oha", "--no-tui", "-n", "3000", "-c", "20", "--rand-regex-url",
                        f"http://127.0.0.1:{p}/buy/ticket\\?user=[a-z0-9]{{16}}"], capture_output=True)
    sold_bal = spawn([SPIKE, "balancer", "--config", sold_cfg])
    succ_cfg, succ_nodes, _, succ_listen = sale("success", 100_000_000)
    succ_bal = spawn([SPIKE, "balancer", "--config", succ_cfg])
    time.sleep(0.5)
    sold_listen = int(open(sold_cfg).read().split('[balancer]\nlisten = "127.0.0.1:')[1].split('"')[0])
    buyers = "/buy/ticket\\?user=[a-z0-9]{16}"
    for r in range(ROUNDS):
        run("proxy", f"http://127.0.0.1:{plisten}/", {"balancer": [proxy], "backends": [backends]})
        run("sold-out", f"http://127.0.0.1:{sold_listen}{buyers}", {"balancer": [sold_bal], "nodes": sold_nodes},
            rport)
        subprocess.run([SPIKE, "stock", "init", "--trust-client-buyer-ids", "--config", succ_cfg, "--force"], check=True, capture_output=True)
        run("success", f"http://127.0.0.1:{succ_listen}{buyers}",
            {"balancer": [succ_bal], "nodes": succ_nodes, "redis": [redis]}, rport)
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
