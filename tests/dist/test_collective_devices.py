"""Every collective fr_dist issues takes tensors on the process group's device (NCCL refuses CPU ones).

NCCL fails on a CPU tensor ("No backend type associated with device type cpu"), and these CPU-only
tests cannot start NCCL. Comparing each tensor's device with the runtime's choice catches nothing
on the CPU either: a tensor made without ``device=`` is on the CPU, which *is* the runtime's device
here. So the audit tracks *why* a tensor is on the CPU. A ``TorchFunctionMode`` (the mechanism of
``torch.set_default_device``) marks every tensor a factory made without ``device=`` (``torch.tensor``,
``torch.zeros``, ...) or ``.cpu()`` moved to the host, and every tensor computed only from marked
ones (views, clones, ``*_like``, arithmetic); ``.to(device)`` / ``device=`` unmark. A marked tensor
is on the CPU only because the CPU is torch's default device: on a GPU run it would still be on
the CPU. The collectives (``torch.distributed``'s, as ``fr_dist.comm`` calls them) are wrapped to
check that every tensor they get equals ``comm.device_of(group)`` and the runtime's device, and is
not marked.

A static check (every ``torch.tensor(...)`` in a module that calls collectives has ``device=``)
was the alternative; it flags CPU-only tensors that never reach a collective and misses a marked
tensor that reaches one through a view or a helper (the shape handshake's ``meta.unsqueeze(0)``),
so the audit follows the tensors of a real run instead: two training steps with a checkpoint on 2
gloo ranks, a resume from it (rank 0 broadcasts the step), the doctor's probe, and (slow) the
DeepSpeed consolidation of a ZeRO-1 checkpoint.
"""

from __future__ import annotations

import sys
import traceback
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_flatten, tree_map

from fr_dist.testing import spawn_gloo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_trainer import _overrides, _register_flat  # noqa: E402

pytestmark = pytest.mark.dist

TINY_DATA = dict(num_identities=16, seed=3)  # the conftest's tiny_data fixture

_FACTORIES = _device_constructors()  # torch.tensor, zeros, ones, empty, full, arange, rand*, ...


def _tensors(tree) -> list:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class HostTensors(TorchFunctionMode):
    """Marks tensors that are on the CPU only because the CPU is torch's default device."""

    def __init__(self):
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, t: torch.Tensor) -> None:
        key, marked = id(t), self._marked
        marked[key] = weakref.ref(t, lambda _ref: marked.pop(key, None))

    def _placement(self, func, args, kwargs):
        """True: on the host by default; False: placed on a device on purpose; None: follows the inputs."""
        if func is torch.Tensor.cpu:
            return True
        if func in _FACTORIES:
            return kwargs.get("device") is None
        if kwargs.get("device") is not None or func is torch.Tensor.cuda:
            return False
        if func is torch.Tensor.to and len(args) > 1:
            dest = args[1]
            if isinstance(dest, torch.Tensor):  # .to(other): other's device
                return self.is_host(dest)
            if isinstance(dest, (torch.device, str, int)):
                return False
        return None  # new_* / *_like without device=, arithmetic, views: the inputs' placement

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs, outs = _tensors((args, kwargs)), _tensors(out)
        placed = self._placement(func, args, kwargs)
        if placed is False and any(self.is_host(t) and any(t is i for i in inputs) for t in outs):
            # .to(device) of a tensor already there returns it: return an unmarked alias instead
            return tree_map(lambda t: t.view_as(t) if isinstance(t, torch.Tensor) else t, out)
        if placed is None:  # computed from its inputs: on the host when all of them are
            placed = bool(inputs) and all(self.is_host(t) for t in inputs)
        if placed:
            for t in outs:
                if not any(t is i for i in inputs):  # an in-place result keeps its own placement
                    self._mark(t)
        return out


class CollectiveAudit:
    """Wraps the collectives ``fr_dist.comm`` issues; records every tensor not on the group's device."""

    def __init__(self, runtime_device: torch.device):
        self.device = runtime_device
        self.tracker = HostTensors()
        self.calls: list[str] = []
        self.problems: list[str] = []
        self._saved: list = []

    def _caller(self) -> str:
        here, comm_file = Path(__file__).name, "fr_dist/comm.py"
        for fs in reversed(traceback.extract_stack()[:-3]):
            f = fs.filename.replace("\\", "/")
            if "fr_dist/" in f and not f.endswith(comm_file) and not f.endswith(here):
                return f"{f[f.rindex('fr_dist/') :]}:{fs.lineno} ({fs.name})"
        return "?"

    def _wrap(self, kind, real):
        def checked(*args, **kwargs):
            from fr_dist import comm

            expected = comm.device_of(kwargs.get("group"))
            where = self._caller()
            self.calls.append(f"{kind} from {where}")
            for t in _tensors((args, kwargs)):
                if t.device != expected or t.device != self.device:
                    self.problems.append(f"{kind} from {where}: tensor on {t.device}, group needs {expected}")
                elif self.tracker.is_host(t):
                    self.problems.append(
                        f"{kind} from {where}: {tuple(t.shape)} {t.dtype} tensor made without device= "
                        "(on the CPU whatever device the runtime chose; NCCL refuses it)"
                    )
            return real(*args, **kwargs)

        return checked

    def __enter__(self):
        from fr_dist import comm

        for owner, attr in (
            (dist, "all_reduce"),
            (dist, "broadcast"),
            (dist, "all_gather_into_tensor"),
            (dist, "reduce_scatter_tensor"),
            (comm, "_all_gather_single"),
            (comm, "_reduce_scatter_single"),
        ):
            real = getattr(owner, attr, None)
            if real is not None:
                self._saved.append((owner, attr, real))
                setattr(owner, attr, self._wrap(attr.strip("_"), real))
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        self.tracker.__exit__(*exc)
        for owner, attr, real in reversed(self._saved):
            setattr(owner, attr, real)
        self._saved.clear()
        return False


