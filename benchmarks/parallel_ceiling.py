#!/usr/bin/env python3
"""How much faster can two workers be on this machine, with no scheduler at all?

Runs the same single-threaded encrypted inference (single process, OMP_NUM_THREADS=1) once
alone, then twice at the same time in two processes, and prints the ratio: the speed-up that
two perfectly parallel workers could reach here. Shared caches and memory bandwidth of a
2-vCPU VM keep it below 2; compare `gravel bench --workers 1,2` against this, not against 2.

    python benchmarks/parallel_ceiling.py ARTIFACT --data mnist [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from gravel.tuning import backend_env

CHILD = r"""
import sys, time, warnings; warnings.filterwarnings("ignore")
from gravel.client import ClientModel
from gravel.server import ServerModel
from gravel.data import load_dataset
art, data = sys.argv[1], sys.argv[2]
c = ClientModel.load(art); s = ServerModel.load(art); k = c.keygen()
keys = s.load_evaluation_keys(k.evaluation_keys()); v = s.load_input(c.encrypt(k, load_dataset(data).x_test[0]))
s.run(keys, v)  # warm
print("READY", flush=True); sys.stdin.readline()
t = time.perf_counter(); s.run(keys, v); print(time.perf_counter() - t, flush=True)
"""


def run(n: int, artifact: str, data: str) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **backend_env()}  # as Ray workers get
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, artifact, data], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    for p in procs:
        while p.stdout.readline().strip() != "READY":
            pass
    for p in procs:  # start the timed runs together
        p.stdin.write("\n")
        p.stdin.flush()
    out = [float(p.stdout.readline()) for p in procs]
    for p in procs:
        p.wait()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    alone, pair = [], []
    for _ in range(args.repeat):
        alone.append(run(1, args.artifact, args.data)[0])
        pair.append(max(run(2, args.artifact, args.data)))
    a, p = statistics.median(alone), statistics.median(pair)
    print(json.dumps({"alone_s": a, "two_at_once_s": p, "two_worker_ceiling_speedup": 2 * a / p,
                      "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
