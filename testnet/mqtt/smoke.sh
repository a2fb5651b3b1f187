#!/usr/bin/env bash
# MQTT with unmodified clients against a three-node testnet: mosquitto_pub/mosquitto_sub
# (Debian's mosquitto-clients, MQTT 3.1.1 and 5.0) and paho-mqtt 5.0 with user properties
# (paho_v5.py beside this file). Installs the clients if missing (as root), tears the
# testnet down on exit, and ends with a "N passed, N failed" line.
#
#   testnet/mqtt/smoke.sh [CANAL_BINARY]
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(realpath "${1:-$root/target/debug/canal}")
[[ -x $bin ]] || { echo "error: no canal binary at $bin: build it with cargo build -p canal-cli" >&2; exit 1; }

if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto_sub >/dev/null; then
	[[ $(id -u) == 0 ]] || { echo "mosquitto-clients is needed: apt-get install -y mosquitto-clients" >&2; exit 1; }
	echo "installing mosquitto-clients"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto-clients >/dev/null
fi
if ! python3 -c 'import paho.mqtt' 2>/dev/null; then
	echo "installing paho-mqtt"
	python3 -m pip install -q paho-mqtt 2>/dev/null ||
		python3 -m pip install -q --break-system-packages paho-mqtt 2>/dev/null ||
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-paho-mqtt >/dev/null; }
	python3 -c 'import paho.mqtt' || { echo "error: cannot install paho-mqtt" >&2; exit 1; }
fi

dir=$(mktemp -d /tmp/canal-mqtt-smoke.XXXXXX)
cleanup() {
	"$bin" testnet --dir "$dir" down --purge >/dev/null 2>&1 || true
	rm -rf "$dir"
}
trap cleanup EXIT

"$bin" testnet --dir "$dir" up --nodes 3 --timeout 90 >/dev/null
# Each node's MQTT address, from the node.json it wrote.
mqtt_port() {
	python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mqtt"].rsplit(":",1)[1])' "$dir/node$1/node.json"
}
p0=$(mqtt_port 0)
p1=$(mqtt_port 1)
p2=$(mqtt_port 2)
echo "MQTT ports: $p0 $p1 $p2"
# The testnet's admin token is the MQTT password.
token=$(cat "$dir/admin-token")
auth=(-u canal -P "$token")

passed=0
failed=0
check() {
	if [[ $2 == "$3" ]]; then
		echo "ok: $1"
		passed=$((passed + 1))
	else
		echo "FAILED: $1: got ${2@Q}, want ${3@Q}"
		failed=$((failed + 1))
	fi
}

# 1. A retained QoS 1 message published on node 0 reaches a later subscriber on node 1.
mosquitto_pub "${auth[@]}" -h 127.0.0.1 -p "$p0" -q 1 -r -t smoke/retained -m 21.5
got=$(timeout 30 mosquitto_sub "${auth[@]}" -h 127.0.0.1 -p "$p1" -q 1 -t 'smoke/#' -C 1 -W 25 || true)
check "mosquitto 3.1.1: retained message across nodes" "$got" "21.5"

# 2. Live QoS 1 over MQTT 5.0, node 0 to node 2 (published until the subscriber has it).
out=$dir/live.out
timeout 40 mosquitto_sub "${auth[@]}" -V mqttv5 -h 127.0.0.1 -p "$p2" -q 1 -t smoke/live -C 1 -W 35 >"$out" &
sub=$!
for _ in $(seq 1 60); do
	kill -0 "$sub" 2>/dev/null || break
	mosquitto_pub "${auth[@]}" -V mqttv5 -h 127.0.0.1 -p "$p0" -q 1 -t smoke/live -m hello
	sleep 0.5
done
wait "$sub" || true
check "mosquitto 5.0: live QoS 1 across nodes" "$(head -n 1 "$out")" "hello"

# 3. paho-mqtt 5.0 with user properties, node 1 to node 2.
if python3 "$root/testnet/mqtt/paho_v5.py" 127.0.0.1 "$p1" "$p2" "$token"; then
	check "paho 5.0: user properties across nodes" ok ok
else
	check "paho 5.0: user properties across nodes" failed ok
fi

echo "mqtt smoke: $passed passed, $failed failed"
[[ $failed == 0 ]]
