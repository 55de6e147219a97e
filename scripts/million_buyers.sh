#!/usr/bin/env bash
# A million buyers on one fleet (issue 26).
#
#   scripts/million_buyers.sh [SPIKE ...]    default: target/release/spike
#
# For each binary given (e.g. main's, then this branch's), in turn, on the
# same machine: a fresh redis-server (appendonly, fsync off) on a free
# port; a sale of TICKETS tickets, per_user_limit 1, pay_within PAY_WITHIN
# (nobody pays: every reservation runs out and its ticket sells again),
# a stream bound above everything the run appends; `spike up` with four
# nodes and the balancer (its edge on). Then BUYERS requests from distinct
# random buyers (oha, -c 64, `?user=` of 16 random characters: about
# BUYERS distinct names) through the balancer, while reservations expire
# and resell. Prints RSS and PSS of every process (spike up, redis-server)
# idle, at the flood's peak and after it; Redis's memory, CPU per second
# and busiest commands; the nodes' full and partial reads of the holders;
# one node's `GET /holders` every 0.5 s of the flood when it answers 200
# (sold out): the largest body and the median time; then `spike stock
# audit`: its time and verdict.
# The machine is shared and noisy: compare binaries within one run.
set -euo pipefail

TICKETS=${TICKETS:-100000}
BUYERS=${BUYERS:-1000000}
PAY_WITHIN=${PAY_WITHIN:-15s}
HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || set -- "$HERE/../target/release/spike"
for t in redis-server redis-cli oha curl python3; do
  command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }
done

