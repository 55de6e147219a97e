#!/usr/bin/env bash
# Many sales on a Redis Cluster of 1, 2 and 3 shards (issue 28): the
# fleet's sales per second, same nodes, same client, only the number of
# shards changing.
#
#   scripts/cluster_shards.sh [SPIKE]    default: target/release/spike
#
# For each shard count in SHARDS_LIST, in turn, on the same machine:
#   1. that many redis-servers (cluster mode, appendonly, fsync every
#      second), the 16384 slots split evenly between them by hand
#      (`CLUSTER ADDSLOTSRANGE`, `CLUSTER MEET`: `redis-cli --cluster
#      create` wants three masters at least, and a one-shard cluster keeps
#      the client's path the same as with three; a lone shard learns no
#      address of its own, hence `--cluster-announce-ip`);
#   2. `spike up` with SALES sales of TOTAL tickets each (train-000 ...;
#      no per-user limit, no payment window: enough tickets that none
#      sells out in the run), three nodes and the balancer, on the
#      cluster; `spike up` starts the sales (`stock init`);
#   3. WARM seconds of load, then SECS seconds measured: oha, -c CONC,
#      POST /events/train-NNN/buy with NNN at random (every sale hot);
#      the answers by status, the sales a second (200s), p99, each
#      shard's CPU (INFO cpu) a second and the sales it holds, and the CPU
#      of `spike up` (balancer and nodes) a second;
#   4. `spike stock audit --all`: how many sales audit ok.
#
# Prints one `key=value` block per shard count. The machine is shared and
# noisy: compare the shard counts within one run, not across runs.
set -euo pipefail

SALES=${SALES:-1000}
TOTAL=${TOTAL:-1000000}
SECS=${SECS:-20}
WARM=${WARM:-3}
CONC=${CONC:-64}
SHARDS_LIST=${SHARDS_LIST:-"1 2 3"}
HERE=$(cd "$(dirname "$0")" && pwd)
SPIKE=${1:-"$HERE/../target/release/spike"}
for t in redis-server redis-cli oha python3 bc; do
  command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }
done
case $SALES in 10 | 100 | 1000) ;; *) echo "SALES is 10, 100 or 1000 (train-000 ...)" >&2; exit 1 ;; esac

. "$HERE/lib/procs.sh"
proc_cpu() { # PID: user + system CPU of the process so far, seconds
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f\n", ($14 + $15) / hz}' "/proc/$1/stat"
}
cpu() { # PORT: used_cpu_sys + used_cpu_user, seconds
  redis-cli -p "$1" INFO cpu | tr -d '\r' | awk -F: \
    '/^used_cpu_sys:/ {s = $2} /^used_cpu_user:/ {u = $2} END {printf "%.3f\n", s + u}'
}

