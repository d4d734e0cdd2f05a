"""benchmarks/delay_line.py, the user-space wire that delays packets between two network
namespaces (netns_delay.sh's link where the kernel has no netem): a real TUN pair, real TCP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2 (network namespaces)",
)

CONNECT = """
import socket, sys, time
times = []
for _ in range(3):
    t = time.perf_counter()
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    times.append(time.perf_counter() - t)
print(min(times) * 1000)
"""

SERVE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
for _ in range(3):
    s.accept()[0].close()
"""


def _round_trip_ms(delay_ms: float, tmp_path: Path) -> float:
    """The fastest of three TCP connects across a delay line of `delay_ms` each way."""
    tag = uuid.uuid4().hex[:6]
    ns = (f"gvt-a-{tag}", f"gvt-b-{tag}")
    ready = tmp_path / f"ready-{tag}"
    line = None
    try:
        for n in ns:
            subprocess.run(["ip", "netns", "add", n], check=True)
            subprocess.run(["ip", "-n", n, "link", "set", "lo", "up"], check=True)
        line = subprocess.Popen([sys.executable, str(BENCH / "delay_line.py"), "--delay-ms", str(delay_ms),
                                 "--ns", f"{ns[0]}:gvta{tag}:10.78.0.1", "--ns", f"{ns[1]}:gvtb{tag}:10.78.0.2",
                                 "--ready", str(ready), "--seconds", "60"], stderr=subprocess.PIPE, text=True)
        for _ in range(100):
            if ready.exists() or line.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), line.stderr.read() if line.poll() is not None else "delay line not ready"
        server = subprocess.Popen(["ip", "netns", "exec", ns[1], sys.executable, "-c", SERVE, "10.78.0.2", "6397"])
        time.sleep(0.5)
        out = subprocess.run(["ip", "netns", "exec", ns[0], sys.executable, "-c", CONNECT, "10.78.0.2", "6397"],
                             check=True, capture_output=True, text=True, timeout=30)
        server.wait(timeout=10)
        return float(out.stdout)
    finally:
        if line is not None:
            line.terminate()
            line.wait(timeout=10)
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], check=False, capture_output=True)


def test_a_connect_across_the_line_takes_two_delays(tmp_path):
    # a TCP connect is one round trip: SYN one way, SYN-ACK back
    fast = _round_trip_ms(0, tmp_path)
    slow = _round_trip_ms(15, tmp_path)
    assert slow >= 30 > fast, (fast, slow)
    assert slow < 30 + 200, slow  # not stuck behind anything else


def test_bad_arguments_are_refused():
    r = subprocess.run([sys.executable, str(BENCH / "delay_line.py"), "--delay-ms", "5", "--ns", "a:b:c"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 2 and "--ns must be given twice" in r.stderr
