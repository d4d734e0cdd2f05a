#!/usr/bin/env bash
# What latency between machines costs: two Ray nodes of one core each, in two network
# namespaces joined by a veth pair that delays every packet by DELAY_MS in each direction
# (tc netem), then benchmarks/scaling.py with W=1,2 workers of k=1 core on that cluster.
#
#   sudo bash benchmarks/netns_delay.sh MODEL_OR_ARTIFACT DELAY_MS [--samples N] [--json F]
#
# Needs root (ip netns, tc). Everything it creates (namespaces, veth, Ray processes) is removed
# on exit, also after an error.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
DELAY=$2
shift 2
PY=${PYTHON:-.venv/bin/python}
RAY="$(dirname "$PY")/ray"
HEAD_IP=10.77.0.1
NODE_IP=10.77.0.2
PORT=6399

cleanup() {
    ip netns exec gv-head "$RAY" stop --force >/dev/null 2>&1 || true
    ip netns exec gv-node "$RAY" stop --force >/dev/null 2>&1 || true
    ip netns del gv-head 2>/dev/null || true
    ip netns del gv-node 2>/dev/null || true
}
trap cleanup EXIT
cleanup

ip netns add gv-head
ip netns add gv-node
ip link add gv-h type veth peer name gv-n
ip link set gv-h netns gv-head
ip link set gv-n netns gv-node
ip -n gv-head addr add "$HEAD_IP/24" dev gv-h
ip -n gv-node addr add "$NODE_IP/24" dev gv-n
for ns in gv-head gv-node; do ip -n "$ns" link set lo up; done
ip -n gv-head link set gv-h up
ip -n gv-node link set gv-n up
if [ "$DELAY" != "0" ]; then
    if ! tc -n gv-head qdisc add dev gv-h root netem delay "${DELAY}ms" 2>/dev/null; then
        echo "this kernel has no netem qdisc (sch_netem), so no delay can be added; DELAY_MS=0 still" \
             "runs the two namespaces without it" >&2
        exit 2
    fi
    tc -n gv-node qdisc add dev gv-n root netem delay "${DELAY}ms"
fi
echo "ping across namespaces: $(ip netns exec gv-head ping -c 3 -q "$NODE_IP" | tail -1)" >&2

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
ip netns exec gv-head "$RAY" start --head --node-ip-address="$HEAD_IP" --port="$PORT" --num-cpus=1 \
    --include-dashboard=false --disable-usage-stats >/dev/null
ip netns exec gv-node "$RAY" start --address="$HEAD_IP:$PORT" --node-ip-address="$NODE_IP" --num-cpus=1 \
    --disable-usage-stats >/dev/null
ip netns exec gv-head env RAY_NODE_IP_ADDRESS="$HEAD_IP" "$PY" benchmarks/scaling.py "$MODEL" --k 1 --workers 1,2 \
    --ray-address "$HEAD_IP:$PORT" --label "netns, ${DELAY} ms each way" "$@"
