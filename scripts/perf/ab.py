#!/usr/bin/env python3
"""CPU per request, A/B: the steadiest figure on a shared machine.

  scripts/perf/ab.py proxy ROUNDS DUR name=BINARY[@ENV=VAL,...] ... [nginx] [haproxy]
  scripts/perf/ab.py node  ROUNDS DUR name=BINARY ...

proxy: each spike binary runs `spike balancer` over four static Nginx
backends (`return 200`, 2 workers); `nginx` adds the `spike nginx-conf`
proxy of the same config, `haproxy` the `spike haproxy-conf` one. node: each binary runs one sold-out `spike node`
(embedded store) and is asked `/buy/ticket?user=buyer1` (409 from memory).
Every side gets a 1 s warm-up, then ROUNDS rounds of `oha -z DUR -c $CONC`
(100), the order reversed every other round. Per run: CPU per request =
utime+stime of the server's process tree from /proc ÷ answered requests
(split into user and sys), req/s and p99; medians at the end. Loopback only.

Options (environment): CONC, OHA_ARGS (more oha options for the measured
runs, e.g. "--disable-keepalive --http-version 1.0"), STRATEGY (round_robin), PERF=name (perf record
the first round of that side into OUT/name.perf.data; PERFARGS adds
options, e.g. -g), SYSC=name[,name...] (perf stat system calls and context
switches of those sides in the first round into OUT/name.stat, and printed
per answered request), THREADS=1 (per-thread CPU ticks), OUT (default: cwd).
Build the binaries to compare from separate trees/target dirs first."""
import json, os, socket, subprocess, sys, tempfile, time, statistics, signal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procstat import HZ, cpu, free_ports, tree  # noqa: E402

mode, rounds, dur = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sides = []
for a in sys.argv[4:]:
    if a in ("nginx", "haproxy"):
        sides.append((a, None))
    else:
        n, b = a.split("=", 1)
        sides.append((n, b))
ENVS = {}
for i, (n, b) in enumerate(sides):
    if b and "@" in b:
        b, e = b.split("@", 1)
        sides[i] = (n, b)
        ENVS[n] = dict(kv.split("=", 1) for kv in e.split(","))
CONC = int(os.environ.get("CONC", "100"))
WORK = tempfile.mkdtemp(prefix="perfab.")
procs = []

def wait_port(p, proc):
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"process exited: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", p), timeout=0.2).close(); return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {p} not up")

def spawn(args, log, env=None):
    e = dict(os.environ); e.update(env or {})
    p = subprocess.Popen(args, stdout=open(f"{WORK}/{log}.log", "w"), stderr=subprocess.STDOUT, env=e)
    procs.append(p); return p

def cpu_ticks(pids):
    return sum(cpu(pids))

