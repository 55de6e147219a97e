#!/usr/bin/env bash
# scripts/crowd.sh: a crowd of buyers at a sale that opens on time, played
# by examples/crowd.rs --flow (oha cannot wait for an opening, hold a token
# or pay): every buyer gets their own token (`spike token --count`), comes
# before the opening, waits as Retry-After says, buys once, and pays (a
# share of them, as the payment service) or lets the reservation expire.
# Then it checks what must hold: one outcome per buyer, no more tickets than
# the total, and `stock audit`.
#
#   scripts/crowd.sh                       # 20,000 buyers, 1,000 tickets
#   BUYERS=100000 TOTAL=5000 ROOM=500/s scripts/crowd.sh
#
# With ROOM (a `[waiting_room] admit`: "500/s" or "follow_stock"), the sale
# has a waiting room and every buyer is a visitor of their own, all waiting
# at once (crowd --arrive: arrivals spread over ARRIVE seconds, the opening
# OPENS_IN seconds in), sharing CONC connections and sending back the
# cookies they are given; the report adds the line's fairness (the rank
# correlation of arrival against place: near 0 among the pre-queue's
# admitted buyers, near 1 after the opening), the most the serving mark moved
# within any second (read with Redis's clock: at most the rate + 1) and the
# line's pace, and the most purchases the nodes saw in any one second,
# sampled from their /metrics, against the admit rate.
#
# Knobs (environment): BUYERS (20000), TOTAL (1000), CONC (200 lanes, each
# one buyer at a time; with ROOM, shared connections), PAY_SHARE (0.8),
# PAY_WITHIN (10s), OPENS_IN (5 s after start), NODES (2), ROOM (none),
# ARRIVE (with ROOM: 10 s). Uses real Redis (installed with apt-get when
# missing) and a `spike up` from the release build.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BUYERS=${BUYERS:-20000}
TOTAL=${TOTAL:-1000}
CONC=${CONC:-200}
PAY_SHARE=${PAY_SHARE:-0.8}
PAY_WITHIN=${PAY_WITHIN:-10s}
OPENS_IN=${OPENS_IN:-5}
NODES=${NODES:-2}
ROOM=${ROOM:-}
ARRIVE=${ARRIVE:-10}
say() { printf 'crowd.sh: %s\n' "$*" >&2; }

if ! command -v redis-server >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends redis-server
fi
say "building spike and examples/crowd.rs (release)"
cargo build --release --bin spike --example crowd >&2
SPIKE=${CARGO_TARGET_DIR:-$ROOT/target}/release/spike
CROWD=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/crowd

WORK=$(mktemp -d "${TMPDIR:-/tmp}/spike-crowd.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
read -r -a P <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(8)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')"
REDIS_PORT=${P[0]} LB=${P[1]} ADMIN=${P[2]}
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly yes --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

opens=$(python3 -c "import datetime as d; print((d.datetime.now(d.timezone.utc) + d.timedelta(seconds=$OPENS_IN)).strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3] + 'Z')")
key() { python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'; }
cfg=$WORK/crowd.toml
{
  echo "[sale]"
  echo "event = \"crowd\""
  echo "total = $TOTAL"
  echo "per_user_limit = 1"
  echo "pay_within = \"$PAY_WITHIN\""
  echo "opens_at = \"$opens\""
  echo "[auth]"
  echo "buyer_keys = [\"crowd:hs256:$(key)\"]"
  echo "payment_key = \"$(key)\""
  echo "[redis]"
  echo "url = \"redis://127.0.0.1:$REDIS_PORT\""
  if [ -n "$ROOM" ]; then
    echo "[waiting_room]"
    echo "admit = \"$ROOM\""
  fi
  echo "[balancer]"
  echo "listen = \"127.0.0.1:$LB\""
  echo "admin = \"127.0.0.1:$ADMIN\""
  for ((i = 1; i <= NODES; i++)); do
    echo "[[node]]"
    echo "name = \"n$i\""
    echo "listen = \"127.0.0.1:${P[$((2 + i))]}\""
  done
} >"$cfg"
"$SPIKE" token --config "$cfg" --buyer b --count "$BUYERS" >"$WORK/buyers.txt"
RUST_LOG=warn "$SPIKE" up --config "$cfg" >"$WORK/up.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$LB") 2>/dev/null && break; sleep 0.1; done
say "$BUYERS buyers, $TOTAL tickets, the sale opens at $opens; $CONC lanes; ${PAY_SHARE} of reservations paid within $PAY_WITHIN"
start=$(date +%s.%N)
arrive=()
if [ -n "$ROOM" ]; then
  arrive=(--arrive "${ARRIVE}s")
  # The nodes' purchases, sampled once a second while the crowd runs.
  python3 - "$WORK/rate.json" "$ADMIN" "${P[@]:3:$NODES}" <<'EOF' &
import json, sys, time, urllib.request
out, admin, ports = sys.argv[1], sys.argv[2], sys.argv[3:]
names = ("spike_node_sold_total", "spike_node_sold_out_total", "spike_node_already_bought_total",
         "spike_node_replayed_total", "spike_node_not_selling_total")
def seen():
    n = 0
    for p in ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=2).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k in names:
                n += float(v)
    return n
