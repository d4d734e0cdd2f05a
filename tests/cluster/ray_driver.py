"""Drives one Ray scenario in its own process and prints one JSON line.

Run in a subprocess by the tests: a process that both drives Ray and runs concrete can abort
at interpreter exit, which must not take pytest down with it. The decrypted results of
distributed and single-process runs are compared; their ciphertext bytes differ in noise
(concrete's numerics differ inside a Ray worker process, even for a whole unsharded run).
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore")


def main() -> None:
    import numpy as np
    import ray

    from gravel.client import ClientModel
    from gravel.cluster import ClusterError, RayExecutor
    from gravel.data import load_dataset
    from gravel.errors import GravelError
    from gravel.server import ServerModel

    scenario, artifact = sys.argv[1], sys.argv[2]
    address = sys.argv[3] if len(sys.argv) > 3 else None
    result: dict = {"scenario": scenario}
    if scenario == "bad-address":
        t = time.time()
        try:
            RayExecutor(artifact, address="127.0.0.1:1")
        except ClusterError as exc:
            result.update(error=str(exc), seconds=time.time() - t)
        print(json.dumps(result))
        return
    if address:
        ray.init(address=address, log_to_driver=False, _node_ip_address="127.0.0.1")
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    data = load_dataset("digits")
    client = ClientModel.load(artifact)
    keys = client.keygen()
    ek = keys.evaluation_keys()
    if scenario == "no-free-cpus":
        t = time.time()
        try:
            RayExecutor(artifact, workers=5)
        except ClusterError as exc:
            result.update(error=str(exc), seconds=time.time() - t)
        print(json.dumps(result))
        return
    executor = RayExecutor(artifact, workers=2)
    session = executor.open_session(ek)
    cts = [client.encrypt(keys, data.x_test[i]) for i in range(2)]
    if scenario in ("basic", "multinode"):
        server = ServerModel.load(artifact)
        outs = []
        for ct in cts:
            out, trace = executor.infer(session, ct)
            again, _ = executor.infer(session, ct)
            ref, _ = server.run_bytes(ek, ct)
            outs.append({
                "repeat_bytes_equal": out == again,
                "decrypted_equal": bool(np.array_equal(client.decrypt(keys, out), client.decrypt(keys, ref))),
                "nodes": sorted(trace.nodes),
                "workers": sorted({r.worker for r in trace.shards}),
                "trace": trace.to_json(),
            })
        result["runs"] = outs
        result["worker_stats"] = executor.worker_stats()
        result["mode"] = executor.mode
        # a queue of four requests on two workers: whole inferences side by side
        many, many_trace, result["many_mode"] = executor.infer_many(session, cts * 2)
        refs = [client.decrypt(keys, server.run_bytes(ek, ct)[0]) for ct in cts * 2]
        result["many_equal"] = all(np.array_equal(client.decrypt(keys, o), r) for o, r in zip(many, refs))
        result["many_workers"] = sorted({r.worker for r in many_trace.shards})
        result["many_stages"] = sorted({r.stage for r in many_trace.shards})
        try:
            executor.open_session(b"GRVL" + bytes([1, 1]) + b"\x07" * 32 + b"x")
        except GravelError as exc:
            result["foreign_keys_error"] = str(exc)
    elif scenario == "kill-worker":
        server = ServerModel.load(artifact)
        ref = client.decrypt(keys, server.run_bytes(ek, cts[0])[0])
        executor.infer(session, cts[1])  # warm: workers hold the session's keys
        box: dict = {}

        def run():
            box["out"], box["trace"] = executor.infer(session, cts[0])

        thread = threading.Thread(target=run)
        thread.start()
        while not any(executor._busy.values()):
            time.sleep(0.001)
        busy = next(i for i, n in executor._busy.items() if n)
        executor.kill_worker(busy)
        thread.join(timeout=240)
        result.update(
            killed=busy,
            finished=not thread.is_alive(),
            retries=box["trace"].retries,
            decrypted_equal=bool(np.array_equal(client.decrypt(keys, box["out"]), ref)),
        )
    elif scenario == "timeout":
        executor.shard_timeout_s = 0.0
        t = time.time()
        try:
            executor.infer(session, cts[0])
        except ClusterError as exc:
            result.update(error=str(exc), seconds=time.time() - t)
    executor.shutdown()
    if scenario == "basic":  # one worker: the whole network in one backend call, on both cores
        time.sleep(1.0)
        one = RayExecutor(artifact, workers=1)
        session = one.open_session(ek)
        out, trace = one.infer(session, cts[0])
        result["one_worker"] = {
            "mode": one.mode, "threads": one.threads_per_worker, "calls": len(trace.shards),
            "decrypted_equal": bool(np.array_equal(client.decrypt(keys, out), refs[0])),
        }
        one.shutdown()
    ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (see module docstring)
