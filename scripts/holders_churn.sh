#!/usr/bin/env bash
# Holders at scale (issue 26): what `spike up` on real Redis costs once
# HOLDERS buyers hold a reservation each, and while those reservations
# expire unpaid and resell under a flood.
#
#   scripts/holders_churn.sh [SPIKE ...]    default: target/release/spike
#
# For each binary given (e.g. main's, built into another target dir, then
# this branch's), in turn, on the same machine:
#   1. a fresh redis-server on a free port, `stock init` of a sale of HOLDERS
#      tickets, per_user_limit 1, pay_within PAY_WITHIN; `spike up` with four
#      nodes and the balancer (its edge on);
#   2. HOLDERS distinct buyers buy one ticket each, every purchase with an
#      Idempotency-Key of its own (a small Python client, 64 connections),
#      spread evenly over FILL_SECS (buyers arrive over a while, so their
#      reservations expire over as long, as in a real sale; 0: at once);
#      a few more purchases make every node and the edge read the holders;
#      then the RSS and PSS of the spike process and of redis-server;
#   3. a flood of random buyers (oha, CHURN_SECS, many more buyers than
#      tickets) while the reservations expire and resell: Redis CPU
#      (INFO cpu) per second, HSCAN / EVALSHA / XRANGE calls (INFO
#      commandstats), the nodes' full holder reads (their log), the
#      balancer's edge answers and how often it was answering (sampled).
#
# Prints one `key=value` block per binary. The machine is shared and noisy:
# compare binaries within one run, not across runs.
set -euo pipefail

HOLDERS=${HOLDERS:-50000}
PAY_WITHIN=${PAY_WITHIN:-30s}
FILL_SECS=${FILL_SECS:-20}
CHURN_SECS=${CHURN_SECS:-45}
HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || set -- "$HERE/../target/release/spike"
command -v redis-server >/dev/null || { echo "needs redis-server" >&2; exit 1; }
command -v oha >/dev/null || { echo "needs oha" >&2; exit 1; }

. "$HERE/lib/procs.sh"
mem() { # PID: "RSS_KB PSS_KB"
  awk '/^Rss:/ {r = $2} /^Pss:/ {p = $2} END {print r, p}' "/proc/$1/smaps_rollup"
}
cmdstat() { # PORT NAME: calls usec
  redis-cli -p "$1" INFO commandstats | tr -d '\r' | awk -F'[:=,]' -v n="cmdstat_$2" \
    '$1 == n {c = $3; u = $5} END {printf "%d %d\n", c, u}'
}
cpu() { # PORT: used_cpu_sys + used_cpu_user, seconds
  redis-cli -p "$1" INFO cpu | tr -d '\r' | awk -F: \
    '/^used_cpu_sys:/ {s = $2} /^used_cpu_user:/ {u = $2} END {printf "%.3f\n", s + u}'
}
edge_answering() { # ADMIN: 1 while the edge answers
  curl -s "http://127.0.0.1:$1/metrics" | awk '/^spike_balancer_edge_answering / {print $2}'
}
edge_answers() { # ADMIN: sold_out + already_bought answers so far
  curl -s "http://127.0.0.1:$1/metrics" |
    awk '/^spike_balancer_edge_answers_total/ {s += $2} END {printf "%d\n", s}'
}

# HOLDERS distinct buyers, one purchase each with its own Idempotency-Key.
fill() { # PORT
  python3 - "$1" "$HOLDERS" "$FILL_SECS" <<'EOF'
import asyncio, sys, time
port, n, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
codes = {}
start = time.monotonic()
async def worker(first, step):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    for i in range(first, n, step):
        due = start + secs * i / n
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        w.write((f"POST /buy/ticket?user=holder{i:07d} HTTP/1.1\r\nHost: x\r\n"
                 f"Idempotency-Key: key-{i:07d}-churn\r\nContent-Length: 0\r\n\r\n").encode())
        head = await r.readuntil(b"\r\n\r\n")
        code = head.split(b" ", 2)[1].decode()
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await r.readexactly(length)
        codes[code] = codes.get(code, 0) + 1
    w.close()
async def main():
    await asyncio.gather(*(worker(k, 64) for k in range(64)))
asyncio.run(main())
print(" ".join(f"{k}:{v}" for k, v in sorted(codes.items())))
EOF
}

