# Sourced by the benchmark scripts (holders_churn.sh, million_buyers.sh,
# audit_million.sh): a scratch folder and the processes they start, both
# gone on exit, and the two helpers every one of them needs.

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_ports() { # N: N free loopback ports
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
wait_port() { # PORT PID: until PORT accepts, or exits if PID does
  local i
  for ((i = 0; i < 400; i++)); do
    kill -0 "$2" 2>/dev/null || { echo "process $2 exited" >&2; exit 1; }
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing on port $1" >&2
  exit 1
}
