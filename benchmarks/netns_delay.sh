#!/usr/bin/env bash
# What latency between machines costs: two Ray nodes of one core each, in two network
# namespaces joined by a link that delays every packet by DELAY_MS in each direction, then
# benchmarks/scaling.py with W=1,2 workers of k=1 core on that cluster.
#
#   sudo bash benchmarks/netns_delay.sh MODEL_OR_ARTIFACT DELAY_MS [--samples N] [--json F]
#
# The link is a veth pair with tc netem where the kernel has netem; where it has not ("Specified
# qdisc kind is unknown"), two TUN devices joined by benchmarks/delay_line.py, a user-space wire
# that holds each packet DELAY_MS (its forwarding thread runs on this machine's cores too).
# Needs root (ip netns, tc, /dev/net/tun). Everything it creates (namespaces, links, the delay
# line, Ray processes) is removed on exit, also after an error.
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

LINE_PID=
cleanup() {
    if [ -n "$LINE_PID" ]; then kill "$LINE_PID" 2>/dev/null || true; wait "$LINE_PID" 2>/dev/null || true; fi
    ip netns exec gv-head "$RAY" stop --force >/dev/null 2>&1 || true
    ip netns exec gv-node "$RAY" stop --force >/dev/null 2>&1 || true
    ip netns del gv-head 2>/dev/null || true
    ip netns del gv-node 2>/dev/null || true
}
trap cleanup EXIT
cleanup

ip netns add gv-head
ip netns add gv-node
for ns in gv-head gv-node; do ip -n "$ns" link set lo up; done
veth() {
    ip link add gv-h type veth peer name gv-n
    ip link set gv-h netns gv-head
    ip link set gv-n netns gv-node
    ip -n gv-head addr add "$HEAD_IP/24" dev gv-h
    ip -n gv-node addr add "$NODE_IP/24" dev gv-n
    ip -n gv-head link set gv-h up
    ip -n gv-node link set gv-n up
}
LINK="veth"
if [ "$DELAY" = "0" ]; then
    veth
elif veth && tc -n gv-head qdisc add dev gv-h root netem delay "${DELAY}ms" 2>/dev/null; then
    tc -n gv-node qdisc add dev gv-n root netem delay "${DELAY}ms"
    LINK="veth + netem"
else
    echo "this kernel has no netem qdisc (sch_netem): joining the namespaces by benchmarks/delay_line.py" >&2
    ip -n gv-head link del gv-h 2>/dev/null || true
    READY=$(mktemp -u)
    "$PY" benchmarks/delay_line.py --delay-ms "$DELAY" --ns "gv-head:gv-h:$HEAD_IP" \
        --ns "gv-node:gv-n:$NODE_IP" --ready "$READY" --seconds 3600 &
    LINE_PID=$!
    for _ in $(seq 100); do [ -e "$READY" ] && break; sleep 0.1; done
    [ -e "$READY" ] || { echo "the delay line did not come up" >&2; exit 2; }
    rm -f "$READY"
    LINK="tun + delay_line.py"
fi
# round trip of a TCP connect across the link (no ping needed): about twice DELAY_MS
ip netns exec gv-node "$PY" -c "import socket; s=socket.socket(); s.bind(('$NODE_IP', 6398)); s.listen(); s.accept()" &
LISTEN_PID=$!
sleep 0.5
RTT=$(ip netns exec gv-head "$PY" -c "
import socket, time
t = time.perf_counter(); socket.create_connection(('$NODE_IP', 6398), timeout=5).close()
print(round(1000 * (time.perf_counter() - t), 2))")
wait "$LISTEN_PID"
echo "link: $LINK, $DELAY ms each way; TCP connect round trip $RTT ms" >&2

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
ip netns exec gv-head "$RAY" start --head --node-ip-address="$HEAD_IP" --port="$PORT" --num-cpus=1 \
    --include-dashboard=false --disable-usage-stats >/dev/null
ip netns exec gv-node "$RAY" start --address="$HEAD_IP:$PORT" --node-ip-address="$NODE_IP" --num-cpus=1 \
    --disable-usage-stats >/dev/null
ip netns exec gv-head env RAY_NODE_IP_ADDRESS="$HEAD_IP" "$PY" benchmarks/scaling.py "$MODEL" --k 1 --workers 1,2 \
    --ray-address "$HEAD_IP:$PORT" --label "netns, ${DELAY} ms each way ($LINK; connect RTT $RTT ms)" "$@"