run() { # SPIKE
  local spike=$1 d port admin rport p up redis i
  d=$WORK/$(date +%s%N)
  mkdir -p "$d"
  read -r port admin rport p1 p2 p3 p4 <<<"$(free_ports 7)"
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync no --dir "$d" >"$d/redis.log" 2>&1 &
  redis=$!
  PIDS+=("$redis")
  wait_port "$rport" "$redis"
  {
    echo "[sale]"
    echo 'event = "churn"'
    echo "total = $HOLDERS"
    echo "per_user_limit = 1"
    echo "pay_within = \"$PAY_WITHIN\""
    echo "[redis]"
    echo "url = \"redis://127.0.0.1:$rport\""
    echo "[balancer]"
    echo "listen = \"127.0.0.1:$port\""
    echo "admin = \"127.0.0.1:$admin\""
    local n=1
    for p in $p1 $p2 $p3 $p4; do
      echo "[[node]]"
      echo "name = \"n$n\""
      echo "listen = \"127.0.0.1:$p\""
      echo "weight = 1"
      n=$((n + 1))
    done
  } >"$d/config.toml"
  "$spike" stock init --trust-client-buyer-ids --config "$d/config.toml" >/dev/null
  RUST_LOG=info "$spike" up --config "$d/config.toml" >"$d/up.log" 2>&1 &
  up=$!
  PIDS+=("$up")
  wait_port "$port" "$up"
  sleep 1
  read -r rss0 pss0 <<<"$(mem "$up")"
  local t0 t1 filled
  t0=$(date +%s.%N)
  filled=$(fill "$port")
  t1=$(date +%s.%N)
  # Late buyers: every node hears sold out and reads the holders, the edge
  # takes over.
  oha -n 2000 -c 20 -m POST --no-tui --rand-regex-url \
    "http://127.0.0.1:$port/buy/ticket\?user=late[a-z0-9]{10}" >/dev/null
  for ((i = 0; i < 100; i++)); do
    [ "$(edge_answering "$admin")" = "1" ] && break
    sleep 0.1
  done
  sleep 2
  local rss1 pss1 rrss1 rpss1
  read -r rss1 pss1 <<<"$(mem "$up")"
  read -r rrss1 rpss1 <<<"$(mem "$redis")"
  local reads0 hscan0 eval0 xr0 cpu0 edge0
  reads0=$(grep -c "holders read into memory" "$d/up.log" || true)
  read -r hscan0 hscan_us0 <<<"$(cmdstat "$rport" hscan)"
  read -r eval0 eval_us0 <<<"$(cmdstat "$rport" evalsha)"
  read -r xr0 xr_us0 <<<"$(cmdstat "$rport" xrange)"
  cpu0=$(cpu "$rport")
  edge0=$(edge_answers "$admin")
  redis-cli -p "$rport" INFO commandstats | tr -d '\r' >"$d/stats0"
  oha -z "${CHURN_SECS}s" -c 50 -m POST --no-tui --output-format json --rand-regex-url \
    "http://127.0.0.1:$port/buy/ticket\?user=flood[a-z0-9]{12}" >"$d/flood.json" &
  local flood=$! on=0 samples=0 peak=0 r
  while kill -0 "$flood" 2>/dev/null; do
    samples=$((samples + 1))
    [ "$(edge_answering "$admin")" = "1" ] && on=$((on + 1))
    read -r r _ <<<"$(mem "$up")"
    [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.5
  done
  wait "$flood" || true
  local cpu1 reads1 hscan1 eval1 xr1 edge1 rss2 pss2 total
  cpu1=$(cpu "$rport")
  redis-cli -p "$rport" INFO commandstats | tr -d '\r' >"$d/stats1"
  reads1=$(grep -c "holders read into memory" "$d/up.log" || true)
  read -r hscan1 hscan_us1 <<<"$(cmdstat "$rport" hscan)"
  read -r eval1 eval_us1 <<<"$(cmdstat "$rport" evalsha)"
  read -r xr1 xr_us1 <<<"$(cmdstat "$rport" xrange)"
  edge1=$(edge_answers "$admin")
  read -r rss2 pss2 <<<"$(mem "$up")"
  total=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))["summary"]; print(round(s["requestsPerSec"]*s["total"]))' "$d/flood.json")
  local expired
  expired=$(grep -o 'expired=[0-9]*' "$d/up.log" | awk -F= '{s += $2} END {print s + 0}')
  echo "binary=$spike"
  echo "holders=$HOLDERS pay_within=$PAY_WITHIN fill_secs=$FILL_SECS churn_secs=$CHURN_SECS"
  echo "fill_answers=$filled fill_took_secs=$(echo "$t1 - $t0" | bc)"
  echo "spike_rss_kb_idle=$rss0 spike_pss_kb_idle=$pss0"
  echo "spike_rss_kb_holders=$rss1 spike_pss_kb_holders=$pss1"
  echo "holders_mb=$(echo "scale=1; ($rss1 - $rss0) / 1024" | bc) bytes_per_holder=$(((rss1 - rss0) * 1024 / HOLDERS))"
  echo "redis_rss_kb=$rrss1 redis_pss_kb=$rpss1"
  echo "churn_redis_cpu_s_per_s=$(echo "scale=3; ($cpu1 - $cpu0) / $CHURN_SECS" | bc)"
  echo "churn_hscan_calls=$((hscan1 - hscan0)) churn_hscan_ms=$(((hscan_us1 - hscan_us0) / 1000))"
  echo "churn_evalsha_calls=$((eval1 - eval0)) churn_evalsha_ms=$(((eval_us1 - eval_us0) / 1000))"
  echo "churn_xrange_calls=$((xr1 - xr0)) churn_xrange_ms=$(((xr_us1 - xr_us0) / 1000))"
  echo "churn_full_holder_reads=$((reads1 - reads0)) (node log lines; before the flood: $reads0)"
  echo "churn_expired=$expired"
  echo "churn_requests=$total churn_edge_answers=$((edge1 - edge0)) edge_answering_samples=$on/$samples"
  echo "churn_spike_rss_kb_peak=$peak spike_rss_kb_after=$rss2 spike_pss_kb_after=$pss2"
  # Every command's time and calls during the churn (those a script runs
  # are counted too), the costliest first.
  python3 - "$d/stats0" "$d/stats1" <<'EOF'
import re, sys
def read(path):
    out = {}
    for line in open(path):
        m = re.match(r"cmdstat_(\w+):calls=(\d+),usec=(\d+)", line)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out
a, b = read(sys.argv[1]), read(sys.argv[2])
rows = sorted(((b[k][1] - a.get(k, (0, 0))[1], b[k][0] - a.get(k, (0, 0))[0], k) for k in b), reverse=True)
print("churn_commands=" + " ".join(f"{k}:{us // 1000}ms/{n}" for us, n, k in rows[:10] if n))
EOF
  echo
  kill "$up" 2>/dev/null || true
  wait "$up" 2>/dev/null || true
  kill "$redis" 2>/dev/null || true
  wait "$redis" 2>/dev/null || true
}

for s in "$@"; do run "$s"; done
