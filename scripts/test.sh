#!/usr/bin/env bash
# The one command that passes the tests on a fresh machine: installs what the
# tests need when it is missing (redis-server, with redis-cli for the Cluster
# test and Sentinel in the same binary; nginx; haproxy; faketime; chromium for the
# status page test; openssl, which makes the certificates of the TLS
# tests and is their `s_client`; and curl, the HTTP/2 client of the HTTPS
# tests; all from Debian's packages), then runs the whole suite.
# CI calls this same script.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v faketime >/dev/null 2>&1 || missing+=(faketime)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "scripts/test.sh: installing ${missing[*]}"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Two test threads: the machine this runs on has two cores, and many tests
# start their own redis-server and spike processes. (An environment variable,
# not `-- --test-threads`, because criterion's bench harness refuses that flag;
# --all-targets runs each benchmark once as a smoke test.)
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
# No incremental cache: a one-off build gains nothing from it, and it cost
# 4 GB of disk (Cargo.toml's [profile.dev] says why disk matters here).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# The load client the crowd and PROXY protocol tests drive as a separate
# process (cargo test builds examples only as test harnesses).
cargo build --example crowd
cargo test --all-targets
