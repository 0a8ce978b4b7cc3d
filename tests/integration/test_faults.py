"""Faults, bad input and hostile files: every failure ends with a clear message, never a hang.

Unit-sized checks (malicious checkpoint / .bin, damaged newest checkpoint, failed save, timeouts
naming the collective) run in-process or on spawned gloo ranks; the launcher-level faults
(SIGTERM to torchrun, SIGSTOP of a rank, SIGKILL during a save) run the real CLI in subprocesses.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fr_dist.testing import spawn_gloo

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import _full_head, _overrides, _register_flat, _train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURE_V1 = REPO / "tests" / "fixtures" / "ckpt_v1"
PY = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


TINY_DATA = dict(
    num_identities=12, images_per_identity=4, heldout_identities=4, heldout_pairs=8, seed=7
)  # the conftest's tiny_data fixture


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- hostile files


def test_malicious_checkpoint_is_refused_not_run(tmp_path):
    from fr_dist.export import load_exported
    from fr_dist.train import checkpoint as ckpt

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "model": _Evil(marker)}, evil)
    with pytest.raises(ckpt.CheckpointError, match=r"evil\.pt: refused.*weights_only=True"):
        ckpt.safe_load(evil)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt"):
        load_exported(evil)
    # as a file of a checkpoint folder picked by resume / export / eval
    folder = tmp_path / "run" / "checkpoints" / "5"
    folder.mkdir(parents=True)
    torch.save(_Evil(marker), folder / "backbone.pt")
    (folder / "config.yaml").write_text((FIXTURE_V1 / "config.yaml").read_text())
    (folder / "meta.json").write_text(json.dumps({"step": 5}))
    from fr_dist.export import load_backbone_from_checkpoint

    with pytest.raises(ckpt.CheckpointError, match="backbone.pt: refused"):
        load_backbone_from_checkpoint(tmp_path / "run")
    assert not marker.exists()


def test_v1_fixture_checkpoint_still_loads(tmp_path):
    """A checkpoint written by the code before safe loading (numpy RNG state as ndarray) loads."""
    from fr_dist.runtime import DistEnv
    from fr_dist.train import checkpoint as ckpt
    from fr_dist.train.config_load import load_config
    from fr_dist.train.run import build_trainer

    assert ckpt.verify_checkpoint(FIXTURE_V1) is None  # no file list: zip CRCs are checked
    from fr_dist.data import make_synthetic_dataset

    make_synthetic_dataset(
        tmp_path / "syn",
        num_identities=6,
        images_per_identity=4,
        heldout_identities=2,
        heldout_pairs=4,
        seed=3,
    )
    cfg = load_config(
        FIXTURE_V1 / "config.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.rec={tmp_path / 'syn' / 'train.rec'}",
            "train.tensorboard=false",
        ],
    )
    tr = build_trainer(cfg, DistEnv(), torch.device("cpu"))
    tr.load_checkpoint(FIXTURE_V1)
    assert tr.step == 2
    saved = ckpt.safe_load(FIXTURE_V1 / "backbone.pt")
    for k, v in tr.bb.bare.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    rng = ckpt.safe_load(FIXTURE_V1 / "rng_rank0.pt")
    assert isinstance(rng["numpy"][1], np.ndarray)  # the old layout, admitted by the allowlist


def test_evil_bin_is_refused_not_run(tmp_path):
    from fr_dist.data.pairs import read_bin

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([b"\xff\xd8a", _Evil(marker)], [True])))
    with pytest.raises(
        ValueError, match=r"evil\.bin: not a safe insightface \.bin.*refused global posix\.system"
    ):
        read_bin(evil)
    assert not marker.exists()
    r = subprocess.run(
        [PY, "-m", "fr_dist.cli", "eval", "--checkpoint", str(FIXTURE_V1), "--bin", str(evil)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "refused global" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


def test_bin_with_numpy_arrays_is_admitted(tmp_path):
    """issame as a numpy bool array and images as uint8 arrays (as some real files hold them)."""
    from fr_dist.data.pairs import read_bin

    imgs = [np.frombuffer(b"\xff\xd8" + bytes([i]), dtype=np.uint8) for i in range(4)]
    for proto in (2, 4):
        p = tmp_path / f"np{proto}.bin"
        p.write_bytes(pickle.dumps((imgs, np.array([True, False])), protocol=proto))
        bins, issame = read_bin(p)
        assert bins == [bytes(x) for x in imgs] and issame == [True, False]


def test_corrupt_and_one_class_bin(tmp_path):
    from fr_dist.data.pairs import write_bin

    (tmp_path / "trunc.bin").write_bytes(pickle.dumps(([b"a", b"b"], [True]))[:-5])
    write_bin(tmp_path / "same.bin", [b"\xff\xd8a"] * 4, [True, True])
    for name, words in (
        ("trunc.bin", "not an insightface .bin pair file"),
        ("same.bin", "all 2 pairs are genuine"),
    ):
        r = subprocess.run(
            [PY, "-m", "fr_dist.cli", "eval", "--checkpoint", str(FIXTURE_V1), "--bin", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and name in r.stderr and words in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------------------- runtime / config


def test_device_cuda_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from fr_dist.runtime import select_device
    from fr_dist.train.config import ConfigError

    with pytest.raises(ConfigError, match="device=cuda but this machine has"):
        select_device(0, "cuda")


def test_metrics_truncated_after_resume(tmp_path):
    from fr_dist.train.logging import MetricsLogger

    log = MetricsLogger(tmp_path, 0, tensorboard=False)
    for s in range(1, 8):
        log.log(s, loss=float(s))
    log.file.write('{"step": 8, "lo')  # a torn last line of a crash
    log.file.flush()
    assert log.truncate_after(4) == 4
    log.log(5, loss=0.5)
    log.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


_TIMEOUT_SCRIPT = """
import datetime, os, sys, time, torch, torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout
from fr_dist import comm
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
_set_pg_timeout(datetime.timedelta(seconds=3))
comm.set_timeout_info(3, "dist.timeout_s")
if rank == 1:
    time.sleep(8)  # a hung rank
    os._exit(0)
