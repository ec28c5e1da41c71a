"""The process group's all-reduce waited for by polling (``autotp.collectives.wait_polled``):
the same sums as a blocking wait, on real gloo ranks, and the choice of when to poll."""

from __future__ import annotations

import pytest
import torch

from autotp.collectives import Communicator, cgroup_cpu_limit, polling_pays, usable_cores, wait_polled
from tests.distributed import run_ranks


class _Work:
    """A collective's handle that completes after ``polls`` calls of ``is_completed``."""

    def __init__(self, polls: float, error: Exception | None = None) -> None:
        self.polls, self.asked, self.waited, self.error = polls, 0, 0, error

    def is_completed(self) -> bool:
        self.asked += 1
        return self.asked > self.polls

    def wait(self) -> bool:
        self.waited += 1
        if self.error is not None:
            raise self.error
        return True


def test_polled_wait_polls_until_done_then_waits_once() -> None:
    work = _Work(polls=5)
    wait_polled(work, limit_s=10.0)
    assert work.asked == 6 and work.waited == 1


def test_polled_wait_blocks_after_its_limit() -> None:
    work = _Work(polls=float("inf"))
    wait_polled(work, limit_s=0.002)
    assert work.asked > 0 and work.waited == 1  # a work that never completes is left to wait()


def test_polled_wait_raises_what_the_work_raised() -> None:
    with pytest.raises(RuntimeError, match="peer gone"):
        wait_polled(_Work(polls=0, error=RuntimeError("peer gone")), limit_s=0.01)


def _sums(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    polled, blocking = Communicator(None, world, poll=True), Communicator(None, world)
    out = []
    for shape, dtype in [((4,), torch.float32), ((2, 128, 1024), torch.float32), ((3, 5), torch.bfloat16),
                         ((7,), torch.int64)]:
        gen = torch.Generator().manual_seed(100 * rank + len(out))
        x = (torch.randn(shape, generator=gen) * 100).to(dtype)
        out.append((polled.all_reduce_(x.clone()), blocking.all_reduce_(x.clone())))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_polled_all_reduce_equals_the_blocking_one_on_every_rank(world: int) -> None:
    by_rank = run_ranks(_sums, world)
    for polled, blocking in by_rank[0]:
        assert polled.abs().sum() > 0
    for sums in by_rank:
        for (polled, blocking), (first, _) in zip(sums, by_rank[0]):
            assert torch.equal(polled, blocking)
            assert torch.equal(polled, first)  # replicated: bit for bit the same on every rank


def _decisions(rank: int, world: int) -> dict[str, bool]:
    import autotp.collectives as collectives  # this spawned rank's own copy: patched for it alone

    collectives.usable_cores = lambda: world
    own_cores, cuda = polling_pays(None, torch.device("cpu")), polling_pays(None, torch.device("cuda"))
    collectives.usable_cores = lambda: world - 0.5  # a quota of 1.5 CPUs for 2 ranks
    shared_cores = polling_pays(None, torch.device("cpu"))
    return {"own cores": own_cores, "fewer cores than ranks": shared_cores, "cuda": cuda}


def test_ranks_poll_only_on_gloo_with_a_core_each() -> None:
    for decisions in run_ranks(_decisions, 2):
        assert decisions == {"own cores": True, "fewer cores than ranks": False, "cuda": False}


def test_no_process_group_no_polling() -> None:
    assert not polling_pays(None, torch.device("cpu"))


@pytest.mark.parametrize("text, cores", [("200000 100000\n", 2.0), ("50000 100000", 0.5), ("max 100000\n", None),
                                         ("", None), ("x y", None), ("100 0", None)])
def test_a_container_cpu_quota_is_read_in_cores(tmp_path, text: str, cores: float | None) -> None:
    limits = tmp_path / "cpu.max"
    limits.write_text(text)
    assert cgroup_cpu_limit(str(limits)) == cores
    assert cgroup_cpu_limit(str(tmp_path / "missing")) is None


def test_usable_cores_are_capped_by_the_quota(monkeypatch) -> None:
    import autotp.collectives as collectives

    monkeypatch.setattr(collectives, "cgroup_cpu_limit", lambda: 1.5)
    capped = usable_cores()
    monkeypatch.setattr(collectives, "cgroup_cpu_limit", lambda: None)
    uncapped = usable_cores()  # the affinity (or the machine's count)
    assert uncapped >= 1 and capped == min(1.5, uncapped)
