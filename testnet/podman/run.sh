#!/usr/bin/env bash
# The container path of CI: a three-node canal mesh under podman-compose, and the iot
# scenario run against it from the host through the CLI.
#
#   testnet/podman/run.sh [CANAL_BINARY] [THRESHOLD_WASM]
#
# CANAL_BINARY (default target/debug/canal) is the binary the tests were built with: it goes
# into a FROM scratch image with the shared libraries `ldd` lists and the dynamic loader, so
# no second build is needed. THRESHOLD_WASM (default: the guest workspace's release build)
# is the function the scenario deploys.
#
# The compose file, testnet/podman/compose.yml, is generated with testnet/docker-compose.yml
# from testnet/src/compose.rs (a test keeps both in sync). Podman runs with the settings of
# ../shared/notes/containers.md (runc, cgroupfs), given through CONTAINERS_CONF, so the
# machine's own configuration is left alone. Run as root; if podman or podman-compose is
# missing it is installed with apt-get. Everything started is torn down on exit, failed or
# not.
#
# Environment: CANAL_PODMAN_HEALTH_TIMEOUT (s, default 120): how long the nodes may take to
# become healthy; CANAL_SCENARIO_TIMEOUT (s, default 60): the scenario's --timeout per step;
# CANAL_SCENARIO_EVENTS (default 200): readings to publish.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(realpath "${1:-$root/target/debug/canal}")
wasm=$(realpath "${2:-$root/examples/functions/target/wasm32-wasip2/release/threshold.wasm}")
compose_file=$root/testnet/podman/compose.yml
project=canal-ci
health_timeout=${CANAL_PODMAN_HEALTH_TIMEOUT:-120}
scenario_timeout=${CANAL_SCENARIO_TIMEOUT:-60}
events=${CANAL_SCENARIO_EVENTS:-200}

t0=$(date +%s.%N)
phase_start=$t0
# Prints what was done, with the time since the last phase ended and since the start.
phase() {
	local now
	now=$(date +%s.%N)
	awk -v what="$1" -v a="$phase_start" -v b="$now" -v t="$t0" \
		'BEGIN { printf "== podman: %s (%.1f s; %.1f s in all)\n", what, b - a, b - t }'
	phase_start=$now
}
die() {
	echo "error: $*" >&2
	exit 1
}

[[ -x $bin ]] || die "no canal binary at $bin: build it with \`cargo build -p canal-cli\` (CI's tests build it)"
[[ -f $wasm ]] || die "no threshold function at $wasm: build it with \`cd examples/functions && cargo build --release --target wasm32-wasip2\`"
[[ -f $compose_file ]] || die "no $compose_file"
image=$(sed -n 's/^ *image: "\(.*\)"$/\1/p' "$compose_file" | sort -u)
[[ $(wc -l <<<"$image") == 1 && -n $image ]] || die "$compose_file should name one image, not: $image"

# 1. podman, podman-compose and runc, set up as ../shared/notes/containers.md says.
if ! command -v podman >/dev/null || ! command -v podman-compose >/dev/null || ! command -v runc >/dev/null; then
	[[ $(id -u) == 0 ]] || die "podman, podman-compose and runc are needed: apt-get install -y podman runc podman-compose (as root)"
	echo "installing podman, runc and podman-compose"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc podman-compose >/dev/null
fi
compose() { podman-compose -p "$project" -f "$compose_file" "$@"; }
# The container of a service.
container() { podman ps -a --filter "label=io.podman.compose.project=$project" --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1; }
# The nodes: every service but the one-shot keygen (it writes the keys and exits).
services=$(sed -n 's/^  \([a-z][a-z0-9-]*\):$/\1/p' "$compose_file" | grep -v -e '-data$' -e '^keygen$' || true)
[[ -n $services ]] || die "no services in $compose_file"

