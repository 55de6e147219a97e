#!/usr/bin/env bash
# scripts/compare.sh: spike vs Nginx vs HAProxy on this machine, as the
# README's "Benchmark" section describes.
#
#   scripts/compare.sh            # full run, ~13 minutes on 2 cores
#   QUICK=1 scripts/compare.sh    # smoke run: 1 round of 1-second runs, ~3 minutes
#
# (The first run also builds spike in release and installs what is missing.)
#
# Builds spike in release, installs what is missing (oha with cargo; nginx,
# haproxy, redis-server, redis-cli, ab with apt-get), starts everything on free
# loopback ports, runs the proxies in turns (a discarded warm-up round, then
# ROUNDS rounds; each round runs every proxy once, the order rotating from
# round to round), reads each proxy's CPU time from /proc before and after
# each of its runs, checks every answer, and writes raw oha JSON, runs.jsonl,
# summary.{json,md} and chart.svg under results/<date>/. Prints the table.
# Everything it starts is stopped on exit, error or Ctrl-C.
#
# Knobs (environment): QUICK=1, ROUNDS (3; PAIRS is its old name), DUR (oha
# -z, 5s), CONC (100), IDLE_CONNS (10000), WORKERS (nginx workers and HAProxy
# threads; default nproc = spike's worker threads), PROXIES (default "spike
# nginx haproxy"; spike is always one), SCENARIOS (default "proxy https
# success soldout ab memory payments tokens waiting accesslog sales"), SALES_MANY
# (10000, the sales scenario's big file), STRATEGIES (default "round_robin
# weighted_round_robin ip_hash least_conn", for the proxy-only scenario),
# PAY_TOTAL (2000), BASE_SPIKE (another spike binary, e.g. main's before a
# change: run as one more proxy, "base", with the same config on its own
# ports, so that a change is measured before and after in one run),
# SPIKE_BIN (a spike binary to measure instead of building this tree's,
# e.g. a copy of an earlier build), HTTPS_FAST_PATH (true; false serves spike's HTTPS
# HTTP/1.1 with hyper's server, as before its own path took it).
#
# The client (oha/ab), the proxy under test, the backends and Redis all share
# this machine's CPUs; the numbers compare the proxies under the same
# squeeze, they are not what any of them does on dedicated hardware.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE=$ROOT/scripts/compare
cd "$ROOT"

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  ROUNDS=${ROUNDS:-${PAIRS:-1}}
  DUR=${DUR:-1s}
  IDLE_CONNS=${IDLE_CONNS:-1000}
else
  ROUNDS=${ROUNDS:-${PAIRS:-3}}
  DUR=${DUR:-5s}
  IDLE_CONNS=${IDLE_CONNS:-10000}
fi
CONC=${CONC:-100}
AB_N=10000 # the article's command: ab -n 10000 -c 100
AB_TOTAL=5000
SCENARIOS=${SCENARIOS:-proxy https success soldout ab memory payments tokens waiting accesslog sales}
SALES_MANY=${SALES_MANY:-10000}
PAY_TOTAL=${PAY_TOTAL:-2000} # tickets of the sale with payments
read -r -a SIDES <<<"${PROXIES:-spike nginx haproxy}"
BASE_SPIKE=${BASE_SPIKE:-}
if [ -n "$BASE_SPIKE" ]; then
  [ -x "$BASE_SPIKE" ] || { printf 'compare.sh: BASE_SPIKE=%s is not an executable\n' "$BASE_SPIKE" >&2; exit 1; }
  SIDES+=(base)
fi
read -r -a STRATEGIES <<<"${STRATEGIES:-round_robin weighted_round_robin ip_hash least_conn}"
SALE_STRATEGY=round_robin

say() { printf '%s\n' "$*" >&2; }
die() {
  say "compare.sh: $*"
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
wants() { [[ " $SCENARIOS " == *" $1 "* ]]; }
runs() { [[ " ${SIDES[*]} " == *" $1 "* ]]; }

for side in "${SIDES[@]}"; do
  case $side in spike | nginx | haproxy | base) ;; *) die "PROXIES: unknown proxy '$side' (spike, nginx, haproxy)" ;; esac
done
runs spike || die "PROXIES must include spike, the proxy the others are compared with"

# ---------------------------------------------------------------------------
# Tools.
# ---------------------------------------------------------------------------
export PATH="$PATH:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"

missing=()
have nginx || missing+=(nginx)
if runs haproxy && ! have haproxy; then missing+=(haproxy); fi
have redis-server || missing+=(redis-server)
have redis-cli || missing+=(redis-tools)
have ab || missing+=(apache2-utils)
have python3 || missing+=(python3)
have openssl || missing+=(openssl)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "compare.sh: installing ${missing[*]} with apt-get"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi
for tool in nginx redis-server redis-cli ab python3 openssl; do
  have "$tool" || die "$tool is still missing after apt-get"
done
if runs haproxy; then
  have haproxy || die "haproxy is still missing after apt-get (or leave it out: PROXIES=\"spike nginx\")"
fi
if ! have oha; then
  # oha: the HTTP load generator used here (JSON output, random URLs
  # from a regex for distinct buyers). Not packaged by Debian; built by cargo.
  if ! cargo install --list | grep -q '^oha v'; then
    say "compare.sh: installing oha with cargo install oha --locked"
    cargo install oha --locked
  fi
  have oha || die "oha is installed but not on PATH (looked in ${CARGO_HOME:-$HOME/.cargo}/bin)"
fi
oha --help | grep -q -- '--output-format' || die "this oha has no --output-format; cargo install oha --locked --force"
OHA_WAIT=()
oha --help | grep -q -- '--wait-ongoing-requests-after-deadline' && OHA_WAIT=(--wait-ongoing-requests-after-deadline)

if [ -n "${SPIKE_BIN:-}" ]; then
  SPIKE=$SPIKE_BIN
else
  say "compare.sh: building spike (release)"
  cargo build --release --bin spike >&2
  SPIKE=${CARGO_TARGET_DIR:-$ROOT/target}/release/spike
fi
[ -x "$SPIKE" ] || die "no binary at $SPIKE"
"$SPIKE" balancer --help >/dev/null 2>&1 || die "this spike has no balancer command yet"
if runs haproxy; then
  "$SPIKE" haproxy-conf --help >/dev/null 2>&1 || die "this spike has no haproxy-conf command yet"
fi

NPROC=$(nproc)
WORKERS=${WORKERS:-$NPROC}
# The idle-connection measurement needs ~2 descriptors per client.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---------------------------------------------------------------------------
# Output and process bookkeeping.
# ---------------------------------------------------------------------------
STAMP=$(date +%Y-%m-%d_%H%M%S)
OUT=$ROOT/results/$STAMP
mkdir -p "$OUT/raw" "$OUT/logs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spike-compare.XXXXXX")
RUNS=$OUT/runs.jsonl
: >"$RUNS"

