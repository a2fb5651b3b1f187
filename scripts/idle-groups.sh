#!/usr/bin/env bash
# Idle cost of many Raft groups: starts a 3-node testnet whose nodes each open EXTRA extra
# data groups (all three voters; routing keeps every topic in group 1, so they stay idle),
# lets it settle, then samples CPU (utime+stime from /proc/PID/stat) over WINDOW seconds
# and the resident set (VmRSS) of each node.
#
#   scripts/idle-groups.sh EXTRA [quiesce|noquiesce] [WINDOW] [SETTLE]
#
# EXTRA=63 gives 64 data groups (plus the metadata group). `noquiesce` sets
# CANAL_TEST_NO_QUIESCE, so every group heartbeats as before quiescence.
set -euo pipefail
extra=${1:?extra groups}
mode=${2:-quiesce}
window=${3:-30}
settle=${4:-20}
canal=${CANAL_BIN:-$(dirname "$0")/../target/debug/canal}
dir=$(mktemp -d /tmp/canal-idle.XXXXXX)
trap '"$canal" testnet --dir "$dir" down --purge >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
export CANAL_TEST_EXTRA_GROUPS=$extra
if [ "$mode" = noquiesce ]; then export CANAL_TEST_NO_QUIESCE=1; else unset CANAL_TEST_NO_QUIESCE; fi
"$canal" testnet --dir "$dir" up --nodes 3 >/dev/null
sleep "$settle"
pids=$("$canal" testnet --dir "$dir" status --json | python3 -c 'import json,sys; print(" ".join(str(n["pid"]) for n in json.load(sys.stdin)))')
apis=$("$canal" testnet --dir "$dir" status --json | python3 -c 'import json,sys; print(" ".join(n["api"] for n in json.load(sys.stdin)))')
token=$(cat "$dir/admin-token")
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A before
for p in $pids; do before[$p]=$(ticks "$p"); done
elections() { curl -s -H "Authorization: Bearer $token" "$1/metrics" | awk '/^canal_raft_elections_total/ {s += $2} END {print s + 0}'; }
declare -A el0
for a in $apis; do el0[$a]=$(elections "$a"); done
sleep "$window"
hz=$(getconf CLK_TCK)
i=0
set -- $apis
for p in $pids; do
  a=$1; shift
  after=$(ticks "$p")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status")
  groups=$(curl -s -H "Authorization: Bearer $token" "$a/metrics" | awk '/^canal_raft_groups\{/ {printf "%s ", $0}')
  el=$(( $(elections "$a") - ${el0[$a]} ))
  cpu=$(python3 -c "print(f'{($after - ${before[$p]}) / $hz / $window * 100:.2f}')")
  echo "node$i extra=$extra mode=$mode cpu=${cpu}% rss=$((rss / 1024))MiB elections_in_window=$el $groups"
  i=$((i + 1))
done