def _audited_run(rank, world, overrides, resume_overrides, probe):
    from fr_dist import doctor
    from fr_dist.runtime import init_distributed
    from fr_dist.train.config_load import load_config
    from fr_dist.train.run import build_trainer

    _register_flat()
    env, device = init_distributed("cpu")  # the group is up (spawn_gloo): this rank's env and device
    audit = CollectiveAudit(device)
    # modules are built outside the audit (their CPU parameters move with .to(device)); the
    # collectives of training, checkpointing and resuming all run inside it
    trainer = build_trainer(load_config(None, overrides), env, device)
    with audit:
        first = trainer.fit()
    resumed = build_trainer(load_config(None, resume_overrides), env, device)
    with audit:
        second = resumed.fit()
        if probe:
            doctor.bench_collectives([64], iters=1, warmup=0, device=None)
    return dict(steps=(first["step"], second["step"]), calls=audit.calls, problems=audit.problems)


def _check(results, min_calls):
    for r in results:
        assert r["steps"] == (2, 3), r["steps"]
        names = "\n".join(r["calls"])
        for caller in min_calls:
            assert caller in names, f"no collective from {caller}:\n{names}"
    problems = sorted({p for r in results for p in r["problems"]})
    assert not problems, "collective tensors not on the group's device:\n" + "\n".join(problems)


def _ovs(data, out, **extra):
    base = dict(
        {"train.max_steps": 2, "checkpoint.every": 2, "checkpoint.keep": 0, "train.log_every": 1}, **extra
    )
    return (
        _overrides(data, out, **base),
        _overrides(data, out, **dict(base, **{"train.max_steps": 3, "checkpoint.resume": "auto"})),
    )


@pytest.mark.parametrize("head", ["sphereface2", "partial_fc"])
def test_collectives_take_tensors_on_the_group_device(tiny_data, tmp_path, head):
    first, second = _ovs(tiny_data, tmp_path / head, **{"head.name": head})
    res = spawn_gloo(_audited_run, 2, args=(first, second, head == "sphereface2"), timeout_s=240)
    _check(
        res,
        [
            "fr_dist/checkpoint/manager.py",  # resume broadcast + the save agreement
            "fr_dist/heads/",  # shape handshake, embeddings gather, loss
            "fr_dist/train/trainer.py",  # the stop-signal agreement
        ]
        + (["fr_dist/doctor.py"] if head == "sphereface2" else []),
    )


@pytest.mark.slow
def test_deepspeed_consolidation_takes_tensors_on_the_group_device(tiny_data, tmp_path):
    pytest.importorskip("deepspeed")
    first, second = _ovs(
        tiny_data, tmp_path, **{"engine": "deepspeed", "deepspeed.zero_stage": 1, "deepspeed.bf16": True}
    )
    res = spawn_gloo(_audited_run, 2, args=(first, second, False), timeout_s=300)
    _check(res, ["fr_dist/train/engines.py", "fr_dist/checkpoint/deepspeed.py", "fr_dist/checkpoint/manager.py"])


def test_audit_catches_a_tensor_made_without_device():
    """The audit itself: a flag made without device= is reported, one made with it is not."""
    audit = CollectiveAudit(torch.device("cpu"))
    seen = []

    def fake_all_reduce(t, *a, **k):  # no process group in this test: stands in for gloo
        seen.append(t)

    real = dist.all_reduce
    dist.all_reduce = fake_all_reduce
    try:
        with audit:
            dist.all_reduce(torch.tensor([1.0]).unsqueeze(0).clone())
            dist.all_reduce(torch.tensor([1.0], device=torch.device("cpu")))
            dist.all_reduce(torch.tensor([1.0]).to(torch.device("cpu")))
            dist.all_reduce(torch.zeros(2).to(torch.float64))
    finally:
        dist.all_reduce = real
    assert len(seen) == 4
    assert len(audit.problems) == 2, audit.problems
    assert all("made without device=" in p for p in audit.problems)