def admitted():
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == "spike_waiting_room_serving":
            return float(v)
    return None
def most(samples, i):
    # The most a second over any two seconds or more between samples (a
    # loaded machine reads the nodes unevenly: a shorter window measures
    # the reads as much as the purchases).
    best = 0.0
    for j, a in enumerate(samples):
        for b in samples[j + 1:]:
            if b[0] - a[0] >= 2 and a[i] is not None and b[i] is not None:
                best = max(best, (b[i] - a[i]) / (b[0] - a[0]))
                break
    return best
samples = []
while True:
    samples.append((time.time(), seen(), admitted()))
    json.dump({"most_in_a_second": most(samples, 1), "admitted_most_in_a_second": most(samples, 2),
               "samples": len(samples), "seconds": samples[-1][0] - samples[0][0],
               "trace": [[round(t - samples[0][0], 2), n, a] for t, n, a in samples]}, open(out, "w"))
    time.sleep(0.5)
EOF
  PIDS+=($!)
  # The serving mark read with Redis's own clock (TIME and the mark in one
  # script), every few milliseconds: the most it moved within any second,
  # exactly (two samples less than a second apart bound a second's moves
  # from below, whatever the sampler's own delays).
  python3 - "$WORK/mark.json" "$REDIS_PORT" <<'EOF' &
import collections, json, socket, sys, time
out, port = sys.argv[1], int(sys.argv[2])
script = ("local t = redis.call('TIME') return {tonumber(t[1]) * 1000 + "
          "math.floor(tonumber(t[2]) / 1000), tonumber(redis.call('HGET', KEYS[1], 'serving') or '0')}")
