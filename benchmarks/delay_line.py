"""A delaying wire between two network namespaces, for kernels without the netem qdisc.

    python benchmarks/delay_line.py --delay-ms 10 --ns gv-head:gv-h:10.77.0.1 --ns gv-node:gv-n:10.77.0.2

Opens two TUN devices (layer 3, no packet information header), moves each into its namespace
with its address and the other's as point-to-point peer, then forwards every packet that one
namespace sends to the other after DELAY_MS, in each direction (so a round trip takes twice
that, as netem on both ends of a veth would). Packets keep their order; none is dropped on
purpose. Runs until SIGTERM/SIGINT or `--seconds`; the devices vanish with the process.

`benchmarks/netns_delay.sh` uses it where `tc ... netem` is refused ("Specified qdisc kind is
unknown": the kernel was built without sch_netem, as on the 2-core VMs of this project). One
Python thread moves all packets: with a 64 kB MTU that is far more than Ray's traffic of keys
and ciphertexts needs, and it costs that CPU time on the same machine (the JSON of a run says
so in its label).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MTU = 65000  # large segments: fewer packets for one Python thread to move


def open_tun(name: str) -> int:
    """A TUN device named `name`; the returned descriptor reads what the kernel routes to it
    and injects what is written to it."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def place(dev: str, ns: str, addr: str, peer: str) -> None:
    """Move `dev` into namespace `ns` with `addr`, `peer` at the other end, and bring it up."""
    for cmd in (["ip", "link", "set", dev, "netns", ns],
                ["ip", "-n", ns, "addr", "add", addr, "peer", peer, "dev", dev],
                ["ip", "-n", ns, "link", "set", dev, "mtu", str(MTU), "up"]):
        subprocess.run(cmd, check=True)


def forward(fds: tuple[int, int], delay_s: float, until: float) -> dict[str, int]:
    """Move packets between the two devices, each held `delay_s`, until `until` (monotonic)
    or a signal; returns the packet and byte counts per direction."""
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    queues: dict[int, collections.deque[tuple[float, bytes]]] = {fd: collections.deque() for fd in fds}
    other = {fds[0]: fds[1], fds[1]: fds[0]}
    counts = {"a_to_b_packets": 0, "b_to_a_packets": 0, "a_to_b_bytes": 0, "b_to_a_bytes": 0}
    while not stop and time.monotonic() < until:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - now) if due else 0.5
        try:
            ready, _, _ = select.select(list(fds), [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in ready:
            while True:
                try:
                    packet = os.read(fd, MTU + 64)
                except BlockingIOError:
                    break
                queues[other[fd]].append((now + delay_s, packet))
                key = "a_to_b" if fd == fds[0] else "b_to_a"
                counts[f"{key}_packets"] += 1
                counts[f"{key}_bytes"] += len(packet)
        now = time.monotonic()
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                _, packet = queue.popleft()
                try:
                    os.write(fd, packet)
                except BlockingIOError:
                    queue.appendleft((now, packet))  # the device's queue is full: try again soon
                    break
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay-ms", type=float, required=True, help="delay of each packet, each way")
    ap.add_argument("--ns", action="append", required=True, metavar="NAMESPACE:DEVICE:ADDRESS",
                    help="twice: each end's namespace (already made), device name and address")
    ap.add_argument("--seconds", type=float, default=3600.0, help="stop after this long at most")
    ap.add_argument("--ready", help="file to create once both devices are up")
    args = ap.parse_args()
    if len(args.ns) != 2 or any(s.count(":") != 2 for s in args.ns):
        ap.error("--ns must be given twice, each as NAMESPACE:DEVICE:ADDRESS")
    if not 0 <= args.delay_ms <= 10_000:
        ap.error(f"--delay-ms must be between 0 and 10000, got {args.delay_ms}")
    (ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b) = (s.split(":") for s in args.ns)
    fds = (open_tun(dev_a), open_tun(dev_b))
    place(dev_a, ns_a, ip_a, ip_b)
    place(dev_b, ns_b, ip_b, ip_a)
    if args.ready:
        open(args.ready, "w").close()
    counts = forward(fds, args.delay_ms / 1000.0, time.monotonic() + args.seconds)
    print(f"delay line {args.delay_ms} ms: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