run() { # SHARDS
  local n=$1 d i ports up port admin p1 p2 p3
  d=$WORK/shards-$n
  mkdir -p "$d"
  # Each shard's port and its cluster bus's (port + 10000 by default,
  # which may be taken, or past 65535).
  local all
  read -r -a all <<<"$(free_ports $((2 * n)))"
  ports=("${all[@]:0:n}")
  local pids=()
  for ((i = 0; i < n; i++)); do
    mkdir -p "$d/r$i"
    redis-server --port "${ports[$i]}" --bind 127.0.0.1 --save "" --appendonly yes \
      --appendfsync everysec --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-announce-ip 127.0.0.1 --cluster-port "${all[$((n + i))]}" \
      --dir "$d/r$i" >"$d/r$i/log" 2>&1 &
    pids+=($!)
    PIDS+=($!)
  done
  for ((i = 0; i < n; i++)); do
    wait_port "${ports[$i]}" "${pids[$i]}" || { cat "$d/r$i/log" >&2; exit 1; }
  done
  # The slots in n even ranges, then every shard meets the first.
  for ((i = 0; i < n; i++)); do
    redis-cli -p "${ports[$i]}" CLUSTER ADDSLOTSRANGE $((16384 * i / n)) $((16384 * (i + 1) / n - 1)) >/dev/null
    [ "$i" -eq 0 ] || redis-cli -p "${ports[$i]}" CLUSTER MEET 127.0.0.1 "${ports[0]}" "${all[$n]}" >/dev/null
  done
  for ((i = 0; i < 400; i++)); do
    local ok=0 p
    for p in "${ports[@]}"; do
      redis-cli -p "$p" CLUSTER INFO | tr -d '\r' | grep -q "cluster_state:ok" && ok=$((ok + 1))
    done
    [ "$ok" -eq "$n" ] && break
    sleep 0.05
  done
  [ "$ok" -eq "$n" ] || { echo "the cluster of $n did not form" >&2; exit 1; }
  read -r port admin p1 p2 p3 <<<"$(free_ports 5)"
  local url="redis-cluster://127.0.0.1:${ports[0]}"
  for ((i = 1; i < n; i++)); do
    [ "$i" -eq 1 ] && url="$url?" || url="$url&"
    url="${url}node=127.0.0.1:${ports[$i]}"
  done
  {
    for ((i = 0; i < SALES; i++)); do
      printf '[[sale]]\nevent = "train-%03d"\ntotal = %d\nper_user_limit = 0\n\n' "$i" "$TOTAL"
    done
    printf '[redis]\nurl = "%s"\ntimeout = "2s"\n\n' "$url"
    printf '[balancer]\nlisten = "127.0.0.1:%s"\nadmin = "127.0.0.1:%s"\n' "$port" "$admin"
    local k=1 p
    for p in $p1 $p2 $p3; do
      printf '\n[[node]]\nname = "n%d"\nlisten = "127.0.0.1:%s"\n' "$k" "$p"
      k=$((k + 1))
    done
  } >"$d/config.toml"
  RUST_LOG=warn "$SPIKE" up --config "$d/config.toml" >"$d/up.log" 2>&1 &
  up=$!
  PIDS+=("$up")
  wait_port "$port" "$up"
  sleep 1
  kill -0 "$up" 2>/dev/null || { cat "$d/up.log" >&2; exit 1; }
  local regex
  case $SALES in
    10) regex='00[0-9]' ;;
    100) regex='0[0-9]{2}' ;;
    *) regex='[0-9]{3}' ;;
  esac
  local target="http://127.0.0.1:$port/events/train-$regex/buy"
  oha -z "${WARM}s" -c "$CONC" -m POST --no-tui --output-format json --rand-regex-url "$target" >/dev/null
  local c0=() c1=() t0 t1
  for p in "${ports[@]}"; do c0+=("$(cpu "$p")"); done
  local s0 s1
  s0=$(proc_cpu "$up")
  t0=$(date +%s.%N)
  oha -z "${SECS}s" -c "$CONC" -m POST --no-tui --output-format json --rand-regex-url "$target" >"$d/load.json"
  t1=$(date +%s.%N)
  for p in "${ports[@]}"; do c1+=("$(cpu "$p")"); done
  s1=$(proc_cpu "$up")
  local secs shard_cpu="" held=""
  secs=$(echo "$t1 - $t0" | bc)
  for ((i = 0; i < n; i++)); do
    shard_cpu="$shard_cpu$(echo "scale=2; (${c1[$i]} - ${c0[$i]}) / $secs" | bc),"
    held="$held$(redis-cli -p "${ports[$i]}" --scan --pattern 'spike:{train-*}:stock' | wc -l),"
  done
  echo "shards=$n sales=$SALES total_each=$TOTAL conc=$CONC secs=$SECS"
  python3 - "$d/load.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
codes = s.get("statusCodeDistribution", {})
secs = s["summary"]["total"]
p99 = s["latencyPercentiles"].get("p99") or 0
print(f"rps={s['summary']['requestsPerSec']:.0f} sales_per_s={codes.get('200', 0) / secs:.0f} "
      f"p99_ms={p99 * 1000:.1f} codes={codes} errors={s.get('errorDistribution', {})}")
PY
  echo "shard_cpu_s_per_s=${shard_cpu%,} spike_up_cpu_s_per_s=$(echo "scale=2; ($s1 - $s0) / $secs" | bc) sales_held_per_shard=${held%,}"
  local audit ok
  audit=$("$SPIKE" stock audit --all --config "$d/config.toml" 2>/dev/null || true)
  ok=$(grep -c '"ok":true' <<<"$audit" || true)
  echo "audit_ok=$ok/$SALES"
  kill "$up" 2>/dev/null || true
  wait "$up" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  echo
}

echo "binary=$SPIKE version=$("$SPIKE" --version 2>/dev/null || echo ?) $(redis-server --version | cut -d' ' -f3) oha=$(oha --version | cut -d' ' -f2)"
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for n in $SHARDS_LIST; do run "$n"; done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