cmd = ["EVAL", script, "1", "spike:{crowd}:line"]
req = (f"*{len(cmd)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in cmd)).encode()
s = socket.create_connection(("127.0.0.1", port))
f = s.makefile("rb")
def sample():
    s.sendall(req)
    assert f.readline().startswith(b"*2")
    return int(f.readline()[1:]), int(f.readline()[1:])
kept, worst, samples, dumped = collections.deque(), (0, 0), 0, 0.0
first, last = None, None
while True:
    at, mark = sample()
    samples += 1
    if mark > 0 and (last is None or mark > last[1]):
        first = first or (at, mark)
        last = (at, mark)
    # The samples less than a second before this one: the earliest of them
    # bounds how far the mark moved within a second ending now.
    while kept and kept[0][0] <= at - 1000:
        kept.popleft()
    kept.append((at, mark))
    if mark - kept[0][1] > worst[0]:
        worst = (mark - kept[0][1], kept[0][0])
    if time.time() - dumped > 0.5:
        # The line's own pace, from its first move to its last.
        pace = (last[1] - first[1]) * 1000 / (last[0] - first[0]) if last and last[0] > first[0] else None
        json.dump({"most_in_any_second": worst[0], "from_ms": worst[1], "samples": samples,
                   "mean_per_second": pace}, open(out, "w"))
        dumped = time.time()
    time.sleep(0.005)
EOF
  PIDS+=($!)
fi
"$CROWD" --flow --config "$cfg" --buyers "$WORK/buyers.txt" --send token --pay-share "$PAY_SHARE" \
  -c "$CONC" -z 10m --patience 5m "${arrive[@]+"${arrive[@]}"}" "http://127.0.0.1:$LB/buy/ticket" >"$WORK/crowd.json"
took=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
[ -f "$WORK/rate.json" ] || echo '{}' >"$WORK/rate.json"
[ -f "$WORK/mark.json" ] || echo '{}' >"$WORK/mark.json"
# Unpaid reservations expire (PAY_WITHIN), then the audit reads a quiet sale.
sleep "$(python3 -c "import re; v='$PAY_WITHIN'; print(int(re.sub(r'[^0-9]', '', v)) + 2)")"
"$SPIKE" stock show --config "$cfg" >"$WORK/show.json"
audit_rc=0
"$SPIKE" stock audit --config "$cfg" >"$WORK/audit.json" || audit_rc=$?
cp "$WORK/rate.json" "${TMPDIR:-/tmp}/spike-crowd-rate.json" 2>/dev/null || true
cp "$WORK/mark.json" "${TMPDIR:-/tmp}/spike-crowd-mark.json" 2>/dev/null || true
python3 - "$WORK/crowd.json" "$WORK/show.json" "$BUYERS" "$TOTAL" "$took" "$audit_rc" "$WORK/rate.json" "$ROOM" "$WORK/mark.json" <<'EOF'
import json, sys
crowd, show = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
buyers, total, took, audit_rc = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
rate, room, mark = json.load(open(sys.argv[7])), sys.argv[8], json.load(open(sys.argv[9]))
o = crowd["outcomes"]
print(json.dumps({"outcomes": o, "waits": crowd["waits"], "requests": crowd["statusCodeDistribution"],
                  "errors": crowd["errorDistribution"], "seconds": float(took),
                  "line": crowd.get("line"), "nodes_most_purchases_in_a_second": rate.get("most_in_a_second"),
                  "line_most_admitted_in_a_second": rate.get("admitted_most_in_a_second"),
                  "line_most_admitted_in_any_second": mark.get("most_in_any_second"),
                  "line_admitted_per_second_while_moving": mark.get("mean_per_second"),
                  "admit": room or None,
                  "store": {k: show[k] for k in ("total", "sold", "paid", "reserved", "released")}}, indent=1))
problems = []
if sum(o.values()) != buyers:
    problems.append(f"{sum(o.values())} outcomes for {buyers} buyers")
tickets = o.get("paid", 0) + o.get("reserved_unpaid", 0) + o.get("payment_failed", 0)
if tickets > total:
    problems.append(f"{tickets} buyers were told they hold a ticket, of {total}")
if show["paid"] != o.get("paid", 0):
    problems.append(f"the store has {show['paid']} paid, the buyers {o.get('paid', 0)}")
if show["sold"] > total:
    problems.append(f"oversold: {show['sold']} of {total}")
if o.get("gave_up", 0) or o.get("refused", 0):
    problems.append(f"buyers without an answer: gave_up {o.get('gave_up', 0)}, refused {o.get('refused', 0)}")
if audit_rc != 0:
    problems.append("stock audit failed")
line = crowd.get("line") or {}
if room:
    pre = line.get("prequeue_rank_correlation")
    if pre is not None and abs(pre) > 0.1:
        problems.append(f"the pre-queue's places follow arrival: rank correlation {pre:.3f}")
    after = line.get("after_opening_rank_correlation")
    if after is not None and line.get("after_opening", 0) > 100 and after < 0.9:
        problems.append(f"places after the opening do not follow arrival: rank correlation {after:.3f}")
    if room.endswith("/s") and mark.get("most_in_any_second") is not None:
        # The mark, exactly: the rate, and one of rounding.
        if mark["most_in_any_second"] > int(room[:-2]) + 1:
            problems.append(f"the line admitted {mark['most_in_any_second']} within a second, admit {room}")
    if room.endswith("/s") and rate.get("most_in_a_second") is not None:
        # The sampler's second is not the line's: allow a tick's admissions.
        allowed = int(room[:-2]) * 1.1 + 20
        if rate["most_in_a_second"] > allowed:
            problems.append(f"the nodes saw {rate['most_in_a_second']:.0f} purchases a second, admit {room}")
for p in problems:
    print("crowd.sh: FAILED:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
