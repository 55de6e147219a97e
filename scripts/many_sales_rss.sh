#!/usr/bin/env bash
# Issue 28: one `spike node` process on real Redis with 10,000 sales in
# its file and traffic on 10 of them, against a node of one sale with the
# same traffic, in the same run: resident memory (RSS, from /proc) at
# start, after the traffic, and once the sales' state went idle; the time
# from exec to listening. Prints a table; needs a release build
# (`cargo build --release`), redis-server and oha.
#
#   scripts/many_sales_rss.sh            # 10,000 sales, 20,000 purchases
#   SALES=1000 PURCHASES=5000 scripts/many_sales_rss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/procs.sh

SALES=${SALES:-10000}
HOT=10
PURCHASES=${PURCHASES:-20000}
SPIKE=${SPIKE:-target/release/spike}
[ -x "$SPIKE" ] || { echo "no $SPIKE: cargo build --release first" >&2; exit 1; }

read -r RPORT NPORT <<<"$(free_ports 2)"
redis-server --port "$RPORT" --save '' --appendonly yes --dir "$WORK" \
  --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$RPORT" "${PIDS[-1]}"

tail_of() { # the [redis] and [[node]] of both files
  printf '[redis]\nurl = "redis://127.0.0.1:%s"\n\n[[node]]\nname = "n1"\nlisten = "127.0.0.1:%s"\n' "$RPORT" "$NPORT"
}
{
  for ((i = 0; i < SALES; i++)); do
    # idle_after at its shortest for lease_ttl 3s, to see the state go.
    printf '[[sale]]\nevent = "s%05d"\ntotal = 1000\nper_user_limit = 0\nlease_ttl = "3s"\nidle_after = "6s"\n\n' "$i"
  done
  tail_of
} >"$WORK/many.toml"
{
  printf '[sale]\nevent = "one"\ntotal = %d\nper_user_limit = 0\nlease_ttl = "3s"\n\n' $((HOT * 1000))
  tail_of
} >"$WORK/one.toml"
for ((i = 0; i < HOT; i++)); do
  "$SPIKE" stock init --config "$WORK/many.toml" --event "$(printf 's%05d' "$i")" >/dev/null
done
"$SPIKE" stock init --config "$WORK/one.toml" >/dev/null

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
now_ms() { date +%s%3N; }

# One node: start (time to listening), RSS, traffic, RSS, idle, RSS.
measure() { # NAME FILE URL-REGEX
  local name=$1 file=$2 url=$3 t0 t1 pid
  t0=$(now_ms)
  "$SPIKE" node --config "$file" --name n1 >"$WORK/$name.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_port "$NPORT" "$pid"
  t1=$(now_ms)
  sleep 1
  local start
  start=$(rss_kb "$pid")
  oha --no-tui -n "$PURCHASES" -c 50 -m POST --rand-regex-url "$url" >"$WORK/$name.oha" 2>&1
  sleep 1
  local busy
  busy=$(rss_kb "$pid")
  local held
  held=$(curl -s "http://127.0.0.1:$NPORT/stats" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v.get("sales_held", 1))')
  sleep 9
  local idle held_after
  idle=$(rss_kb "$pid")
  held_after=$(curl -s "http://127.0.0.1:$NPORT/stats" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v.get("sales_held", 1))')
  local sold
  sold=$(grep -E '^\s+\[200\]' "$WORK/$name.oha" | awk '{print $2}')
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  printf '| %s | %d ms | %.1f MiB | %.1f MiB (%s held, %s sold) | %.1f MiB (%s held) |\n' \
    "$name" $((t1 - t0)) "$(echo "$start/1024" | bc -l)" "$(echo "$busy/1024" | bc -l)" \
    "$held" "${sold:-?}" "$(echo "$idle/1024" | bc -l)" "$held_after"
}

echo "spike $("$SPIKE" --version 2>/dev/null || echo '?'), $(nproc) CPUs, $(redis-server --version | awk '{print $3}'), $(date -u +%FT%TZ)"
echo "$PURCHASES purchases (oha -c 50, POST) over $HOT sales of 1,000 tickets (or one of $((HOT * 1000)))"
echo
echo '| node | exec to listening | RSS at start | RSS after the purchases | RSS 10 s later (idle_after 6 s) |'
echo '|---|---:|---:|---:|---:|'
measure "one sale" "$WORK/one.toml" "http://127.0.0.1:$NPORT/buy/ticket"
measure "$SALES sales, traffic on $HOT" "$WORK/many.toml" "http://127.0.0.1:$NPORT/events/s0000[0-9]/buy"