try:
    bports = free_ports(4)
    conf = f"{WORK}/backends.conf"
    with open(conf, "w") as f:
        f.write("worker_processes 2; pid nginx.pid; lock_file nginx.lock; error_log stderr warn;\n")
        f.write("events { worker_connections 20480; }\n")
        f.write("http { access_log off; server_tokens off; keepalive_requests 1000000; default_type text/plain;\n")
        f.write("client_body_temp_path cbt; proxy_temp_path pt; fastcgi_temp_path ft; uwsgi_temp_path ut; scgi_temp_path st;\n")
        for i, p in enumerate(bports):
            f.write(f'server {{ listen 127.0.0.1:{p}; location / {{ return 200 "b{i+1}\\n"; }} }}\n')
        f.write("}\n")
    if mode == "proxy":
        bp = spawn(["nginx", "-p", WORK, "-c", conf, "-e", "stderr", "-g", "daemon off;"], "backends")
        for p in bports: wait_port(p, bp)
    servers = {}
    for name, binary in sides:
        lp, ap = free_ports(2)
        cfg = f"{WORK}/{name}.toml"
        with open(cfg, "w") as f:
            if mode == "proxy":
                f.write(f'[balancer]\nlisten = "127.0.0.1:{lp}"\nadmin = "127.0.0.1:{ap}"\nstrategy = "{os.environ.get("STRATEGY","round_robin")}"\n')
                for i, p in enumerate(bports):
                    f.write(f'[[balancer.upstream]]\naddr = "127.0.0.1:{p}"\nweight = {i+1}\n')
            else:
                f.write(f'[sale]\nevent = "e"\ntotal = 1\nper_user_limit = 1\n[[node]]\nname = "n1"\nlisten = "127.0.0.1:{lp}"\nweight = 1\nstock = 3\n')
            f.write('[server]\ngrace_period = "1s"\n')
        if binary is None and name == "haproxy":
            d = f"{WORK}/hap-{lp}"; os.makedirs(d)
            hc = subprocess.run([sides[0][1], "haproxy-conf", "--config", cfg, "--listen", f"127.0.0.1:{lp}", "--threads", "2"], capture_output=True, text=True, check=True).stdout
            open(f"{d}/haproxy.cfg", "w").write(hc)
            p = spawn(["haproxy", "-f", f"{d}/haproxy.cfg", "-db"], name)
        elif binary is None:
            d = f"{WORK}/ngx-{lp}"; os.makedirs(d)
            nc = subprocess.run([sides[0][1], "nginx-conf", "--config", cfg, "--listen", f"127.0.0.1:{lp}", "--workers", "2"], capture_output=True, text=True, check=True).stdout
            open(f"{d}/nginx.conf", "w").write(nc)
            p = spawn(["nginx", "-p", d, "-c", f"{d}/nginx.conf", "-e", "stderr", "-g", "daemon off;"], name)
        elif mode == "proxy":
            p = spawn([binary, "balancer", "--config", cfg], name, {"RUST_LOG": "warn", **ENVS.get(name, {})})
        else:
            p = spawn([binary, "node", "--config", cfg, "--name", "n1"], name, {"RUST_LOG": "warn", **ENVS.get(name, {})})
        wait_port(lp, p)
        if mode == "node":
            for u in ("a", "b", "c"):
                subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{lp}/buy/ticket?user={u}"])
            r = subprocess.run(["curl", "-s", f"http://127.0.0.1:{lp}/buy/ticket?user=zz"], capture_output=True, text=True).stdout
            assert "sold_out" in r, r
        servers[name] = (p, lp)
    path = "/" if mode == "proxy" else "/buy/ticket?user=buyer1"
    res = {n: [] for n, _ in sides}
    # warm-up
    for n, _ in sides:
        subprocess.run(["oha", "-z", "1s", "-c", str(CONC), "--no-tui", "--output-format", "json", f"http://127.0.0.1:{servers[n][1]}{path}"], capture_output=True)
    for r in range(rounds):
        order = sides if r % 2 == 0 else list(reversed(sides))
        for n, _ in order:
            p, lp = servers[n]
            pids = tree(p.pid)
            c0 = cpu_ticks(pids); u0, s0 = cpu(pids)
            perf = None
            if os.environ.get("PERF") == n and r == 0:
                perf = subprocess.Popen(["perf", "record", "-F", "2000"] + os.environ.get("PERFARGS", "").split() + ["-o", os.path.join(os.environ.get("OUT", "."), f"{n}.perf.data"), "-p", ",".join(map(str, pids))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3)
            sysc = None
            if n in os.environ.get("SYSC", "").split(",") and r == 0:
                sysc = os.path.join(os.environ.get("OUT", "."), f"{n}.stat")
                perf = subprocess.Popen(["perf", "stat", "-e", "raw_syscalls:sys_enter,context-switches,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_futex", "-o", sysc, "-p", ",".join(map(str, pids))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3)
            out = subprocess.run(["oha", "-z", dur, "-c", str(CONC), "--no-tui", "--output-format", "json"] + os.environ.get("OHA_ARGS", "").split() + [f"http://127.0.0.1:{lp}{path}"], capture_output=True, text=True).stdout
            c1 = cpu_ticks(pids); u1, s1 = cpu(pids)
            if os.environ.get("THREADS"):
                th = []
                for t in sorted(os.listdir(f"/proc/{p.pid}/task")):
                    f = open(f"/proc/{p.pid}/task/{t}/stat").read()
                    nm = f[f.index("(")+1:f.rindex(")")]
                    x = f.rsplit(")", 1)[1].split()
                    th.append(f"{nm}:{int(x[11])+int(x[12])}")
                print("   threads", " ".join(th))
            if perf:
                perf.send_signal(signal.SIGINT); perf.wait()
            j = json.loads(out)
            st = j["statusCodeDistribution"]
            ok = sum(v for k, v in st.items())
            rps = j["summary"]["requestsPerSec"]
            p99 = j["latencyPercentiles"]["p99"] * 1000
            us = (c1 - c0) / HZ * 1e6 / ok if ok else float("nan")
            res[n].append((us, rps, p99))
            print(f"round {r} {n:12s} cpu {us:6.2f} us/req  {rps:9.0f} req/s  p99 {p99:6.2f} ms  user {(u1-u0)/HZ*1e6/ok:5.2f} sys {(s1-s0)/HZ*1e6/ok:5.2f} codes {st}", flush=True)
            if sysc and ok:
                counts = {}
                for line in open(sysc):
                    f = line.split()
                    if len(f) >= 2 and f[0].replace(",", "").isdigit():
                        counts[f[1].replace("syscalls:sys_enter_", "").replace("raw_syscalls:sys_enter", "all")] = int(f[0].replace(",", ""))
                print("   per request: " + "  ".join(f"{k} {v / ok:.2f}" for k, v in counts.items() if v), flush=True)
    print("--- medians over", rounds, "rounds")
    for n, _ in sides:
        xs = res[n]
        print(f"{n:12s} cpu {statistics.median(x[0] for x in xs):6.2f} us/req  {statistics.median(x[1] for x in xs):9.0f} req/s  p99 {statistics.median(x[2] for x in xs):6.2f} ms")
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try: p.wait(5)
        except subprocess.TimeoutExpired: p.kill()