. "$HERE/lib/procs.sh"
mem() { # PID: "RSS_KB PSS_KB"
  awk '/^Rss:/ {r = $2} /^Pss:/ {p = $2} END {print r, p}' "/proc/$1/smaps_rollup"
}
cpu() { # PORT: used_cpu_sys + used_cpu_user, seconds
  redis-cli -p "$1" INFO cpu | tr -d '\r' | awk -F: \
    '/^used_cpu_sys:/ {s = $2} /^used_cpu_user:/ {u = $2} END {printf "%.3f\n", s + u}'
}
stat_sum() { # "HOST:PORT..." FIELD: the field of /stats added up over the nodes
  local a s=0 v
  for a in $1; do
    v=$(curl -s "http://$a/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], 0))' "$2" 2>/dev/null || echo 0)
    s=$((s + v))
  done
  echo "$s"
}

run() { # SPIKE
  local spike=$1 d port admin rport redis up i
  d=$WORK/$(date +%s%N)
  mkdir -p "$d"
  read -r port admin rport p1 p2 p3 p4 i1 i2 i3 i4 <<<"$(free_ports 11)"
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync no --dir "$d" >"$d/redis.log" 2>&1 &
  redis=$!
  PIDS+=("$redis")
  wait_port "$rport" "$redis"
  {
    echo "[sale]"
    echo 'event = "million"'
    echo "total = $TICKETS"
    echo "per_user_limit = 1"
    echo "pay_within = \"$PAY_WITHIN\""
    echo "events_max = $((4 * BUYERS))"
    echo "[redis]"
    echo "url = \"redis://127.0.0.1:$rport\""
    echo "[balancer]"
    echo "listen = \"127.0.0.1:$port\""
    echo "admin = \"127.0.0.1:$admin\""
    local n=1 ip
    set -- $i1 $i2 $i3 $i4
    for p in $p1 $p2 $p3 $p4; do
      echo "[[node]]"
      echo "name = \"n$n\""
      echo "listen = \"127.0.0.1:$p\""
      echo "internal = \"127.0.0.1:$1\""
      echo "weight = 1"
      shift
      n=$((n + 1))
    done
  } >"$d/config.toml"
  local internal="127.0.0.1:$i1 127.0.0.1:$i2 127.0.0.1:$i3 127.0.0.1:$i4"
  "$spike" stock init --trust-client-buyer-ids --config "$d/config.toml" >/dev/null
  RUST_LOG=info "$spike" up --config "$d/config.toml" >"$d/up.log" 2>&1 &
  up=$!
  PIDS+=("$up")
  wait_port "$port" "$up"
  sleep 1
  local rss0 pss0 rrss0 rpss0 cpu0 t0
  read -r rss0 pss0 <<<"$(mem "$up")"
  read -r rrss0 rpss0 <<<"$(mem "$redis")"
  cpu0=$(cpu "$rport")
  redis-cli -p "$rport" CONFIG RESETSTAT >/dev/null
  t0=$(date +%s.%N)
  oha -n "$BUYERS" -c 64 -m POST --no-tui --output-format json --rand-regex-url \
    "http://127.0.0.1:$port/buy/ticket\?user=[a-z0-9]{16}" >"$d/flood.json" &
  local flood=$! peak=0 rpeak=0 r code size t hsize=0 htimes=()
  while kill -0 "$flood" 2>/dev/null; do
    read -r r _ <<<"$(mem "$up")"
    [ "$r" -gt "$peak" ] && peak=$r
    read -r r _ <<<"$(mem "$redis")"
    [ "$r" -gt "$rpeak" ] && rpeak=$r
    # One node's holders as the edge reads them, whenever it is sold out.
    read -r code size t <<<"$(curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_total}' "http://127.0.0.1:$i1/holders")"
    if [ "$code" = 200 ]; then
      [ "$size" -gt "$hsize" ] && hsize=$size
      htimes+=("$t")
    fi
    sleep 0.5
  done
  wait "$flood" || true
  local t1 cpu1 secs
  t1=$(date +%s.%N)
  cpu1=$(cpu "$rport")
  secs=$(echo "$t1 - $t0" | bc)
  redis-cli -p "$rport" INFO commandstats | tr -d '\r' >"$d/stats"
  local rss1 pss1 rrss1 rpss1
  read -r rss1 pss1 <<<"$(mem "$up")"
  read -r rrss1 rpss1 <<<"$(mem "$redis")"
  echo "binary=$spike"
  echo "tickets=$TICKETS buyers=$BUYERS pay_within=$PAY_WITHIN (nobody pays)"
  python3 - "$d/flood.json" "$secs" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
codes = s.get("statusCodeDistribution", {})
print(f"flood_secs={float(sys.argv[2]):.1f} rps={s['summary']['requestsPerSec']:.0f} "
      f"p99_ms={s['latencyPercentiles']['p99'] * 1000:.1f} codes={codes}")
PY
  echo "redis_cpu_s=$(echo "$cpu1 - $cpu0" | bc) redis_cpu_s_per_s=$(echo "scale=3; ($cpu1 - $cpu0) / $secs" | bc)"
  echo "spike_up_rss_kb idle=$rss0 peak=$peak after=$rss1 pss_after=$pss1"
  echo "redis_rss_kb idle=$rrss0 peak=$rpeak after=$rrss1 pss_after=$rpss1 used_memory=$(redis-cli -p "$rport" INFO memory | tr -d '\r' | awk -F: '/^used_memory_human:/ {print $2}')"
  echo "edge_answers=$(curl -s "http://127.0.0.1:$admin/metrics" | awk '/^spike_balancer_edge_answers_total/ {s += $2} END {printf "%d", s}')"
  echo "holder_reads=$(stat_sum "$internal" holder_reads) holder_changes=$(stat_sum "$internal" holder_changes) (4 nodes)"
  python3 - "$d/stats" <<'PY'
import re, sys
rows = []
for line in open(sys.argv[1]):
    m = re.match(r"cmdstat_(\S+?):calls=(\d+),usec=(\d+)", line)
    if m and m.group(1) not in ("config|resetstat", "info"):
        rows.append((int(m.group(3)), int(m.group(2)), m.group(1)))
rows.sort(reverse=True)
print("redis_commands=" + " ".join(f"{k}:{us // 1000}ms/{n}" for us, n, k in rows[:8]))
PY
  local hmedian
  hmedian=$(printf '%s\n' "${htimes[@]+"${htimes[@]}"}" | sort -n | awk '{a[NR] = $1} END {print (NR ? a[int((NR + 1) / 2)] : "none")}')
  echo "holders_get_while_sold_out largest_bytes=$hsize answers=${#htimes[@]} median_secs=$hmedian"
  local a b
  a=$(date +%s.%N)
  "$spike" stock audit --config "$d/config.toml" >"$d/audit.json" || true
  b=$(date +%s.%N)
  python3 - "$d/audit.json" "$(echo "$b - $a" | bc)" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))
print(f"audit_secs={float(sys.argv[2]):.2f} ok={a['ok']} buyers_checked={a['buyers_checked']} "
      f"events_checked={a['events_checked']} sold={a['sold']} orders={a['orders']} released={a['released']} "
      f"events={a['events']} problems={a['problems']}")
PY
  echo
  kill "$up" 2>/dev/null || true
  wait "$up" 2>/dev/null || true
  kill "$redis" 2>/dev/null || true
  wait "$redis" 2>/dev/null || true
}

for s in "$@"; do run "$s"; done
