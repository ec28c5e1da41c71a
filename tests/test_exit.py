"""A process group autotp started is destroyed at exit, before the interpreter's finalization.

Left to finalization, a gloo worker thread that drops a Python reference can no longer take
the GIL and the process aborts (SIGABRT, "terminate called without an active exception")
after its work is done: seen once in CI on ``torchrun -m autotp run``. The race is too rare to
reproduce on demand, so these tests check the mechanism: the exit handler runs and destroys
the group it should, and leaves alone the groups it should not touch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch.distributed as dist

from autotp import health
from autotp.group import _destroy_if_still_ours
from autotp.module import _reported_failure


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo group of one in this process, destroyed afterwards if a test left it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield dist.distributed_c10d._get_default_group()
    finally:
        health.clear_failed()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_exit_handler_destroys_the_group_autotp_started(one_rank_group):
    _destroy_if_still_ours(weakref.ref(one_rank_group))
    assert not dist.is_initialized()


def test_the_exit_handler_leaves_a_group_someone_else_started(one_rank_group):
    class Other:  # stands for the group autotp started, since destroyed and replaced by the user
        pass

    gone = Other()
    ref = weakref.ref(gone)
    _destroy_if_still_ours(ref)
    assert dist.is_initialized()
    del gone
    _destroy_if_still_ours(ref)  # dead reference
    assert dist.is_initialized()


def test_the_exit_handler_leaves_the_group_after_a_call_that_raised(one_rank_group):
    # a collective such a call left pending would hold the destroy until the peers joined it
    with pytest.raises(RuntimeError):
        with _reported_failure():
            raise RuntimeError("a call that raised")
    assert health.last_call_raised()
    _destroy_if_still_ours(weakref.ref(one_rank_group))
    assert dist.is_initialized()
    with _reported_failure():  # a later call that returns: the caller handled the error
        pass
    assert not health.last_call_raised()
    _destroy_if_still_ours(weakref.ref(one_rank_group))
    assert not dist.is_initialized()


SCRIPT = textwrap.dedent("""
    import atexit, os, torch, torch.distributed as dist
    # registered first, so it runs after every handler registered later (autotp's included);
    # one write per line, so that the two ranks' lines do not interleave on the shared pipe
    atexit.register(lambda: os.write(1, f"rank {os.environ['RANK']} group alive at exit: {dist.is_initialized()}\\n".encode()))
    from autotp.group import init_tp
    ctx = init_tp()
    dist.all_reduce(torch.ones(3))
""")


@pytest.mark.distributed
def test_a_group_init_tp_started_under_torchrun_is_gone_before_finalization(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)], capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line for line in done.stdout.splitlines() if "group alive" in line) == [
        "rank 0 group alive at exit: False", "rank 1 group alive at exit: False"]
    assert "terminate called" not in done.stderr
