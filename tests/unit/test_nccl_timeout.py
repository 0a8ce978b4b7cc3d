"""dist.timeout_s under NCCL, checked without a GPU: what the runtime sets up and passes to
init_process_group for backend nccl (mocked), and NCCL's timeout errors translated into
CollectiveTimeout naming the key."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from fr_dist import comm, runtime

NCCL_VARS = (
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_NCCL_BLOCKING_WAIT",
    "NCCL_BLOCKING_WAIT",
)

# what torch's ProcessGroupNCCL raises, with c10's C++ backtrace (TORCH_SHOW_CPP_STACKTRACES)
WATCHDOG = (
    "[Rank 0] Process group watchdog thread terminated with exception: [Rank 0] Watchdog caught "
    "collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, "
    "Timeout(ms)=42000) ran for 42085 milliseconds before timing out.\n"
    "Exception raised from checkTimeout at /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:686 "
    "(most recent call first):\n"
    "frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x96 (0x7f3b in libc10.so)\n"
    "frame #1: c10d::ProcessGroupNCCL::WorkNCCL::checkTimeout() + 0x1f2 (0x7f3c in libtorch_cuda.so)\n"
)
BLOCKING_WAIT = (
    "[Rank 0] Work WorkNCCL(SeqNum=3, OpType=_ALLGATHER_BASE, NumelIn=48, NumelOut=96, "
    "Timeout(ms)=42000) timed out in blocking wait."
)
NOT_A_TIMEOUT = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, remote process exited or "
    "there was a network error, NCCL version 2.27.5 (while running WorkNCCL(SeqNum=2, OpType=ALLREDUCE, "
    "NumelIn=1, NumelOut=1, Timeout(ms)=42000))"
)


@pytest.fixture
def fake_nccl(monkeypatch):
    """init_distributed on 'cuda:0' with init_process_group / _set_pg_timeout mocked; records the calls."""
    from torch.distributed import distributed_c10d

    for var in NCCL_VARS + ("TORCHELASTIC_USE_AGENT_STORE",):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setattr(comm, "_timeout_info", dict(comm._timeout_info))  # init records the timeout
    calls = {}

    def init_process_group(**kwargs):
        calls["init"] = kwargs
        calls["env_at_init"] = {v: runtime.os.environ.get(v) for v in NCCL_VARS}

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed_c10d, "_set_pg_timeout", lambda t, group=None: calls.update(pg_timeout=t))
    monkeypatch.setattr(runtime, "select_device", lambda local_rank, device: torch.device(device, local_rank))

    def start(rank=0, device="cuda", timeout_s=42.0, rendezvous_timeout_s=300.0):
        environ = dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        runtime.init_distributed(device, timeout_s, environ, rendezvous_timeout_s)
        return calls

    return start


def test_nccl_init_sets_async_error_handling_and_the_timeouts(fake_nccl, capsys):
    calls = fake_nccl()
    init = calls["init"]
    assert init["backend"] == "nccl" and init["device_id"] == torch.device("cuda", 0)
    assert init["timeout"] == datetime.timedelta(seconds=300)  # start-up: dist.rendezvous_timeout_s
    assert calls["pg_timeout"] == datetime.timedelta(seconds=42)  # then every collective: dist.timeout_s
    assert calls["env_at_init"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"  # set before the group starts
    assert calls["env_at_init"]["TORCH_NCCL_BLOCKING_WAIT"] is None  # the user's choice, never ours
    assert comm._timeout_info["seconds"] == 42.0
    out = capsys.readouterr().out
    assert "dist.timeout_s=42 s" in out and "Watchdog caught collective operation timeout" in out, out
    assert "aborts the process" in out and "TORCH_NCCL_BLOCKING_WAIT=1" in out, out


def test_nccl_keeps_the_users_choices(fake_nccl, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "1")
    calls = fake_nccl()
    assert calls["env_at_init"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    out = capsys.readouterr().out
    assert "TORCH_NCCL_BLOCKING_WAIT=1" in out and "raises CollectiveTimeout" in out, out
    assert "dist.timeout_s=42 s" in out, out


def test_nccl_old_variable_name_counts_as_a_choice(fake_nccl, monkeypatch):
    monkeypatch.setenv("NCCL_ASYNC_ERROR_HANDLING", "0")
    calls = fake_nccl()
    assert calls["env_at_init"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] is None


def test_nccl_note_only_on_rank_0(fake_nccl, capsys):
    fake_nccl(rank=1)
    assert capsys.readouterr().out == ""


def test_gloo_init_leaves_nccl_alone(fake_nccl, capsys):
    calls = fake_nccl(device="cpu")
    assert calls["init"]["backend"] == "gloo" and "device_id" not in calls["init"]
    assert calls["env_at_init"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] is None
    assert capsys.readouterr().out == ""


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setattr(comm, "world_info", lambda group: (0, 2))
    monkeypatch.setattr(comm, "_timeout_info", {"seconds": 42.0, "key": "dist.timeout_s"})


@pytest.mark.parametrize("message", [WATCHDOG, BLOCKING_WAIT], ids=["watchdog", "blocking_wait"])
def test_nccl_timeout_becomes_collective_timeout(two_ranks, message):
    err = comm.translate_failure(dist.DistBackendError(message), "all_reduce", "loss")
    assert isinstance(err, comm.CollectiveTimeout), err
    text = str(err)
    assert "all_reduce 'loss'" in text and "rank 1 did not answer" in text, text
    assert "42 s" in text and "config key dist.timeout_s" in text, text
    assert "frame #" not in text and "Exception raised from" not in text, text  # NCCL's line, not C++'s
    assert ("Watchdog caught" if message is WATCHDOG else "blocking wait") in text, text


def test_nccl_timeout_raised_inside_a_collective_is_translated(two_ranks):
    with pytest.raises(comm.CollectiveTimeout, match="dist.timeout_s"):
        with comm._guard("all_gather", "embeddings", None):
            raise dist.DistBackendError(WATCHDOG)


def test_nccl_error_naming_its_timeout_setting_is_not_a_timeout(two_ranks):
    err = comm.translate_failure(dist.DistBackendError(NOT_A_TIMEOUT), "all_reduce", "loss")
    assert type(err) is comm.CollectiveError, err  # every WorkNCCL(...) names Timeout(ms)=...
    assert "network error" in str(err)