work=$(mktemp -d /tmp/canal-podman.XXXXXX)
cleanup() {
	local rc=$?
	set +e
	if [[ $rc != 0 ]]; then
		echo "== podman: failed (exit $rc); the nodes' logs end:" >&2
		for s in $services; do
			c=$(container "$s")
			[[ -n $c ]] || continue
			echo "-- $s ($c, $(podman inspect -f '{{.State.Status}}' "$c" 2>/dev/null))" >&2
			podman logs --tail 15 "$c" 2>&1 | sed 's/^/   /' >&2
		done
	fi
	compose down -v >/dev/null 2>&1
	podman volume rm -f "${project}_cluster-key" >/dev/null 2>&1
	podman rmi -f "$image" >/dev/null 2>&1
	rm -rf "$work"
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
export CONTAINERS_CONF=$work/containers.conf
cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
phase "podman $(podman --version | awk '{print $3}') ready"

# 2. The image: the binary, the libraries it is linked with and the loader, FROM scratch.
ctx=$work/context
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/tmp"
chmod 1777 "$ctx/rootfs/tmp"
ln "$bin" "$ctx/rootfs/usr/local/bin/canal" 2>/dev/null || cp "$bin" "$ctx/rootfs/usr/local/bin/canal"
# podman-compose 1.0.3 runs every health check through /bin/sh -c, so the image has a shell
# too: the host's, which needs nothing the binary does not.
sh_bin=$(readlink -f /bin/sh)
mkdir -p "$ctx/rootfs/bin"
cp "$sh_bin" "$ctx/rootfs/bin/sh"
for exe in "$bin" "$sh_bin"; do
	if ! ldd "$exe" >/dev/null 2>&1; then
		echo "$exe is statically linked: it needs no libraries"
		continue
	fi
	# `name => /path (addr)` for libraries, `/path (addr)` for the loader; the vDSO has no file.
	for lib in $(ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
		mkdir -p "$ctx/rootfs$(dirname "$lib")"
		cp -L "$lib" "$ctx/rootfs$lib"
	done
done
cat >"$ctx/Containerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin
EXPOSE 7000 7070
ENTRYPOINT ["/usr/local/bin/canal"]
EOF
podman build -q -t "$image" "$ctx" >/dev/null
podman run --rm "$image" --version >/dev/null || die "the image cannot run $bin"
phase "image $image built ($(du -sh "$ctx/rootfs" | cut -f1): canal, sh and $(find "$ctx/rootfs" -name '*.so*' | wc -l) libraries)"

# 3. The mesh. The cluster key goes into its volume first: podman-compose 1.0 starts the
# services in order but does not wait for the keygen service to finish, as Docker does.
compose down -v >/dev/null 2>&1 || true
key_volume=${project}_cluster-key
podman volume create "$key_volume" >/dev/null
podman run --rm -v "$key_volume:/key" "$image" cluster keygen /key/swarm.key --if-missing >/dev/null 2>&1 ||
	die "cannot write the cluster key into volume $key_volume"
podman run --rm -v "$key_volume:/key" "$image" token keygen /key/token.key --if-missing >/dev/null 2>&1 ||
	die "cannot write the token key into volume $key_volume"
podman run --rm -v "$key_volume:/key" "$image" testnet certs --dir /key >/dev/null 2>&1 ||
	die "cannot write the local CA and the API certificate into volume $key_volume"
# The APIs speak HTTPS: the host verifies them with the local CA, read out of the volume.
ca_file=$work/ca.pem
cp "$(podman volume inspect -f '{{.Mountpoint}}' "$key_volume")/tls/ca.pem" "$ca_file" ||
	die "cannot read the local CA out of volume $key_volume"
export CANAL_CA=$ca_file
# The scenario's admin token, minted from the token key the nodes are given.
CANAL_TOKEN=$(podman run --rm -v "$key_volume:/key" "$image" token mint --key /key/token.key \
	--sub ci --admin --pub '#' --sub-filter '#' --ttl 1d 2>/dev/null) ||
	die "cannot mint an admin token from volume $key_volume"
export CANAL_TOKEN
phase "cluster key, token key and local CA in volume $key_volume"
# podman-compose and podman talk a lot here (volumes it looks for before making them, no
# systemd to schedule health checks: step 4 runs them); the log is shown if this fails.
compose up -d >"$work/compose-up.log" 2>&1 || {
	cat "$work/compose-up.log" >&2
	die "podman-compose up failed"
}
phase "compose up: $(echo $services)"

# 4. Healthy: each node's own health check (canal health, in its container) passes.
deadline=$((SECONDS + health_timeout))
for s in $services; do
	c=$(container "$s")
	[[ -n $c ]] || die "no container for service $s"
	until podman healthcheck run "$c" >/dev/null 2>&1; do
		state=$(podman inspect -f '{{.State.Status}}' "$c")
		[[ $state == running ]] || die "$s stopped ($state) before it was healthy"
		((SECONDS < deadline)) || die "$s was not healthy within ${health_timeout}s"
		sleep 1
	done
done
phase "all nodes healthy"

# 5. The scenario, from the host through the published API ports.
url() {
	local hp
	hp=$(podman port "$(container "$1")" 7070 | head -1)
	[[ -n $hp ]] || die "the API port of $1 is not published"
	echo "https://$hp"
}
edge=() cloud=()
for s in $services; do
	case $s in
	edge*) edge+=("$(url "$s")") ;;
	cloud*) cloud+=("$(url "$s")") ;;
	esac
done
(IFS=,; echo "edge nodes ${edge[*]}; cloud nodes ${cloud[*]}")
"$bin" testnet scenario iot \
	--api-edge "$(IFS=,; echo "${edge[*]}")" \
	--api-cloud "$(IFS=,; echo "${cloud[*]}")" \
	--wasm "$wasm" --events "$events" --timeout "$scenario_timeout"
phase "scenario passed"