try:
    comm.all_reduce(torch.ones(3), name="stop_flag")
except comm.CollectiveTimeout as e:
    print(e, flush=True)
os._exit(0)
"""


@pytest.mark.dist
def test_collective_timeout_names_collective_rank_and_key():
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [PY, "-c", _TIMEOUT_SCRIPT, str(r), port], stdout=subprocess.PIPE, text=True, env=_env()
        )
        for r in range(2)
    ]
    msg = procs[0].communicate(timeout=120)[0]
    procs[1].communicate(timeout=120)
    assert "all_reduce 'stop_flag'" in msg and "group of 2 ranks" in msg, msg
    assert "rank 1 did not answer" in msg and "dist.timeout_s" in msg and "3 s" in msg, msg


# ----------------------------------------------------------------------------- checkpoints


def test_damaged_newest_checkpoint_falls_back(tiny_data, tmp_path, capsys):
    _register_flat()
    ov = _overrides(
        tiny_data, tmp_path, **{"train.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep": 0}
    )
    _train(0, 1, ov)
    shard = tmp_path / "checkpoints" / "4" / "head_rank0.pt"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, meta.json still there
    (tmp_path / "checkpoints" / ".tmp-6").mkdir()  # and a partial save of a killed run
    capsys.readouterr()
    res = _train(0, 1, ov + ["checkpoint.resume=auto", "train.max_steps=5"])
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "head_rank0.pt has" in out and "truncated" in out, out
    assert "checkpoints/2 at step 2" in out, out
    assert "removing the partial" in out and not (tmp_path / "checkpoints" / ".tmp-6").exists()
    assert res["step"] == 5
    steps = [m["step"] for m in res["metrics"]]
    assert steps == sorted(set(steps)), steps  # no repeated steps in metrics.jsonl after the resume


def _train_failing_save(rank, world, overrides, fail_rank, err):
    from fr_dist.train import checkpoint as ckpt

    real = ckpt.atomic_save

    def failing(obj, path):
        if rank == fail_rank and ".tmp-4" in str(path):
            raise OSError(err, os.strerror(err), str(path))
        return real(obj, path)

    ckpt.atomic_save = failing
    try:
        _train(rank, world, overrides)
    except ckpt.CheckpointError as e:
        return str(e)
    return "saved"


@pytest.mark.dist
@pytest.mark.parametrize("err,words", [(errno.ENOSPC, "disk full"), (errno.EACCES, "not writable")])
def test_failed_save_cleans_up_and_reports(tiny_data, tmp_path, err, words):
    """A full / unwritable output dir (simulated: OSError from the writes of rank 1 at step 4)."""
    from fr_dist.train import checkpoint as ckpt

    ov = _overrides(
        tiny_data, tmp_path, **{"train.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep": 0}
    )
    res = spawn_gloo(_train_failing_save, 2, args=(ov, 1, err), timeout_s=120)
    assert words in res[1] and ".tmp-4" in res[1] and "NOT saved" in res[1], res
    assert "another rank failed" in res[0], res  # rank 0 did not wait forever: it knows why
    assert "checkpoints/2 (intact)" in res[0]
    assert not ckpt.tmp_dir(tmp_path, 4).exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["2"]
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "2") is None


def test_resume_with_other_head_or_size_is_refused(tiny_data, tmp_path):
    from fr_dist.train.checkpoint import CheckpointError

    _register_flat()
    ov = _overrides(tiny_data, tmp_path, **{"train.max_steps": 2, "checkpoint.every": 2})
    _train(0, 1, ov)
    with pytest.raises(CheckpointError, match="head.name=sphereface2, the config has head.name=partial_fc"):
        _train(0, 1, ov + ["checkpoint.resume=auto", "head.name=partial_fc", "train.max_steps=3"])
    with pytest.raises(CheckpointError, match="embedding_size=16, the config gives 8"):
        _train(0, 1, ov + ["checkpoint.resume=auto", "model.embedding_size=8", "train.max_steps=3"])
    with pytest.raises(CheckpointError, match="num_classes=12, the config gives 20"):
        _train(0, 1, ov + ["checkpoint.resume=auto", "data.num_classes=20", "train.max_steps=3"])


@pytest.mark.dist
@pytest.mark.slow
def test_resume_2_then_1_then_3_ranks_equals_uninterrupted(tiny_data, tmp_path):
    """Global batch 12 on 2, 1 and 3 ranks (BN-free net): the chain equals the uninterrupted 2-rank run."""
    common = {"train.max_steps": 9, "train.momentum": 0.9, "checkpoint.every": 3, "checkpoint.keep": 0}
    full = spawn_gloo(
        _train, 2, args=(_overrides(tiny_data, tmp_path / "full", **{**common, "data.batch_size": 6}),)
    )
    chain = tmp_path / "chain"
    for world, stop in ((2, 3), (1, 6), (3, 9)):
        ov = _overrides(tiny_data, chain, **{**common, "data.batch_size": 12 // world})
        res = spawn_gloo(_train, world, args=(ov + ["checkpoint.resume=auto"], stop))
        assert res[0]["step"] == stop
    for k, v in full[0]["backbone"].items():
        torch.testing.assert_close(res[0]["backbone"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(_full_head(res), _full_head(full), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_wrong_image_size_and_empty_dataset(tmp_path):
    from fr_dist.data.image import encode_jpeg
    from fr_dist.data.loader import RecordDataset
    from fr_dist.data.recordio import RecordIOError, write_dataset
    from fr_dist.train.config import ConfigError, validate_against_dataset
    from fr_dist.train.config_load import load_config
    from fr_dist.train.run import dataset_num_classes

    imgs = [
        (0, encode_jpeg(np.zeros((112, 112, 3), np.uint8))),
        (1, encode_jpeg(np.zeros((96, 96, 3), np.uint8))),
    ]
    rec = write_dataset(tmp_path / "odd", imgs, num_classes=2)
    ds = RecordDataset(rec)
    ds.load(0, False)
    with pytest.raises(
        RecordIOError, match=r"train.rec.*image is 96x96 but the dataset's property file says 112x112"
    ):
        ds.load(1, False)
    # model.input_size=96 resizes the (uniform) dataset deliberately
    assert RecordDataset(rec, image_size=(96, 96)).load(0, False)[0].shape == (3, 96, 96)
    # an empty dataset
    empty = write_dataset(tmp_path / "empty", [], num_classes=0)
    cfg = load_config(None, [f"data.rec={empty}"])
    with pytest.raises(ConfigError, match="has no classes"):
        k, _ = dataset_num_classes(str(empty))
        validate_against_dataset(cfg, k, k - 1)


def test_input_size_96_trains(tiny_data, tmp_path):
    from fr_dist.runtime import DistEnv
    from fr_dist.train.config_load import load_config
    from fr_dist.train.run import build_trainer

    ov = _overrides(
        tiny_data, tmp_path, **{"train.max_steps": 2, "model.name": "iresnet", "model.input_size": 96}
    )
    ov.append("model.kwargs={layers: [1, 1, 1, 1], width: 4, stem_stride: 2}")
    tr = build_trainer(load_config(None, ov), DistEnv(), torch.device("cpu"))
    assert tr.fit()["step"] == 2


def test_epochs_not_cut_short_by_grad_accum(tiny_data, tmp_path):
    from fr_dist.runtime import DistEnv
    from fr_dist.train.config_load import load_config
    from fr_dist.train.run import build_trainer

    _register_flat()
    ov = _overrides(tiny_data, tmp_path, **{"train.max_steps": 0, "train.epochs": 3, "train.grad_accum": 5})
    tr = build_trainer(load_config(None, ov), DistEnv(), torch.device("cpu"))
    batches = len(tr.loader)  # 48 images / 4 = 12 per epoch: 36 micro-batches = 7 steps (was 3 x 2 = 6)
    assert tr.total_steps == 3 * batches // 5


# ----------------------------------------------------------------------------- launcher-level faults


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_args(data: Path, out: Path, **extra) -> list[str]:
    base = {
        "output_dir": out,
        "device": "cpu",
        "data.rec": data / "train.rec",
        "data.synthetic.generate": "false",
        "data.batch_size": 4,
        "data.num_workers": 1,
        "model.name": "iresnet",
        "model.embedding_size": 16,
        "model.kwargs": "{layers: [1, 1, 1, 1], width: 4, stem_stride: 2}",
        "train.max_steps": 100000,
        "train.warmup_steps": 0,
        "train.log_every": 2,
        "train.tensorboard": "false",
        "eval.bins": "[]",
        "checkpoint.save_at_end": "false",
    }
    base.update(extra)
    return ["train", "--config", str(REPO / "configs" / "demo_cpu.yaml")] + [
        f"{k}={v}" for k, v in base.items()
    ]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("FR_DIST_WORKER_START", None)  # the production start method
    env.update(extra)
    return env


def _wait_for_steps(out: Path, n: int, procs, timeout: float = 180) -> None:
    end = time.time() + timeout
    m = out / "metrics.jsonl"
    while time.time() < end:
        if m.is_file() and len(m.read_text().splitlines()) >= n:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited before training started")
        time.sleep(0.2)
    raise AssertionError(f"no {n} logged steps within {timeout} s")


@pytest.mark.dist
@pytest.mark.slow
def test_sigterm_to_torchrun_with_workers_checkpoints_and_exits_0(tiny_data, tmp_path):
    if not Path(TORCHRUN).exists():
        pytest.skip("torchrun not found beside the interpreter")
    out = tmp_path / "run"
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115
    p = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "fr_dist.cli"] + _cli_args(tiny_data, out),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=REPO,
    )
    try:
        _wait_for_steps(out, 2, [p])
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    text = (tmp_path / "log.txt").read_text()
    assert "stopped by signal SIGTERM, checkpoint at step" in text, text[-3000:]
    step = int(text.split("checkpoint at step ")[1].split()[0])
    assert (out / "checkpoints" / str(step) / "meta.json").is_file()
    assert "is killed by signal" not in text and "Traceback" not in text.split("stopped by signal")[0], text[
        -3000:
    ]
    # the ranks exit 0; torchrun itself re-raises the signal it received (torch's SignalException)
    assert "exitcode  : 1" not in text and "ChildFailedError" not in text, text[-3000:]
    print(f"torchrun exit code after SIGTERM: {rc}")


def _launch_ranks(args: list[str], world: int, tmp_path: Path, **env) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for r in range(world):
        e = _env(
            RANK=str(r),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(r),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        e.update(env)
        log = open(tmp_path / f"rank{r}.txt", "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [PY, "-m", "fr_dist.cli"] + args, stdout=log, stderr=subprocess.STDOUT, env=e, cwd=REPO
            )
        )
    return procs


@pytest.mark.dist
@pytest.mark.slow
def test_stopped_rank_makes_the_others_exit_naming_the_collective(tiny_data, tmp_path):
    out = tmp_path / "run"
    procs = _launch_ranks(_cli_args(tiny_data, out, **{"dist.timeout_s": 10}), 2, tmp_path)
    try:
        _wait_for_steps(out, 2, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        rc0 = procs[0].wait(timeout=120)  # bounded by dist.timeout_s (10 s), not a hang
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = (tmp_path / "rank0.txt").read_text()
    assert rc0 == 1, text[-3000:]
    assert "CollectiveTimeout" in text and "timed out after 10 s" in text, text[-3000:]
    assert "rank 1 did not answer" in text and "dist.timeout_s" in text, text[-3000:]
    assert "is killed by signal" not in text, text[-3000:]


_KILL_AT_SAVE = """
import os, signal, sys
from fr_dist.train import checkpoint as ckpt
real = ckpt.atomic_save
def dying(obj, path):
    if ".tmp-4" in str(path) and path.name == "trainer.pt":  # half-way through the step-4 save
        with open(str(path) + ".part", "wb") as f:
            f.write(b"PK partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, path)
ckpt.atomic_save = dying
from fr_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_write(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = _cli_args(tiny_data, out, **{"checkpoint.every": 2, "train.max_steps": 6, "data.num_workers": 0})
    r = subprocess.run(
        [PY, "-c", _KILL_AT_SAVE] + args, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (out / "checkpoints" / ".tmp-4").is_dir() and (out / "checkpoints" / "2" / "meta.json").is_file()
    r = subprocess.run(
        [PY, "-m", "fr_dist.cli"] + args + ["checkpoint.resume=auto"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "removing the partial" in r.stdout and "checkpoints/2 at step 2" in r.stdout, r.stdout[-3000:]
    assert not (out / "checkpoints" / ".tmp-4").exists()
    assert (out / "checkpoints" / "6" / "meta.json").is_file()
