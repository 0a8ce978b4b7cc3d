"""Run a function on W spawned gloo processes (CPU) and collect every rank's return value.

Used by the sharded == dense tests and the CPU benchmarks::

    results = spawn_gloo(my_fn, world_size=3, args=(case,))   # my_fn(rank, world_size, *args)

``my_fn`` must be importable (module level). Each rank initialises the default gloo group on a
free loopback port, runs ``my_fn``, writes its return value with ``torch.save`` and leaves with
``os._exit`` (torch 2.13 + gloo may abort at interpreter exit otherwise). An exception in any
rank is re-raised here with that rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

__all__ = ["free_port", "spawn_gloo"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir, timeout_s, threads):
    code = 0
    try:
        import torch.distributed as dist

        torch.set_num_threads(threads)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
        )
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        code = 1
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn_gloo(fn, world_size: int, args: tuple = (), timeout_s: float = 120.0, threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir, timeout_s, threads))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s + 60)
        for p in procs:
            if p.is_alive():
                p.kill()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
                results.append(None)
                continue
            rec = torch.load(path, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r}:\n{rec['error']}")
                results.append(None)
        if errors:
            raise RuntimeError("distributed run failed\n" + "\n".join(errors))
        return results
