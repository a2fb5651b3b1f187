#!/usr/bin/env bash
# Shard groups on a 3-node testnet of SHARDS shards (`canal testnet up --shards`; every node
# hosts the shard groups the committed map gives it): the time from the first shard map to
# every shard group formed with a leader and 3 voters on every node, then the idle cost: CPU
# (utime+stime from /proc/PID/stat) over WINDOW seconds after SETTLE, and the resident set
# (VmRSS) of each node. Nothing is published, so the groups idle.
#
#   scripts/shard-groups.sh SHARDS [WINDOW] [SETTLE]
set -euo pipefail
shards=${1:?shards}
window=${2:-30}
settle=${3:-20}
canal=${CANAL_BIN:-$(dirname "$0")/../target/debug/canal}
dir=$(mktemp -d /tmp/canal-shardgroups.XXXXXX)
trap '"$canal" testnet --dir "$dir" down --purge >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
unset CANAL_SHARDS CANAL_TEST_EXTRA_GROUPS CANAL_TEST_NO_QUIESCE
"$canal" testnet --dir "$dir" up --nodes 3 --shards "$shards" >/dev/null
status=$("$canal" testnet --dir "$dir" status --json)
pids=$(python3 -c 'import json,sys; print(" ".join(str(n["pid"]) for n in json.load(sys.stdin)))' <<<"$status")
apis=$(python3 -c 'import json,sys; print(" ".join(n["api"] for n in json.load(sys.stdin)))' <<<"$status")
token=$(cat "$dir/admin-token")
shards_of() { curl -s -H "Authorization: Bearer $token" "$1/v1/cluster/shards"; }
# Prints how many shard groups node API has formed with a leader and 3 voters, of how many.
formed() {
  shards_of "$1" | python3 -c '
import json, sys
m = json.load(sys.stdin)
ok = sum(1 for r in m["rows"] if (g := r.get("shard_group")) and g["state"] in ("active", "quiescent") and g["leader"] and len(g["voters"]) == 3)
print(m["epoch"], ok, len(m["rows"]))'
}
set -- $apis
first=$1
# Every wait below gives up after this many seconds, naming what it waited for.
limit=${CANAL_WAIT_LIMIT:-180}
deadline=$(( $(date +%s) + limit ))
give_up() { echo "gave up after ${limit}s waiting for $1" >&2; exit 1; }
until [ "$(formed "$first" | cut -d" " -f1)" -ge 1 ] 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || give_up "the first shard map"
  sleep 0.2
done
t0=$(date +%s.%N)
while :; do
  [ "$(date +%s)" -lt "$deadline" ] || give_up "every shard group to form on every node"
  done_all=1
  for a in $apis; do
    read -r _ ok total < <(formed "$a")
    [ "$ok" = "$total" ] && [ "$total" = "$shards" ] || done_all=0
  done
  [ $done_all = 1 ] && break
  sleep 0.2
done
t1=$(date +%s.%N)
echo "shards=$shards formed_on_3_nodes_after_first_map=$(python3 -c "print(f'{$t1 - $t0:.2f}')")s"
sleep "$settle"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A before
for p in $pids; do before[$p]=$(ticks "$p"); done
sleep "$window"
hz=$(getconf CLK_TCK)
i=0
set -- $apis
for p in $pids; do
  a=$1; shift
  after=$(ticks "$p")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status")
  groups=$(curl -s -H "Authorization: Bearer $token" "$a/metrics" | awk '/^canal_raft_groups\{/ {printf "%s ", $0} /^canal_shard_groups_hosted / {printf "%s ", $0}')
  cpu=$(python3 -c "print(f'{($after - ${before[$p]}) / $hz / $window * 100:.2f}')")
  echo "node$i shards=$shards cpu=${cpu}% rss=$((rss / 1024))MiB $groups"
  i=$((i + 1))
done
