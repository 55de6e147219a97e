#!/usr/bin/env bash
# `spike stock audit` at a million orders (issue 26).
#
#   scripts/audit_million.sh [SPIKE ...]    default: target/release/spike
#
# One redis-server on a free port (no persistence: a throwaway), one sale of
# ORDERS tickets, per_user_limit 1, pay_within 1h, a stream bound above
# ORDERS: ORDERS distinct buyers buy a ticket each with an Idempotency-Key,
# through the sale's own deduct.lua in batches of 500 (scripts/scale/fill.py
# piped into redis-cli --pipe), so orders, buyers, keys, deadlines and the
# stream have the real shape. Then, on that same data, for each binary given
# (e.g. main's, built into another target dir, then this branch's):
#   - the quiet sale: `stock audit` REPEAT times (wall time, median), its
#     verdict and whether the buyers and the stream were checked, and
#     Redis's CPU and `EVALSHA` / `XRANGE` / `HSCAN` calls during them;
#   - then, after every binary's quiet runs, the moving sale (MOVING=1, the
#     default): `stock audit` once while another MOVING_ORDERS purchases
#     arrive in batches of 50: its time and what it could check.
# Prints one `key=value` block per binary. The machine is shared and noisy:
# compare binaries within one run, not across runs.
set -euo pipefail

ORDERS=${ORDERS:-1000000}
REPEAT=${REPEAT:-3}
MOVING=${MOVING:-1}
MOVING_ORDERS=${MOVING_ORDERS:-400000}
HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || set -- "$HERE/../target/release/spike"
command -v redis-server >/dev/null || { echo "needs redis-server" >&2; exit 1; }

. "$HERE/lib/procs.sh"

port=$(free_ports 1)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=("$!")
for ((i = 0; i < 200; i++)); do redis-cli -p "$port" PING >/dev/null 2>&1 && break; sleep 0.05; done
cpu() {
  redis-cli -p "$port" INFO cpu | tr -d '\r' | awk -F: \
    '/^used_cpu_sys:/ {s = $2} /^used_cpu_user:/ {u = $2} END {printf "%.3f\n", s + u}'
}
calls() { # NAME
  redis-cli -p "$port" INFO commandstats | tr -d '\r' | awk -F'[:=,]' -v n="cmdstat_$1" \
    '$1 == n {c = $3} END {printf "%d\n", c}'
}
cat >"$WORK/config.toml" <<TOML
[sale]
event = "million"
total = $((ORDERS + MOVING_ORDERS * $#))
per_user_limit = 1
pay_within = "1h"
events_max = $((2 * (ORDERS + MOVING_ORDERS * $#)))
[redis]
url = "redis://127.0.0.1:$port"
timeout = "5s"
[[node]]
name = "n1"
listen = "127.0.0.1:1"
TOML
"$1" stock init --allow-volatile --trust-client-buyer-ids --config "$WORK/config.toml" >/dev/null 2>&1
t0=$(date +%s.%N)
python3 "$HERE/scale/fill.py" million "$ORDERS" "$HERE/../src/node/deduct.lua" |
  redis-cli -p "$port" --pipe >"$WORK/fill.log"
t1=$(date +%s.%N)
echo "orders=$(redis-cli -p "$port" HLEN 'spike:{million}:orders') stream=$(redis-cli -p "$port" XLEN 'spike:{million}:events') fill_s=$(echo "$t1 - $t0" | bc) redis_used_memory=$(redis-cli -p "$port" INFO memory | tr -d '\r' | awk -F: '/^used_memory_human:/ {print $2}')"
echo "machine: $(nproc) cores, $(uname -r), $(redis-server --version | awk '{print $3}')"

filled=$ORDERS
for spike in "$@"; do
  echo "binary=$spike"
  times=()
  c0=$(cpu); e0=$(calls evalsha); x0=$(calls xrange); h0=$(calls hscan)
  for ((r = 0; r < REPEAT; r++)); do
    a=$(date +%s.%N)
    "$spike" stock audit --config "$WORK/config.toml" >"$WORK/audit.json" || true
    b=$(date +%s.%N)
    times+=("$(echo "$b - $a" | bc)")
  done
  c1=$(cpu); e1=$(calls evalsha); x1=$(calls xrange); h1=$(calls hscan)
  median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}')
  python3 - "$WORK/audit.json" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))
print(f"quiet: ok={a['ok']} buyers_checked={a['buyers_checked']} events_checked={a['events_checked']} "
      f"sold={a['sold']} events={a['events']} problems={a['problems']}")
PY
  echo "quiet_audit_s=${times[*]} median=$median redis_cpu_per_audit_s=$(echo "scale=3; ($c1 - $c0) / $REPEAT" | bc) evalsha_per_audit=$(((e1 - e0) / REPEAT)) xrange_per_audit=$(((x1 - x0) / REPEAT)) hscan_per_audit=$(((h1 - h0) / REPEAT))"
done
[ "$MOVING" = 1 ] || exit 0
for spike in "$@"; do
  echo "binary=$spike"
  {
    # More buyers arrive while the audit runs: new names past the filled ones.
    python3 - "$filled" "$MOVING_ORDERS" "$HERE/../src/node/deduct.lua" <<'PY' | redis-cli -p "$port" --pipe >"$WORK/moving.log" &
import hashlib, sys, time
first, n, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
script = open(path, "rb").read()
sha = hashlib.sha1(script).hexdigest().encode()
keys = [b"spike:{million}:%s" % k for k in (b"stock", b"buyers", b"orders", b"buyer_order", b"leases", b"keys", b"due", b"events")]
def resp(args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
deadline = str(int(time.time() * 1000) + 86400000).encode()
out = sys.stdout.buffer
for start in range(first, first + n, 50):
    args = [b"EVALSHA", sha, b"8", *keys, b"30000"]
    for i in range(start, min(start + 50, first + n)):
        args += [b"p", b"fill", b"n1", b"mover%d" % i, b"mkey-%d" % i, deadline]
    out.write(resp(args))
    out.flush()
    time.sleep(0.002)
PY
    mover=$!
    sleep 1
    a=$(date +%s.%N)
    "$spike" stock audit --config "$WORK/config.toml" >"$WORK/audit.json" || true
    b=$(date +%s.%N)
    python3 - "$WORK/audit.json" "$(echo "$b - $a" | bc)" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))
print(f"moving: audit_s={sys.argv[2]} ok={a['ok']} buyers_checked={a['buyers_checked']} "
      f"events_checked={a['events_checked']} sold={a['sold']} events={a['events']} problems={a['problems']}")
PY
    wait "$mover" || true
    filled=$((filled + MOVING_ORDERS))
  }
done
