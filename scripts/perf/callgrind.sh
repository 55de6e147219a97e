#!/bin/bash
# scripts/perf/callgrind.sh MODE BINARY [N]: user-space instructions per
# request under valgrind --tool=callgrind: deterministic to ~1%, so it shows
# changes of a few percent that wall-clock CPU on a shared machine cannot.
#   MODE node:  one sold-out `spike node` (embedded store), /buy/ticket -> 409
#   MODE proxy: `spike balancer` (round_robin) over 4 nginx `return 200` backends
# Counters are zeroed once the server listens, N requests (20000) are sent
# with oha -c 10, then dumped; prints Ir/req. The dump is copied to
# ${OUT:-.}/cg.out.1 for callgrind_annotate. Loopback only. Kernel time is
# not counted.
set -u
MODE=$1; BIN=$2; N=${3:-20000}; NGX=
W=$(mktemp -d /tmp/cg.XXXX)
P=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
A=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
if [ $MODE = node ]; then
  printf '[sale]\nevent = "e"\ntotal = 1\nper_user_limit = 1\n[[node]]\nname = "n1"\nlisten = "127.0.0.1:%s"\nweight = 1\nstock = 3\n' $P > $W/c.toml
  CMD="node --config $W/c.toml --name n1"; URL="http://127.0.0.1:$P/buy/ticket?user=buyer1"
else
  BP=($(python3 -c 'import socket
ss=[socket.socket() for _ in range(4)]
[s.bind(("127.0.0.1",0)) for s in ss]
print(" ".join(str(s.getsockname()[1]) for s in ss))'))
  { echo "worker_processes 1; pid nginx.pid; lock_file nginx.lock; error_log stderr warn; events { worker_connections 2048; }"
    echo "http { access_log off; keepalive_requests 1000000; client_body_temp_path cbt; proxy_temp_path pt; fastcgi_temp_path ft; uwsgi_temp_path ut; scgi_temp_path st;"
    for p in "${BP[@]}"; do echo "server { listen 127.0.0.1:$p; location / { return 200 \"b\n\"; } }"; done; echo "}"; } > $W/n.conf
  nginx -p $W -c $W/n.conf -e stderr -g 'daemon off;' 2>/dev/null & NGX=$!
  { printf '[balancer]\nlisten = "127.0.0.1:%s"\nadmin = "127.0.0.1:%s"\nstrategy = "round_robin"\n' $P $A
    for p in "${BP[@]}"; do printf '[[balancer.upstream]]\naddr = "127.0.0.1:%s"\n' $p; done; } > $W/c.toml
  CMD="balancer --config $W/c.toml"; URL="http://127.0.0.1:$P/"
fi
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file=$W/cg.out $BIN $CMD 2>$W/vg.log & VG=$!
for i in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.1; done
if [ $MODE = node ]; then for u in a b c; do curl -s -o /dev/null "http://127.0.0.1:$P/buy/ticket?user=$u"; done; fi
callgrind_control -z $VG >/dev/null 2>&1
oha -n $N -c 10 --no-tui --output-format json "$URL" > $W/oha.json
callgrind_control -d $VG >/dev/null 2>&1
sleep 1
kill -TERM $VG; wait $VG 2>/dev/null; [ -n "$NGX" ] && kill $NGX
F=$(ls -t $W/cg.out* | head -1)
# sum the Ir of the dump taken after the run (the last numbered part)
IR=$(callgrind_annotate $W/cg.out.1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
python3 -c "import json,sys; j=json.load(open('$W/oha.json')); print('codes', j['statusCodeDistribution'])"
echo "Ir/req $(python3 -c "print(round($IR/$N))")   (Ir $IR, $N req)"
cp $W/cg.out.1 "${OUT:-.}/" 2>/dev/null; rm -rf "$W"
