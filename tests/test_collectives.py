"""The process group's collectives on real gloo ranks: the all-reduce waited for by polling
(``autotp.collectives.wait_polled``) gives the same sums as a blocking wait, the choice of when
to poll, and the gather's direct sends (slab by slab where a piece is strided in the output)
give what concatenating every rank's piece gives."""

from __future__ import annotations

import os

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


# (shape of each rank's piece, gathered dim, dtype, how the piece is laid out)
_GATHERS = [((5, 5, 7), 0, torch.float32, "contiguous"), ((5, 5, 7), 1, torch.float32, "contiguous"),
            ((5, 5, 7), 2, torch.float32, "contiguous"), ((5, 5, 7), -1, torch.bfloat16, "contiguous"),
            ((3, 40), 1, torch.int64, "contiguous"), ((1, 1, 9), 2, torch.float32, "contiguous"),
            ((6, 7), 1, torch.float32, "transposed"), ((0, 4), 1, torch.float32, "contiguous"),
            ((2, 300, 1000), 2, torch.float32, "contiguous")]


def _piece(chunk: int, shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> torch.Tensor:
    """The piece of the gathered output that ranks holding ``chunk`` own; rebuilt the same
    anywhere, so the test computes the expected output without the ranks."""
    gen = torch.Generator().manual_seed(1000 + chunk)
    if layout == "transposed":  # a non-contiguous view, as a graph may hand to the gather
        return (torch.randn(shape[::-1], generator=gen) * 10).to(dtype).t()
    return (torch.randn(shape, generator=gen) * 10).to(dtype)


def _gathers(rank: int, world: int, replicas: int, slab_bytes: int, fast: bool) -> list[torch.Tensor]:
    import autotp.collectives as collectives  # this spawned rank's own copy: patched for it alone

    collectives.SLAB_BYTES = slab_bytes
    path = collectives.select_all_reduce(None, world, torch.device("cpu")) if fast else (None, "gloo")
    comm = Communicator(None, world, *path)  # without DeepSpeed: the gloo process group's path
    assert (comm.shared_gather is not None) == fast
    return [comm.all_gather(_piece(rank // replicas, shape, dtype, layout), dim, replicas)
            for shape, dim, dtype, layout in _GATHERS + _GATHERS[::-1]]


@pytest.mark.parametrize("world, replicas, slab_bytes, fast",
                         [(2, 1, 64, False), (2, 1, 100, False), (3, 1, 1 << 20, False), (4, 2, 100, False),
                          (2, 1, 0, True), (3, 1, 0, True), (4, 2, 0, True)],
                         ids=["gloo-64", "gloo-100", "gloo-3", "gloo-replicas", "shm", "shm-3", "shm-replicas"])
def test_gather_concatenates_every_chunk(world: int, replicas: int, slab_bytes: int, fast: bool) -> None:
    """Over gloo, slabs of 64 and 100 bytes split each strided piece into many, the last one
    short (100 bytes hold 3 rows of 7 fp32 values; 25 rows leave 1); 1 MiB sends the largest
    case, whose rows are 4000 bytes, in 3 slabs. Over shared memory (``autotp.shm_gather``) the
    largest case grows the segments past their first 1 MiB, and the cases run again in reverse
    order through the same segments. Ranks sharing a chunk (``replicas``) hold the same piece."""
    if fast:
        pytest.importorskip("deepspeed", reason="DeepSpeed (autotp[fast]) is not installed")
    by_rank = run_ranks(_gathers, world, replicas, slab_bytes, fast)
    for case, (shape, dim, dtype, layout) in enumerate(_GATHERS + _GATHERS[::-1]):
        want = torch.cat([_piece(chunk, shape, dtype, layout) for chunk in range(world // replicas)], dim)
        for rank, gathered in enumerate(by_rank):
            assert gathered[case].dtype == dtype and gathered[case].is_contiguous()
            assert torch.equal(gathered[case], want), (rank, shape, dim)


def _gathers_short_of_shared_memory(rank: int, world: int) -> tuple[list[torch.Tensor], list[str], int]:
    """:func:`_gathers` over shared memory where rank 1's /dev/shm holds no more than 1 MiB."""
    import warnings

    if rank == 1:
        reserve = os.posix_fallocate

        def short(fd: int, offset: int, size: int) -> None:
            if size > 1 << 20:
                raise OSError(28, "No space left on device")
            reserve(fd, offset, size)

        os.posix_fallocate = short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import autotp.collectives as collectives

        comm = Communicator(None, world, *collectives.select_all_reduce(None, world, torch.device("cpu")))
        gathered = [comm.all_gather(_piece(rank, shape, dtype, layout), dim)
                    for shape, dim, dtype, layout in _GATHERS + _GATHERS[::-1]]
        from autotp.gathered_linear import GatheredLinear

        x, weights, biases = _operands(*_LINEARS[0], world)  # a 2.3 MiB piece: over the process group
        with torch.no_grad():
            gathered.append(GatheredLinear(comm)(x, weights[rank], biases[rank], -1))
    said = [str(w.message) for w in caught if "/dev/shm" in str(w.message)]
    return gathered, said, comm.shared_gather._nbytes


def test_a_gather_shared_memory_cannot_hold_goes_over_the_process_group() -> None:
    """A segment is reserved when it is made: in a container's small /dev/shm, writing into an
    unreserved one would end the process with a bus error. Where one rank cannot reserve it,
    every rank gathers that size over the process group (warned once, naming the rank), and
    smaller gathers still go through the segments already made."""
    pytest.importorskip("deepspeed", reason="DeepSpeed (autotp[fast]) is not installed")
    for rank, (gathered, said, nbytes) in enumerate(run_ranks(_gathers_short_of_shared_memory, 2)):
        assert nbytes == 1 << 20, nbytes
        assert len(said) == 1 and "rank 1: OSError: No space left on device" in said[0], said
        for case, (shape, dim, dtype, layout) in enumerate(_GATHERS + _GATHERS[::-1]):
            want = torch.cat([_piece(chunk, shape, dtype, layout) for chunk in range(2)], dim)
            assert torch.equal(gathered[case], want), (rank, shape, dim)
        x, weights, biases = _operands(*_LINEARS[0], 2)
        pieces = [torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases)]
        assert torch.equal(gathered[-1], torch.cat(pieces, -1)), rank


# (shape of the input, its width, each rank's output width, bias, dtype): many slabs of rows,
# one contiguous row (a decode step), a narrow dtype, no rows, a 1-D input
_LINEARS = [((2, 300, 16), 1000, True, torch.float32), ((1, 1, 16), 50, False, torch.float32),
            ((5, 7, 16), 9, False, torch.bfloat16), ((0, 16), 8, True, torch.float32), ((16,), 12, True, torch.float32)]


def _operands(shape: tuple[int, ...], width: int, bias: bool, dtype: torch.dtype, world: int):
    """The input and every rank's weight and bias pieces, the same on every rank."""
    gen = torch.Generator().manual_seed(sum(shape) + width)
    x = torch.randn(shape, generator=gen).to(dtype)
    weight = torch.randn(width * world, shape[-1], generator=gen).to(dtype)
    b = torch.randn(width * world, generator=gen).to(dtype) if bias else None
    return x, weight.chunk(world), b.chunk(world) if bias else [None] * world


def _gathered_linears(rank: int, world: int, slab_bytes: int, fast: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import autotp.collectives as collectives  # this spawned rank's own copy: patched for it alone
    from autotp.gathered_linear import GatheredLinear

    collectives.SLAB_BYTES = slab_bytes
    path = collectives.select_all_reduce(None, world, torch.device("cpu")) if fast else (None, "gloo")
    comm = Communicator(None, world, *path)
    assert (comm.shared_gather is not None) == fast  # else the linear, then the gather
    out = []
    for shape, width, bias, dtype in _LINEARS:
        x, weights, biases = _operands(shape, width, bias, dtype, world)
        with torch.no_grad():
            fused = GatheredLinear(comm)(x, weights[rank], biases[rank], -1)
            unfused = comm.all_gather(torch.nn.functional.linear(x, weights[rank], biases[rank]), -1)
        out.append((fused, unfused))
    return out


@pytest.mark.parametrize("world, slab_bytes, fast", [(2, 100, False), (2, 1 << 20, True), (3, 1 << 20, True)],
                         ids=["gloo", "shm", "shm-3"])
def test_a_linear_computed_into_its_gathered_output_is_the_gather_of_the_linear(world, slab_bytes, fast) -> None:
    """With DeepSpeed's shared memory the GEMM writes each rank's piece straight into the
    segment the gather reads it from (``autotp.gathered_linear``): bit for bit the gather of the
    linear, on every rank, at 2 and 3 ranks. Over gloo it runs the linear, then the gather (one
    row per slab of 100 bytes)."""
    if fast:
        pytest.importorskip("deepspeed", reason="DeepSpeed (autotp[fast]) is not installed")
    for rank, results in enumerate(run_ranks(_gathered_linears, world, slab_bytes, fast)):
        for (shape, width, _, dtype), (fused, unfused) in zip(_LINEARS, results):
            assert fused.dtype == dtype and fused.is_contiguous() and fused.shape[-1] == width * world
            assert torch.equal(fused, unfused), (rank, shape)
