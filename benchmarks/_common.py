"""What the benchmarks share: host facts, the JSON they write, device memory and synchronisation, the
plot set-up, spawning gloo ranks and the synthetic RecordIO set.

Imports only the standard library and torch (``benchmarks.gpu_calibrate`` must run where fr_dist's own
dependencies are missing: gpu_check.sh's dry run in a venv with torch and numpy alone).
"""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path

import torch

__all__ = [
    "args_record",
    "cuda_memory",
    "cuda_sync",
    "host_facts",
    "load_average",
    "median",
    "peak_rss_bytes",
    "pyplot",
    "save_figure",
    "spawn",
    "synthetic_recordio",
    "write_json_atomic",
]


# ----------------------------------------------------------------------------- host and process
def load_average() -> list:
    """The 1 / 5 / 15-minute load average (figures depend on the machine's load: recorded beside them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - no getloadavg on this platform
        return []


def host_facts() -> dict:
    """Where a figure was measured: node, CPU, core count, Python, torch, the CUDA device, load average."""
    return dict(
        node=platform.node(),
        machine=platform.machine(),
        processor=platform.processor(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        load_average=load_average(),
    )


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``, KiB on Linux) in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median(xs):
    """The upper median (an element of ``xs``: a measured time, never an average of two)."""
    xs = sorted(xs)
    return xs[len(xs) // 2]


# ----------------------------------------------------------------------------- device
def cuda_sync(device: torch.device) -> None:
    """Wait for the device's kernels (CUDA is asynchronous; nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_memory(device: torch.device) -> dict | None:
    """Device memory as the driver (``mem_get_info``) and torch's caching allocator see it (CUDA only)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return dict(
        free_bytes=int(free),
        total_bytes=int(total),
        reserved_bytes=int(torch.cuda.memory_reserved(device)),
        max_reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
        allocated_bytes=int(torch.cuda.memory_allocated(device)),
        max_allocated_bytes=int(torch.cuda.max_memory_allocated(device)),
        outside_allocator_bytes=int(total - free - torch.cuda.memory_reserved(device)),
    )


# ----------------------------------------------------------------------------- output
def args_record(a) -> dict:
    """An argparse namespace as JSON values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}


def write_json_atomic(path: Path, obj, default=str) -> None:
    """JSON to ``path`` via a temporary file + rename: a reader (or a cut run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=default) + "\n")
    os.replace(tmp, path)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (said once) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def save_figure(fig, out: Path, dpi: int = 100) -> Path:
    """``fig`` as the PNG beside the JSON ``out`` (same stem), then closed."""
    import matplotlib.pyplot as plt

    png = Path(out).with_suffix(".png")
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    print(f"plot: {png}")
    return png


# ----------------------------------------------------------------------------- processes and data
def _call(rank: int, world: int, fn, kwargs: dict):
    return fn(rank, world, **kwargs)


def spawn(fn, world: int, threads: int = 1, timeout_s: float = 3600.0, **kwargs) -> list:
    """``fn(rank, world, **kwargs)`` on ``world`` spawned gloo ranks of ``threads`` torch threads each
    (:func:`fr_dist.testing.spawn_gloo`: free loopback port, clean exit); every rank's return value."""
    from fr_dist.testing import spawn_gloo

    return spawn_gloo(_call, world, args=(fn, kwargs), timeout_s=timeout_s, threads=max(1, threads))


def synthetic_recordio(out: Path, identities: int, per_identity: int) -> Path:
    """``out/train.rec`` of a synthetic face-identity set (fr_dist.data.synthetic, seed 0, no held-out
    pairs), generated once: a folder with its ``.complete`` marker is reused."""
    out = Path(out)
    rec = out / "train.rec"
    if (out / ".complete").exists():
        return rec
    from fr_dist.data import make_synthetic_dataset

    make_synthetic_dataset(
        out,
        num_identities=identities,
        images_per_identity=per_identity,
        heldout_identities=0,
        heldout_pairs=0,
        seed=0,
        progress=False,
    )
    (out / ".complete").write_text("ok\n")
    return rec
