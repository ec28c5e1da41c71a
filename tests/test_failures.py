"""A rank that raises or is killed mid-generation must stop its peers within 60 s with an
error naming it, instead of leaving them waiting in a collective.

The failure is injected from a stopping criterion (a callback Hugging Face ``generate`` calls
every step), on rank 1 at step 5. The local launcher (unlike torchrun) does not kill the
surviving rank, so its own error is what is checked, on both collective paths: over gloo the
survivor raises ``PeerFailure``; on DeepSpeed's shared-memory all-reduce (which cannot time
out) its watchdog prints the same error and ends the process.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time

import pytest
import torch

import autotp
from autotp.launch import RankFailed, run_local
from models import hf_model

pytestmark = pytest.mark.distributed

PATHS = ["gloo"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])


class _FailOnRank1:
    def __init__(self, how: str) -> None:
        self.how, self.step = how, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.step += 1
        if int(os.environ["RANK"]) == 1 and self.step == 5:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure on rank 1")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def dying_worker(rank: int, world: int, how: str, path: str) -> None:
    os.environ["AUTOTP_ALLREDUCE"] = path
    tp_model = autotp.parallelize(hf_model("llama"))
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    tp_model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0,
                      stopping_criteria=[_FailOnRank1(how)])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("how, named", [("raise", "rank 1 raised RuntimeError: injected failure on rank 1"),
                                        ("kill", "rank 1 died (its process is gone)")])
def test_a_failing_rank_stops_its_peers_and_is_named(how, named, path):
    start = time.monotonic()
    with pytest.raises(RankFailed) as failed:
        run_local(dying_worker, 2, how, path, timeout=120, group_timeout=300)
    elapsed = time.monotonic() - start
    report = str(failed.value)
    survivor = next(line for line in report.splitlines() if line.startswith("rank 0:"))
    assert "PeerFailure: rank 0: a collective failed: " + named in survivor, report
    assert elapsed < 60, f"the surviving rank took {elapsed:.0f} s to stop"


def quiet_worker(rank: int, world: int) -> str:
    tp_model = autotp.parallelize(hf_model("llama"))
    with torch.no_grad():
        tp_model(torch.randint(3, 128, (1, 5)))
    return tp_model.collective_path


@pytest.mark.skipif("deepspeed" not in PATHS, reason="DeepSpeed (autotp[fast]) is not installed")
def test_the_shared_memory_path_leaves_nothing_in_dev_shm():
    from pathlib import Path

    segments = ("deepspeed_allreduce_buffer_*", "autotp_gather_*")  # the kernel's, and the gathers'
    before = {path for pattern in segments for path in Path("/dev/shm").glob(pattern)}
    paths = run_local(quiet_worker, 2)
    assert paths == ["deepspeed shared memory"] * 2
    assert {path for pattern in segments for path in Path("/dev/shm").glob(pattern)} - before == set()


def refusal_worker(rank: int, world: int, path: str) -> bool:
    """Every rank is refused (a cache autotp cannot carry) and goes on; rank 0 comes back 5 s
    later than rank 1, which waits for it in the next collective."""
    from transformers import DynamicCache
    from transformers.cache_utils import StaticSlidingWindowLayer

    os.environ["AUTOTP_ALLREDUCE"] = path
    model = hf_model("llama")
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        tp_model = autotp.parallelize(model)
        cache = DynamicCache(config=model.config)
        cache.layers[0] = StaticSlidingWindowLayer(max_cache_len=8, sliding_window=4)
        with pytest.raises(autotp.AutotpError, match="StaticSlidingWindowLayer"):
            tp_model(ids, cache=cache)
        if rank == 0:
            time.sleep(5)
        return bool((tp_model(ids).logits - reference).abs().max() < 1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_a_refusal_every_rank_caught_does_not_stop_a_later_call(path):
    assert run_local(refusal_worker, 2, path, timeout=120) == [True, True]