PIDS=()
LAST_PID=
spawn() { # LOGNAME CMD...: start in the background, remember its pid
  local log=$OUT/logs/$1.log
  shift
  "$@" >>"$log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
stop() { # PID...: TERM, then KILL after 5 s
  local pid i
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "$@"; do
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    PIDS=("${keep[@]+"${keep[@]}"}")
  done
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ "${#PIDS[@]}" -gt 0 ] && stop "${PIDS[@]}"
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'say "compare.sh: interrupted"; exit 130' INT
trap 'exit 143' TERM

free_ports() { # N: N distinct free loopback ports (held until all are chosen)
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
wait_port() { # PORT PID LOGNAME: until PORT accepts, or die if PID exited
  local i
  for ((i = 0; i < 200; i++)); do
    kill -0 "$2" 2>/dev/null || die "$3 exited; see $OUT/logs/$3.log: $(tail -3 "$OUT/logs/$3.log")"
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  die "$3 is not listening on 127.0.0.1:$1 after 10 s"
}
record() { python3 "$HERE/report.py" record "$RUNS" "$@"; }

# ---------------------------------------------------------------------------
# The pieces.
# ---------------------------------------------------------------------------

# Four static backends: one Nginx process (as many workers as the proxy under
# test) with four server blocks, each answering `return 200` from memory. The
# same backends serve spike and Nginx, so their cost is the same for both.
start_backends() {
  local d=$WORK/backends i
  read -r -a BACKEND_PORTS <<<"$(free_ports 4)"
  mkdir -p "$d"
  {
    echo "worker_processes $WORKERS; pid nginx.pid; lock_file nginx.lock; error_log stderr warn;"
    echo "events { worker_connections 20480; }"
    echo "http { access_log off; server_tokens off; keepalive_requests 1000000; default_type text/plain;"
    echo "  client_body_temp_path cbt; proxy_temp_path pt; fastcgi_temp_path ft; uwsgi_temp_path ut; scgi_temp_path st;"
    for i in 0 1 2 3; do
      # shellcheck disable=SC2028 # the \n is for Nginx's string, not for echo
      echo "  server { listen 127.0.0.1:${BACKEND_PORTS[$i]}; location / { return 200 \"b$((i + 1))\n\"; } }"
    done
    echo "}"
  } >"$d/nginx.conf"
  spawn backends nginx -p "$d" -c "$d/nginx.conf" -e stderr -g 'daemon off;'
  BACKENDS_PID=$LAST_PID
  for i in 0 1 2 3; do wait_port "${BACKEND_PORTS[$i]}" "$BACKENDS_PID" backends; done
}

start_redis() {
  read -r REDIS_PORT <<<"$(free_ports 1)"
  mkdir -p "$WORK/redis"
  spawn redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly yes --dir "$WORK/redis"
  REDIS_PID=$LAST_PID
  wait_port "$REDIS_PORT" "$REDIS_PID" redis
}
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
# Empties Redis for a fresh sale and rewrites its append-only file while it
# is empty. A rewrite forks Redis and dumps the whole dataset; left to
# Redis's own trigger (the file doubled since the last rewrite), when it
# comes depends on every run before, so it landed in one proxy's run and
# not the other's at random and moved a round by 10%. From an empty file
# every run meets the same trigger after the same sales.
flush_store() {
  rcli FLUSHALL >/dev/null
  aof_settled
  rcli BGREWRITEAOF >/dev/null
  aof_settled
}
aof_rewrites() { # AOF rewrites Redis has made since the last CONFIG RESETSTAT
  rcli INFO persistence | tr -d '\r' | awk -F: '/^aof_rewrites:/ { print $2 }'
}
aof_settled() { # waits until no AOF rewrite runs or is scheduled
  local until=$((SECONDS + 30))
  while ((SECONDS < until)); do
    rcli INFO persistence | tr -d '\r' |
      awk -F: '/^aof_rewrite_(in_progress|scheduled):/ { n += $2 } END { exit n > 0 }' && return 0
    sleep 0.05
  done
  die "Redis's AOF rewrite did not end in 30 s"
}
# "EVALSHA ALL USEC" since the last CONFIG RESETSTAT: EVALSHA calls, all
# calls, and the microseconds Redis's one thread spent in them (ALL and
# USEC exclude INFO/CONFIG, which are this script's own).
redis_calls() {
  rcli INFO commandstats | tr -d '\r' | awk -F'[:=,]' '
    /^cmdstat_/ { n = $0; sub(/^cmdstat_/, "", n); sub(/:.*/, "", n)
                  if (n == "evalsha") e = $3
                  if (n != "info" && n != "config") { a += $3; u += $5 } }
    END { printf "%d %d %d\n", e, a, u }'
}
stock_field() { # CONFIG FIELD: one field of `spike stock show`
  "$SPIKE" stock show --config "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$2"
}

# A proxy-only spike config: [balancer] over the four static backends.
write_proxy_config() { # FILE STRATEGY LISTEN ADMIN
  {
    echo "[balancer]"
    echo "listen = \"127.0.0.1:$3\""
    echo "admin = \"127.0.0.1:$4\""
    echo "strategy = \"$2\""
    local i
    for i in 0 1 2 3; do
      echo "[[balancer.upstream]]"
      echo "addr = \"127.0.0.1:${BACKEND_PORTS[$i]}\""
      # weighted_round_robin needs unequal weights to be itself; the others
      # ignore them (round_robin) or use them equally in both proxies.
      echo "weight = $((i + 1))"
    done
    echo "[server]"
    echo "grace_period = \"1s\""
    # As Nginx's worker_connections (20480, past the open-files limit):
    # spike's own default, sized from that limit at two descriptors a
    # client, held 9,968 of the memory scenario's 10,000 idle clients.
    echo "max_connections = 20000"
  } >"$1"
}

# A sale config: four nodes (weight 1) on NODE_PORTS, Redis, a balancer.
# Each node leases its stock from Redis as it sells. Each node runs one
# runtime thread: four node processes share these few CPUs with everything
# else, and a second thread per node only adds wake-ups between threads
# (measured: node CPU per sale 20.8 -> 18 us). Both proxies use the same nodes.
write_sale_config() { # FILE EVENT TOTAL PER_USER LISTEN ADMIN
  {
    echo "[sale]"
    echo "event = \"$2\""
    echo "total = $3"
    echo "per_user_limit = $4"
    write_fleet "$5" "$6"
  } >"$1"
}

# What every sale file has after its sales: Redis, the balancer on LISTEN
# and ADMIN, the four nodes on NODE_PORTS.
write_fleet() { # LISTEN ADMIN
  echo "[redis]"
  echo "url = \"redis://127.0.0.1:$REDIS_PORT\""
  echo "[balancer]"
  echo "listen = \"127.0.0.1:$1\""
  echo "admin = \"127.0.0.1:$2\""
  echo "strategy = \"$SALE_STRATEGY\""
  local i
  for i in 0 1 2 3; do
    echo "[[node]]"
    echo "name = \"n$((i + 1))\""
    echo "listen = \"127.0.0.1:${NODE_PORTS[$i]}\""
    echo "weight = 1"
    echo "threads = 1"
  done
  echo "[server]"
  echo "grace_period = \"1s\""
}

start_nodes() { # CONFIG
  local i
  NODE_PIDS=()
  for i in 1 2 3 4; do
    spawn "node-n$i" env RUST_LOG=warn "$SPIKE" node --config "$1" --name "n$i"
    NODE_PIDS+=("$LAST_PID")
  done
  for i in 0 1 2 3; do wait_port "${NODE_PORTS[$i]}" "${NODE_PIDS[$i]}" "node-n$((i + 1))"; done
}

# The proxies under test, all started from the same config file: spike
# itself, and the nginx.conf and haproxy.cfg that spike prints for its
# [balancer], used as printed (the generators' --listen puts them on their own
# port; --workers/--threads = WORKERS). Each proxy's port and pid are in
# PORT[side] and PID[side].
declare -A PORT PID
pick_ports() { # sets PORT[side] for every proxy, and ADMIN (spike's admin port)
  local ports side i=0
  read -r -a ports <<<"$(free_ports $((${#SIDES[@]} + 2)))"
  for side in "${SIDES[@]}"; do
    PORT[$side]=${ports[$i]}
    i=$((i + 1))
  done
  ADMIN=${ports[$i]}
  BASE_ADMIN=${ports[$((i + 1))]}
}
start_proxy() { # SIDE CONFIG
  local side=$1 cfg=$2 port=${PORT[$1]} d=$WORK/$1-${PORT[$1]} log
  mkdir -p "$d"
  case $side in
    spike)
      log=spike-balancer
      spawn $log env RUST_LOG=warn "$SPIKE" balancer --config "$cfg"
      ;;
    base)
      # The same file on the base's own listen and admin ports.
      log=base-balancer
      sed -e "s/^listen = \"127.0.0.1:${PORT[spike]}\"/listen = \"127.0.0.1:$port\"/" \
        -e "s/^admin = \"127.0.0.1:$ADMIN\"/admin = \"127.0.0.1:$BASE_ADMIN\"/" "$cfg" >"$d/base.toml"
      spawn $log env RUST_LOG=warn "$BASE_SPIKE" balancer --config "$d/base.toml"
      ;;
    nginx)
      log=nginx-proxy
      "$SPIKE" nginx-conf --config "$cfg" --listen "127.0.0.1:$port" --workers "$WORKERS" >"$d/nginx.conf"
      cp "$d/nginx.conf" "$OUT/logs/nginx-$(basename "$cfg" .toml).conf"
      spawn $log nginx -p "$d" -c "$d/nginx.conf" -e stderr -g 'daemon off;'
      ;;
    haproxy)
      log=haproxy-proxy
      "$SPIKE" haproxy-conf --config "$cfg" --listen "127.0.0.1:$port" --threads "$WORKERS" >"$d/haproxy.cfg"
      cp "$d/haproxy.cfg" "$OUT/logs/haproxy-$(basename "$cfg" .toml).cfg"
      haproxy -c -q -f "$d/haproxy.cfg" >>"$OUT/logs/$log.log" 2>&1 ||
        die "haproxy -c refuses the haproxy.cfg of $cfg; see $OUT/logs/$log.log"
      # -db: in the foreground, one process (its threads), no master.
      spawn $log haproxy -f "$d/haproxy.cfg" -db
      ;;
  esac
  PID[$side]=$LAST_PID
  wait_port "$port" "$LAST_PID" "$log"
}
start_proxies() { # CONFIG
  local side
  for side in "${SIDES[@]}"; do start_proxy "$side" "$1"; done
}
stop_proxies() {
  local side pids=()
  for side in "${SIDES[@]}"; do pids+=("${PID[$side]}"); done
  stop "${pids[@]}"
}
# The proxies in round R's order: rotated by one every round, so that no
# proxy always runs first (or right after the same one).
in_turn() { # R
  local i n=${#SIDES[@]}
  for ((i = 0; i < n; i++)); do printf '%s\n' "${SIDES[$(((i + $1) % n))]}"; done
}

# The nodes' sold-out answers so far (their /stats), added up: how much of a
# sold-out flood reached them.
node_sold_out_answers() {
  python3 - "${NODE_PORTS[@]}" <<'EOF'
import json, sys, urllib.request
n = 0
for port in sys.argv[1:]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        n += json.load(r)["sold_out_answers"]
print(n)
EOF
}

cpu_ticks() { python3 "$ROOT/scripts/perf/procstat.py" cpu "$@"; } # PID... -> "USER SYS HZ"

# One oha run, checked and recorded. PID is the proxy's (its CPU, and its
# workers', is read from /proc right before and right after the run), or ""
# when no proxy is in the path. With SALE_CFG set, also Redis's call counters
# (reset before the run) and the tickets sold in the run, of that sale. With
# CROWD_SEND set (token or query), the client is examples/crowd.rs instead of
# oha, every request the next buyer of CROWD_BUYERS, and the nodes' CPU is
# recorded too.
oha_run() { # SCENARIO SIDE ROUND EXPECT PID URL [oha args...]
  local scen=$1 side=$2 round=$3 expect=$4 pid=$5 url=$6
  shift 6
  local file=raw/${scen//\//_}-$side-$round.json rec=() extra="" cpu=()
  local before sold evalsha all usec u0 s0 u1 s1 hz answered0 answered nu0 ns0 nu1 ns1 rw0
  if [ -n "${SALE_CFG:-}" ]; then
    before=$(stock_field "$SALE_CFG" sold)
    answered0=$(node_sold_out_answers)
    rcli CONFIG RESETSTAT >/dev/null
    rw0=$(aof_rewrites) # after the reset, which clears it
  fi
  [ -z "$pid" ] || read -r u0 s0 hz <<<"$(cpu_ticks "$pid")"
  if [ -n "${CROWD_SEND:-}" ]; then
    read -r nu0 ns0 hz <<<"$(cpu_ticks "${NODE_PIDS[@]}")"
    "$CROWD" --buyers "$CROWD_BUYERS" --send "$CROWD_SEND" -z "$DUR" -c "$CONC" "$@" "$url" \
      >"$OUT/$file" 2>"$OUT/logs/crowd.log" || true
    read -r nu1 ns1 hz <<<"$(cpu_ticks "${NODE_PIDS[@]}")"
    rec+=(node_cpu_user_ticks="$((nu1 - nu0))" node_cpu_sys_ticks="$((ns1 - ns0))")
  else
    [ -z "${NODE_CPU:-}" ] || read -r nu0 ns0 hz <<<"$(cpu_ticks "${NODE_PIDS[@]}")"
    oha --no-tui --output-format json -z "$DUR" -c "$CONC" "${OHA_WAIT[@]+"${OHA_WAIT[@]}"}" "$@" "$url" \
      >"$OUT/$file" 2>"$OUT/logs/oha.log" || true
    if [ -n "${NODE_CPU:-}" ]; then
      read -r nu1 ns1 hz <<<"$(cpu_ticks "${NODE_PIDS[@]}")"
      rec+=(node_cpu_user_ticks="$((nu1 - nu0))" node_cpu_sys_ticks="$((ns1 - ns0))")
    fi
  fi
  if [ -n "${SALE_CFG:-}" ]; then
    # Redis's counters before anything else talks to it.
    read -r evalsha all usec <<<"$(redis_calls)"
    sold=$(($(stock_field "$SALE_CFG" sold) - before))
    answered=$(($(node_sold_out_answers) - answered0))
    rw0=$(($(aof_rewrites) - rw0))
    rec+=(redis_evalsha="$evalsha" redis_all="$all" redis_usec="$usec" sold_delta="$sold" node_sold_out="$answered" aof_rewrites="$rw0")
    extra="  redis evalsha $evalsha, sold $sold, nodes' sold_out answers $answered, AOF rewrites $rw0 in the run"
  fi
  if [ -n "$pid" ]; then
    read -r u1 s1 hz <<<"$(cpu_ticks "$pid")"
    cpu=("$((u1 - u0))" "$((s1 - s0))" "$hz")
    rec+=(cpu_user_ticks="${cpu[0]}" cpu_sys_ticks="${cpu[1]}" hz="$hz")
  fi
  local label=round$round
  [ "$round" = 0 ] && label=warm-up
  printf '  %-26s %-7s %-8s %s%s\n' "$scen" "$side" "$label" \
    "$(python3 "$HERE/report.py" check "$OUT/$file" "$expect" "${cpu[@]+"${cpu[@]}"}")" "$extra" >&2
  record kind=oha scenario="$scen" side="$side" round="$round" expect="$expect" file="$file" \
    "${rec[@]+"${rec[@]}"}"
}

# ---------------------------------------------------------------------------
# The environment, for the table.
# ---------------------------------------------------------------------------
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ] && rev="$rev+uncommitted"
export C_DATE C_NPROC C_CPU C_LOAD C_REV C_NGINX C_HAPROXY C_REDIS C_OHA C_RUSTC C_AB
C_DATE=$(date '+%Y-%m-%d %H:%M:%S %Z')
C_NPROC=$NPROC
C_CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
C_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
C_REV=$rev
C_NGINX=$(nginx -v 2>&1 | sed 's/^nginx version: //')
C_HAPROXY=
if runs haproxy; then C_HAPROXY=$(haproxy -v | awk 'NR == 1 { print "haproxy " $3 }'); fi
C_REDIS=$(redis-server --version | awk '{ print "redis " $3 }' | sed 's/v=//')
C_OHA=$(oha --version | head -1)
C_RUSTC=$(rustc --version | cut -d' ' -f1-2)
C_AB=$(ab -V | awk 'NR == 1 { print "ab " $5 }')
python3 - "$OUT/env.json" "$ROUNDS" "$DUR" "$CONC" "$WORKERS" "$SALE_STRATEGY" "$QUICK" "${SIDES[*]}" <<'EOF'
import json, os, sys
e = {k[2:].lower(): v for k, v in os.environ.items() if k.startswith("C_")}
e.update(rounds=int(sys.argv[2]), duration=sys.argv[3], concurrency=int(sys.argv[4]),
         workers=int(sys.argv[5]), sale_strategy=sys.argv[6], quick=sys.argv[7] == "1",
         proxies=sys.argv[8].split(), spike_rev=e.pop("rev"))
json.dump(e, open(sys.argv[1], "w"), indent=2, sort_keys=True)
EOF
say "compare.sh: $C_DATE; $NPROC CPUs ($C_CPU); load $C_LOAD; spike $rev; $C_NGINX; ${C_HAPROXY:-no haproxy}; $C_REDIS; $C_OHA; $C_RUSTC"
say "compare.sh: results in $OUT; proxies ${SIDES[*]}; $ROUNDS round(s) of $DUR after a warm-up round, -c $CONC, nginx workers = haproxy threads = $WORKERS"
say "compare.sh: oha, the proxy, the backends and Redis share these $NPROC CPUs"

# ---------------------------------------------------------------------------
# 1. Proxy only (and 4. direct to one static backend), plus memory.
# ---------------------------------------------------------------------------
if wants proxy || wants memory; then
  start_backends
  for strategy in "${STRATEGIES[@]}"; do
    if ! wants proxy; then
      [ "$strategy" = round_robin ] || continue
    fi
    pick_ports
    cfg=$WORK/proxy-$strategy.toml
    write_proxy_config "$cfg" "$strategy" "${PORT[spike]}" "$ADMIN"
    start_proxies "$cfg"
    if wants proxy; then
      for ((round = 0; round <= ROUNDS; round++)); do
        for side in $(in_turn "$round"); do
          oha_run "proxy/$strategy" "$side" "$round" 200 "${PID[$side]}" "http://127.0.0.1:${PORT[$side]}/"
        done
        if [ "$strategy" = round_robin ]; then
          oha_run direct/static_backend direct "$round" 200 "" "http://127.0.0.1:${BACKEND_PORTS[0]}/"
        fi
      done
    fi
    if wants memory && [ "$strategy" = round_robin ]; then
      for side in "${SIDES[@]}"; do
        m=$(python3 "$HERE/idle_conns.py" 127.0.0.1 "${PORT[$side]}" "$IDLE_CONNS" "${PID[$side]}" "$CONC")
        say "  memory, $side: $m"
        # shellcheck disable=SC2046
        record kind=memory side="$side" $(python3 -c 'import json,sys; print(" ".join(f"{k}={v}" for k, v in json.loads(sys.argv[1]).items()))' "$m")
      done
    fi
    stop_proxies
  done
  stop "$BACKENDS_PID"
fi

# ---------------------------------------------------------------------------
# 5. HTTPS, proxy only (round_robin over the same backends): every proxy
# given the same ECDSA P-256 certificate, TLS 1.2 and 1.3, ALPN h2 and
# http/1.1, tickets and a session cache, as `spike nginx-conf` and `spike
# haproxy-conf` print them. Keep-alive HTTPS over HTTP/1.1, then over HTTP/2
# (-c connections, one stream each), then one new TLS connection per
# request (oha --disable-keepalive; oha's rustls client keeps the tickets
# it is given and resumes with them, so most of these handshakes are
# resumptions with a fresh key exchange, as a returning browser's are; the
# share of full handshakes per proxy is not measured).
# ---------------------------------------------------------------------------
if wants https; then
  start_backends
  tls=$WORK/tls
  mkdir -p "$tls"
  # The key beside the certificate as CERT.key: where HAProxy looks for it.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$tls/proxy.crt.key" -out "$tls/proxy.crt" -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>>"$OUT/logs/openssl.log" ||
    die "openssl could not make the certificate; see $OUT/logs/openssl.log"
  pick_ports
  cfg=$WORK/https-round_robin.toml
  write_proxy_config "$cfg" round_robin "${PORT[spike]}" "$ADMIN"
  sed -i "s|^\[balancer\]\$|[balancer]\ntls_cert = \"$tls/proxy.crt\"\ntls_key = \"$tls/proxy.crt.key\"|" "$cfg"
  # HTTPS_FAST_PATH=false: spike's TLS HTTP/1.1 connections on hyper's
  # server, as before they went to its own HTTP/1 path (a before/after in
  # one binary).
  if [ "${HTTPS_FAST_PATH:-true}" = false ]; then
    sed -i "s|^\[balancer\]\$|[balancer]\nfast_path = false|" "$cfg"
  fi
  start_proxies "$cfg"
  for ((round = 0; round <= ROUNDS; round++)); do
    for side in $(in_turn "$round"); do
      url=https://127.0.0.1:${PORT[$side]}/
      oha_run https/h1_keepalive "$side" "$round" 200 "${PID[$side]}" "$url" --insecure
      oha_run https/h2 "$side" "$round" 200 "${PID[$side]}" "$url" --insecure --http2
      oha_run https/new_conn "$side" "$round" 200 "${PID[$side]}" "$url" --insecure --disable-keepalive
    done
  done
  stop_proxies
  stop "$BACKENDS_PID"
fi

# ---------------------------------------------------------------------------
# 2. The sale through the balancer (and 4. direct to one node).
# ---------------------------------------------------------------------------
if wants success || wants soldout || wants ab || wants payments || wants tokens || wants waiting || wants sales; then
  start_redis
fi

# oha's URL regex for distinct buyers: 16 random characters per request. In
# oha's --rand-regex-url the dot is literal; `\?` is the query's `?`. Every
# regex is checked to expand to loopback before it is used.
buyers() { # PORT: sets BUYERS
  local re url
  re=$(printf 'http://127.0.0.1:%s/buy/ticket\\?user=[a-z0-9]{16}' "$1")
  url=$(oha --rand-regex-url --dump-urls 1 "$re" 2>/dev/null | head -1)
  [[ "$url" =~ ^http://127\.0\.0\.1:$1/buy/ticket\?user=[a-z0-9]{16}$ ]] ||
    die "oha expands $re to '$url', not a loopback buyer URL"
  BUYERS=$re
}

# Every proxy in turn, then one node directly, ROUNDS times after a warm-up
# round, on the sale in $cfg. FRESH=1: a fresh sale (FLUSHALL + stock init)
# before every run.
sale_rounds() { # SCENARIO DIRECT_SCENARIO EXPECT FRESH
  local round side port pid
  for ((round = 0; round <= ROUNDS; round++)); do
    for side in $(in_turn "$round") direct; do
      if [ "$side" = direct ]; then port=${NODE_PORTS[0]} pid=""; else port=${PORT[$side]} pid=${PID[$side]}; fi
      if [ "$4" = 1 ]; then
        flush_store
        "$SPIKE" stock init --trust-client-buyer-ids --config "$cfg" >/dev/null
      fi
      buyers "$port"
      if [ "$side" = direct ]; then
        SALE_CFG=$cfg oha_run "$2" direct "$round" "$3" "" "$BUYERS" --rand-regex-url
      else
        SALE_CFG=$cfg oha_run "$1" "$side" "$round" "$3" "$pid" "$BUYERS" --rand-regex-url
      fi
    done
  done
}

if wants success; then
  # More tickets than all runs together can sell; a fresh sale before every
  # run, so every run starts from the same Redis.
  read -r -a NODE_PORTS <<<"$(free_ports 4)"
  pick_ports
  cfg=$WORK/sale-success.toml
  write_sale_config "$cfg" bench-success 100000000 1 "${PORT[spike]}" "$ADMIN"
  "$SPIKE" stock init --trust-client-buyer-ids --config "$cfg" --force >/dev/null
  start_nodes "$cfg"
  start_proxies "$cfg"
  sale_rounds sale/success direct/node_success 200 1
  stop_proxies
  stop "${NODE_PIDS[@]}"
fi

if wants soldout; then
  read -r -a NODE_PORTS <<<"$(free_ports 4)"
  pick_ports
  cfg=$WORK/sale-soldout.toml
  # Each node learns "sold out" from Redis (a lease request or a purchase)
  # and from then on answers from memory: the sold-out path (no Redis call
  # but the once-a-second poll of an idle node).
  write_sale_config "$cfg" bench-soldout 1000 1 "${PORT[spike]}" "$ADMIN"
  flush_store
  "$SPIKE" stock init --trust-client-buyer-ids --config "$cfg" >/dev/null
  start_nodes "$cfg"
  # Sell everything, then keep asking every node until Redis has told each of
  # them the sale is over: from then on they answer 409 from memory.
  for i in 0 1 2 3; do
    buyers "${NODE_PORTS[$i]}"
    oha --no-tui --output-format json -n 3000 -c 20 --rand-regex-url "$BUYERS" \
      >"$OUT/raw/soldout-drain-n$((i + 1)).json" 2>>"$OUT/logs/oha.log" || true
  done
  sold=$(stock_field "$cfg" sold)
  [ "$sold" = 1000 ] || die "the sold-out sale sold $sold of 1000 after draining"
  start_proxies "$cfg"
  sale_rounds sale/sold_out direct/node_sold_out 409 0
  stop_proxies
  stop "${NODE_PIDS[@]}"
fi

# ---------------------------------------------------------------------------
# 3. The article's command, ab -n 10000 -c 100, on a sale of 5,000 anonymous
#    tickets; everything restarted on a fresh sale for every run.
# ---------------------------------------------------------------------------
if wants ab; then
  read -r -a NODE_PORTS <<<"$(free_ports 4)"
  for ((round = 0; round <= ROUNDS; round++)); do
    for side in $(in_turn "$round"); do
      pick_ports
      cfg=$WORK/sale-ab.toml
      write_sale_config "$cfg" bench-ab "$AB_TOTAL" 0 "${PORT[spike]}" "$ADMIN"
      flush_store
      "$SPIKE" stock init --trust-client-buyer-ids --config "$cfg" >/dev/null
      start_nodes "$cfg"
      start_proxy "$side" "$cfg"
      file=$OUT/raw/ab-$side-$round.txt
      read -r u0 s0 hz <<<"$(cpu_ticks "${PID[$side]}")"
      ab -n "$AB_N" -c 100 "http://127.0.0.1:${PORT[$side]}/buy/ticket" >"$file" 2>&1 || true
      read -r u1 s1 hz <<<"$(cpu_ticks "${PID[$side]}")"
      sold=$(stock_field "$cfg" sold)
      # shellcheck disable=SC2046
      set -- $(awk '
        /^Complete requests:/ { c = $3 }
        /^Requests per second:/ { r = $4 }
        /^Non-2xx responses:/ { n = $3 }
        /^ *99%/ { p = $2 }
        /^Failed requests:/ && $3 > 0 { getline; gsub(/[(),]/, " "); for (i = 1; i <= NF; i++) { if ($i == "Connect:" || $i == "Receive:" || $i == "Exceptions:") f += $(i + 1) } }
        END { printf "%s %s %s %s %d\n", (c == "" ? 0 : c), (r == "" ? 0 : r), (n == "" ? 0 : n), (p == "" ? 0 : p), f }' "$file")
      complete=$([ "$1" = "$AB_N" ] && echo true || echo false)
      label=round$round
      [ "$round" = 0 ] && label=warm-up
      printf '  %-26s %-7s %-8s %10.0f req/s  99%% %s ms  complete %s/%s, sold %s of %s, non-2xx %s\n' \
        "ab -n $AB_N -c 100" "$side" "$label" "$2" "$4" "$1" "$AB_N" "$sold" "$AB_TOTAL" "$3" >&2
      record kind=ab scenario=ab side="$side" round="$round" rps="$2" p99="$4" non2xx="$3" \
        failed_conn="$5" complete="$complete" sold="$sold" total="$AB_TOTAL" file="raw/ab-$side-$round.txt" \
        requests="$1" cpu_user_ticks="$((u1 - u0))" cpu_sys_ticks="$((s1 - s0))" hz="$hz"
      stop "${PID[$side]}" "${NODE_PIDS[@]}"
    done
  done
fi

# ---------------------------------------------------------------------------
# 6. Many sales in one fleet (issue 28): the success path through spike's
#    balancer and four nodes, on a file of one sale and on a file of
#    SALES_MANY sales (10,000) with every purchase in one of them
#    (`/events/E/buy`): two fleets side by side on one Redis, each in turn
#    every round; req/s, and the CPU per purchase of the balancer and of the
#    nodes. What it shows: whether the sales a fleet is not asked about cost
#    a purchase anything.
# ---------------------------------------------------------------------------
write_many_sales_config() { # FILE EVENT LISTEN ADMIN
  {
    local i
    for ((i = 0; i < SALES_MANY - 1; i++)); do
      # The sale under test sits in the middle of the list.
      [ "$i" = $((SALES_MANY / 2)) ] && printf '[[sale]]\nevent = "%s"\ntotal = 100000000\nper_user_limit = 1\n\n' "$2"
      printf '[[sale]]\nevent = "s%05d"\ntotal = 50\nper_user_limit = 1\n\n' "$i"
    done
    write_fleet "$3" "$4"
  } >"$1"
}
if wants sales; then
  declare -A FLEET_CFG FLEET_PORT FLEET_PID FLEET_NODES FLEET_PATH FLEET_EVENT
  for fleet in one many; do
    read -r -a NODE_PORTS <<<"$(free_ports 4)"
    read -r port admin <<<"$(free_ports 2)"
    cfg=$WORK/sales-$fleet.toml
    if [ $fleet = one ]; then
      write_sale_config "$cfg" bench-sales-one 100000000 1 "$port" "$admin"
      FLEET_PATH[$fleet]=/buy/ticket
      FLEET_EVENT[$fleet]=""
    else
      write_many_sales_config "$cfg" bench-sales-many "$port" "$admin"
      FLEET_PATH[$fleet]=/events/bench-sales-many/buy
      FLEET_EVENT[$fleet]="--event bench-sales-many"
    fi
    # shellcheck disable=SC2086
    "$SPIKE" stock init --trust-client-buyer-ids --config "$cfg" ${FLEET_EVENT[$fleet]} --force >/dev/null
    start_nodes "$cfg"
    spawn "balancer-sales-$fleet" env RUST_LOG=warn "$SPIKE" balancer --config "$cfg"
    wait_port "$port" "$LAST_PID" "balancer-sales-$fleet"
    FLEET_CFG[$fleet]=$cfg FLEET_PORT[$fleet]=$port FLEET_PID[$fleet]=$LAST_PID
    FLEET_NODES[$fleet]="${NODE_PIDS[*]}"
  done
  for ((round = 0; round <= ROUNDS; round++)); do
    for fleet in $( ((round % 2)) && echo "many one" || echo "one many"); do
      re=$(printf 'http://127.0.0.1:%s%s\\?user=[a-z0-9]{16}' "${FLEET_PORT[$fleet]}" "${FLEET_PATH[$fleet]}")
      read -r -a NODE_PIDS <<<"${FLEET_NODES[$fleet]}"
      NODE_CPU=1 oha_run "sales/$fleet" spike "$round" 200 "${FLEET_PID[$fleet]}" "$re" --rand-regex-url
    done
  done
  for fleet in one many; do
    read -r -a NODE_PIDS <<<"${FLEET_NODES[$fleet]}"
    stop "${FLEET_PID[$fleet]}" "${NODE_PIDS[@]}"
  done
fi

# ---------------------------------------------------------------------------
# 5. A sale with payments (`pay_within`): the rush reserves every ticket,
#    then every reservation is paid (POST /orders/ID/pay, URLs read from
#    Redis; oha picks among them at random, so some are paid twice, which
#    is one payment). Requests/s of each phase and Redis calls per paid
#    ticket, through spike's balancer and through Nginx, same nodes.
# ---------------------------------------------------------------------------
if wants payments; then
  read -r -a NODE_PORTS <<<"$(free_ports 4)"
  pick_ports
  cfg=$WORK/sale-payments.toml
  write_sale_config "$cfg" bench-payments "$PAY_TOTAL" 1 "${PORT[spike]}" "$ADMIN"
  sed -i 's/^per_user_limit = 1$/per_user_limit = 1\npay_within = "15m"/' "$cfg"
  grep -q '^pay_within' "$cfg" || die "could not add pay_within to $cfg"
  flush_store
  "$SPIKE" stock init --trust-client-buyer-ids --config "$cfg" >/dev/null
  start_nodes "$cfg"
  start_proxies "$cfg"
  payments_run() { # SIDE ROUND
    local side=$1 round=$2 port=${PORT[$1]} rush pay urls evalsha all usec paid reserved
    rush=raw/payments-rush-$side-$round.json
    pay=raw/payments-pay-$side-$round.json
    urls=$WORK/pay-urls-$side-$round.txt
    flush_store
    "$SPIKE" stock init --trust-client-buyer-ids --config "$cfg" >/dev/null
    sleep 1.5 # every node hears of the new sale (its poll is once a second)
    rcli CONFIG RESETSTAT >/dev/null
    buyers "$port"
    oha --no-tui --output-format json -n $((PAY_TOTAL * 4)) -c "$CONC" --rand-regex-url "$BUYERS" \
      >"$OUT/$rush" 2>>"$OUT/logs/oha.log" || true
    python3 "$HERE/payments.py" urls "$REDIS_PORT" bench-payments "$port" >"$urls"
    [ -s "$urls" ] || die "no reservation to pay after the rush through $side"
    oha --no-tui --output-format json -m POST -n $(($(wc -l <"$urls") * 3)) -c "$CONC" \
      --urls-from-file "$urls" >"$OUT/$pay" 2>>"$OUT/logs/oha.log" || true
    read -r evalsha all usec <<<"$(redis_calls)"
    paid=$(stock_field "$cfg" paid)
    reserved=$(stock_field "$cfg" reserved)
    local label=round$round
    [ "$round" = 0 ] && label=warm-up
    printf '  %-26s %-7s %-8s paid %s of %s (reserved %s), redis evalsha %s\n' \
      "sale/payments" "$side" "$label" "$paid" "$PAY_TOTAL" "$reserved" "$evalsha" >&2
    record kind=payments scenario=sale/payments side="$side" round="$round" rush="$rush" pay="$pay" \
      paid="$paid" reserved="$reserved" total="$PAY_TOTAL" redis_evalsha="$evalsha" redis_all="$all" redis_usec="$usec"
  }
  for ((round = 0; round <= ROUNDS; round++)); do
    for side in $(in_turn "$round"); do payments_run "$side" "$round"; done
  done
  stop_proxies
  stop "${NODE_PIDS[@]}"
fi

# ---------------------------------------------------------------------------
# 6. Buyers with tokens (`[auth]`): the same sale with and without it, the
#    same crowd client (examples/crowd.rs; oha sends one set of headers for
#    every request, so it cannot play buyers who each hold a token), every
#    request another buyer: `?user=NAME` without [auth], that buyer's own
#    token (minted by `spike token --count`) with it. The success path (a
#    fresh sale before every run) and the sold-out path (a sold-out sale,
#    answered at spike's edge), through spike and Nginx in front of the
#    same nodes, restarted for each mode. The balancer's and the nodes' CPU
#    are both recorded: with [auth] the node verifies every purchase.
# ---------------------------------------------------------------------------
if wants tokens; then
  say "compare.sh: building examples/crowd.rs (release)"
  cargo build --release --example crowd >&2
  CROWD=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/crowd
  read -r -a NODE_PORTS <<<"$(free_ports 4)"
  pick_ports
  TOKEN_SIDES=()
  for side in spike nginx; do runs "$side" && TOKEN_SIDES+=("$side"); done
  for path in success soldout; do
    total=100000000
    [ "$path" = soldout ] && total=1000
    write_sale_config "$WORK/tokens-$path-query.toml" "bench-tokens-$path" "$total" 1 "${PORT[spike]}" "$ADMIN"
    # The same file with [auth] (a fresh HS256 key for this run).
    python3 - "$WORK/tokens-$path-query.toml" "$WORK/tokens-$path-token.toml" <<'EOF'
import base64, os, sys
text = open(sys.argv[1]).read()
key = lambda: base64.b64encode(os.urandom(32)).decode()
auth = f'[auth]\nbuyer_keys = ["bench:hs256:{key()}"]\npayment_key = "{key()}"\n'
open(sys.argv[2], "w").write(text.replace("[redis]\n", auth + "[redis]\n", 1))
EOF
  done
  # Enough buyers for the fastest run (each request is a new one), and a
  # separate crowd that drains the sold-out sale, so that nobody in the
  # flood holds a ticket.
  n=${TOKEN_BUYERS:-400000}
  "$SPIKE" token --config "$WORK/tokens-success-token.toml" --buyer b --count "$n" >"$WORK/buyers-success.txt"
  "$SPIKE" token --config "$WORK/tokens-soldout-token.toml" --buyer b --count "$n" >"$WORK/buyers-soldout.txt"
  "$SPIKE" token --config "$WORK/tokens-soldout-token.toml" --buyer drain --count 20000 >"$WORK/buyers-drain.txt"
  tokens_mode() { # PATH SEND ROUND
    local path=$1 send=$2 round=$3 cfg=$WORK/tokens-$1-$2.toml side trust=() i expect=200 sold
    [ "$send" = query ] && trust=(--trust-client-buyer-ids)
    [ "$path" = soldout ] && expect=409
    flush_store
    "$SPIKE" stock init "${trust[@]}" --config "$cfg" >/dev/null
    start_nodes "$cfg"
    for side in "${TOKEN_SIDES[@]}"; do start_proxy "$side" "$cfg"; done
    if [ "$path" = soldout ]; then
      # Sell everything, then keep asking every node until each has heard
      # from Redis that the sale is over: from then on they answer from
      # memory, and spike's edge answers before them.
      for i in 0 1 2 3; do
        "$CROWD" --buyers "$WORK/buyers-drain.txt" --send "$send" -z 1s -c 20 \
          "http://127.0.0.1:${NODE_PORTS[$i]}/buy/ticket" >/dev/null 2>>"$OUT/logs/crowd.log" || true
      done
      sold=$(stock_field "$cfg" sold)
      [ "$sold" = 1000 ] || die "the sold-out sale sold $sold of 1000 after draining"
    fi
    for side in "${TOKEN_SIDES[@]}"; do
      if [ "$path" = success ]; then
        flush_store
        "$SPIKE" stock init "${trust[@]}" --config "$cfg" >/dev/null
      fi
      SALE_CFG=$cfg CROWD_SEND=$send CROWD_BUYERS=$WORK/buyers-$path.txt \
        oha_run "tokens/$path/$send" "$side" "$round" "$expect" "${PID[$side]}" "http://127.0.0.1:${PORT[$side]}/buy/ticket"
    done
    for side in "${TOKEN_SIDES[@]}"; do stop "${PID[$side]}"; done
    stop "${NODE_PIDS[@]}"
  }
  for ((round = 0; round <= ROUNDS; round++)); do
    for path in success soldout; do
      # Which mode runs first alternates from round to round.
      if ((round % 2)); then modes=(token query); else modes=(query token); fi
      for send in "${modes[@]}"; do tokens_mode "$path" "$send" "$round"; done
    done
  done
fi

# ---------------------------------------------------------------------------
# 7. The waiting room (`[waiting_room]`): what a buyer in line costs. A sale
#    that opens in a day, so every answer is "waiting": (a) a buyer asking
#    again with their place (the `spike_queue` cookie), answered from memory;
#    (b) a buyer asking without one, which joins the line (one Redis call).
#    Against spike's sold-out edge answer in the same round (a sold-out
#    sale without a waiting room, through the same nodes). spike only:
#    neither Nginx nor HAProxy has a line to keep.
# ---------------------------------------------------------------------------
if wants waiting && runs spike; then
  read -r -a NODE_PORTS <<<"$(free_ports 4)"
  pick_ports
  wcfg=$WORK/waiting.toml
  scfg=$WORK/waiting-soldout.toml
  write_sale_config "$scfg" bench-waiting-soldout 1000 1 "${PORT[spike]}" "$ADMIN"
  write_sale_config "$wcfg" bench-waiting 1000 1 "${PORT[spike]}" "$ADMIN"
  opens=$(python3 -c "import datetime as d; print((d.datetime.now(d.timezone.utc) + d.timedelta(days=1)).strftime('%Y-%m-%dT%H:%M:%SZ'))")
  python3 - "$wcfg" "$opens" <<'EOF'
import sys
path, opens = sys.argv[1], sys.argv[2]
text = open(path).read()
text = text.replace("per_user_limit = 1\n", f'per_user_limit = 1\nopens_at = "{opens}"\n', 1)
text = text.replace("[balancer]\n", '[waiting_room]\nadmit = "500/s"\n[balancer]\n', 1)
open(path, "w").write(text)
EOF
  room_calls() { # the waiting room's store calls so far (joins + ticks)
    curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '
      /^spike_waiting_room_(store|tick)_calls_total / { n += $2 } END { printf "%d\n", n }'
  }
  for ((round = 0; round <= ROUNDS; round++)); do
    # The edge's sold-out answer: sell everything, drain every node.
    flush_store
    "$SPIKE" stock init --trust-client-buyer-ids --config "$scfg" >/dev/null
    start_nodes "$scfg"
    start_proxy spike "$scfg"
    for i in 0 1 2 3; do
      buyers "${NODE_PORTS[$i]}"
      oha --no-tui --output-format json -n 3000 -c 20 --rand-regex-url "$BUYERS" \
        >"$OUT/raw/waiting-drain-n$((i + 1)).json" 2>>"$OUT/logs/oha.log" || true
    done
    buyers "${PORT[spike]}"
    oha --no-tui --output-format json -n 2000 -c 20 --rand-regex-url "$BUYERS" >/dev/null 2>>"$OUT/logs/oha.log" || true
    SALE_CFG=$scfg oha_run waiting/soldout_edge spike "$round" 409 "${PID[spike]}" "$BUYERS" --rand-regex-url
    stop "${PID[spike]}"
    stop "${NODE_PIDS[@]}"
    # The line: a sale that has not opened, with a waiting room.
    flush_store
    "$SPIKE" stock init --trust-client-buyer-ids --config "$wcfg" >/dev/null
    start_nodes "$wcfg"
    start_proxy spike "$wcfg"
    place=$(curl -s -D - -o /dev/null "http://127.0.0.1:${PORT[spike]}/buy/ticket?user=w" |
      tr -d '\r' | awk -F'[:;] *' 'tolower($1) == "set-cookie" { print $2; exit }')
    [[ "$place" == spike_queue=* ]] || die "the waiting room gave no place: '$place'"
    c0=$(room_calls)
    SALE_CFG=$wcfg oha_run waiting/answer spike "$round" 202 "${PID[spike]}" \
      "http://127.0.0.1:${PORT[spike]}/buy/ticket?user=w" -H "Cookie: $place"
    c1=$(room_calls)
    record kind=room scenario=waiting/answer round="$round" room_calls="$((c1 - c0))"
    SALE_CFG=$wcfg oha_run waiting/join spike "$round" 202 "${PID[spike]}" \
      "http://127.0.0.1:${PORT[spike]}/buy/ticket?user=w"
    c2=$(room_calls)
    record kind=room scenario=waiting/join round="$round" room_calls="$((c2 - c1))"
    stop "${PID[spike]}"
    stop "${NODE_PIDS[@]}"
  done
fi

[ -n "${REDIS_PID:-}" ] && stop "$REDIS_PID"

# ---------------------------------------------------------------------------
# 8. What the access log costs: spike alone, proxy only (round_robin), the
# same file without and with `access_log` (combined, on this disk), the
# order alternating from round to round; CPU per request of each, and the
# lines written and dropped (from /status) after each run with the log.
# ---------------------------------------------------------------------------
if wants accesslog; then
  start_backends
  read -r LOG_PORT LOG_ADMIN <<<"$(free_ports 2)"
  for mode in off on; do
    write_proxy_config "$WORK/accesslog-$mode.toml" round_robin "$LOG_PORT" "$LOG_ADMIN"
  done
  sed -i "s|^\[balancer\]\$|[balancer]\naccess_log = \"$WORK/access.log\"|" "$WORK/accesslog-on.toml"
  for ((round = 0; round <= ROUNDS; round++)); do
    if ((round % 2)); then modes=(on off); else modes=(off on); fi
    for mode in "${modes[@]}"; do
      rm -f "$WORK/access.log"
      spawn spike-accesslog env RUST_LOG=warn "$SPIKE" balancer --config "$WORK/accesslog-$mode.toml"
      pid=$LAST_PID
      wait_port "$LOG_PORT" "$pid" spike-accesslog
      oha_run "accesslog/$mode" spike "$round" 200 "$pid" "http://127.0.0.1:$LOG_PORT/"
      if [ "$mode" = on ]; then
        sleep 0.3 # the writer's period: the last lines in
        read -r written dropped <<<"$(python3 -c 'import json, sys, urllib.request
s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/status", timeout=5))["access_log"]
print(s["written"], s["dropped"])' "$LOG_ADMIN")"
        record kind=accesslog round="$round" written="$written" dropped="$dropped" \
          lines="$(wc -l <"$WORK/access.log")"
      fi
      stop "$pid"
    done
  done
  rm -f "$WORK/access.log"
  stop "$BACKENDS_PID"
fi

# ---------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------
python3 "$HERE/report.py" summarize "$OUT"
wants payments && python3 "$HERE/payments.py" summarize "$OUT"
wants tokens && python3 "$HERE/tokens.py" summarize "$OUT"
wants waiting && python3 "$HERE/waiting.py" summarize "$OUT"
wants accesslog && python3 "$HERE/accesslog.py" summarize "$OUT"
wants sales && python3 "$HERE/sales.py" summarize "$OUT"
say "compare.sh: raw oha JSON, runs.jsonl, summary.json, summary.md and chart.svg in $OUT"
