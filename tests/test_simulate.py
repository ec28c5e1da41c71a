"""The in-process simulator (autotp.simulate): every rank's graph in one process.

- At tp 2 it is bit for bit what real ranks compute over gloo (one addition per all-reduced
  element commutes), with the same GEMM (``AUTOTP_KERNELS=aten``) and one thread.
- At tp 4 gloo's ring adds the ranks' partial sums in another association than rank order:
  the results agree to rounding, which the contract's bound covers.
- A rank that raises stops the others: the simulation raises that error, it never hangs.
"""

from __future__ import annotations

import copy
import os
import time
import types

import pytest
import torch
import torch.nn as nn

import autotp
from autotp.capture import capture
from autotp.placement import Shard
from autotp.simulate import communicators, run_ranks_in_threads, simulate, written_tensors
from distributed import run_ranks
from models import assert_close_to, hf_model, token_ids


def gloo_worker(rank: int, world: int) -> torch.Tensor:
    os.environ.update(AUTOTP_KERNELS="aten", AUTOTP_ALLREDUCE="gloo")
    with torch.no_grad():
        return autotp.parallelize(hf_model("llama"), cache=False)(token_ids(2, 8)).logits


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_simulated_ranks_compute_what_gloo_ranks_compute(world: int) -> None:
    real = run_ranks(gloo_worker, world)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each real rank runs
    try:
        sim = simulate(hf_model("llama"), token_ids(2, 8), world)
    finally:
        torch.set_num_threads(threads)
    for rank, (ours, theirs) in enumerate(zip(sim.outputs, real)):
        if world == 2:
            assert torch.equal(ours.logits, theirs), f"rank {rank}: not bit-identical to gloo"
        else:
            assert_close_to(theirs, ours.logits)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_padded_vocabulary_computes_the_unsharded_logits(world: int) -> None:
    # 131 rows split evenly over no world size: the tied table and head are padded shards
    model, ids = hf_model("gpt2_odd_vocab"), token_ids(2, 8)
    with torch.no_grad():
        reference = model(ids).logits
    sim = simulate(model, ids, world)
    assert sim.plan.params["lm_head.weight"].placement == Shard(0, padded=True)
    for out in sim.outputs:
        assert out.logits.shape == reference.shape
        assert_close_to(reference, out.logits)


@pytest.mark.parametrize("name", ["llama", "gpt2_odd_vocab"])
@pytest.mark.parametrize("bad", [-1, 0, 1000])  # 0: the vocabulary's size (128, or 131 padded to 132 at tp 2)
def test_a_token_id_outside_the_vocabulary_raises_as_unsharded(name: str, bad: int) -> None:
    """No rank owns such an id: each zeroed its row, and the sum was a row of zeros (the model
    computed on) where the unsharded lookup raises."""
    model, ids = hf_model(name), token_ids(2, 8)
    bad = bad or model.config.vocab_size
    wrong = ids.clone()
    wrong[1, 3] = bad
    with pytest.raises(IndexError):
        model(wrong)
    with pytest.raises(Exception, match="index out of range"):  # captured with good ids, run with the bad
        simulate(model, wrong, 2, example_inputs=ids)


def test_replicated_results_are_identical_on_every_rank() -> None:
    sim = simulate(hf_model("qwen2"), token_ids(2, 8), 4)
    assert all(torch.equal(out.logits, sim.outputs[0].logits) for out in sim.outputs[1:])


def test_a_rank_that_raises_stops_the_others() -> None:
    comms = communicators(3, timeout=60)

    def step(rank: int) -> torch.Tensor:
        if rank == 1:
            raise ValueError("rank 1 broke")
        return comms[rank].all_reduce_(torch.ones(4))  # ranks 0 and 2 wait for rank 1 here

    start = time.perf_counter()
    with pytest.raises(ValueError, match="rank 1 broke"):
        run_ranks_in_threads(step, 3, comms)
    assert time.perf_counter() - start < 10


def test_collectives_sum_in_rank_order_and_gather_chunks() -> None:
    comms = communicators(4)
    pieces = [torch.full((2,), float(r + 1)) for r in range(4)]
    summed = run_ranks_in_threads(lambda r: comms[r].all_reduce_(pieces[r].clone()), 4, comms)
    assert all(torch.equal(s, torch.full((2,), 10.0)) for s in summed)
    gathered = run_ranks_in_threads(lambda r: comms[r].all_gather(pieces[r], 0, replicas=2), 4, comms)
    assert all(torch.equal(g, torch.tensor([1.0, 1.0, 3.0, 3.0])) for g in gathered)  # one piece per pair


class _RunningStatistic(nn.Module):
    """Keeps a running mean of its hidden activations in a buffer, updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(48, 96), nn.Linear(96, 48)
        self.register_buffer("running", torch.zeros(96))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.running.mul_(0.5).add_(h.mean((0, 1)) * 0.5)
        return self.b(h - self.running)


@pytest.mark.parametrize("tp", [2, 3])
def test_a_buffer_the_graph_writes_is_each_simulated_rank_s_own(tp: int) -> None:
    """Each real rank holds its own copy of a replicated buffer; simulated ranks once shared one
    (the model's), so an in-place update landed tp times and every rank's output was wrong."""
    torch.manual_seed(0)
    model = _RunningStatistic().eval()
    x = torch.randn(2, 8, 48)
    with torch.no_grad():
        reference = copy.deepcopy(model)(x)
    sim = simulate(model, (x,), tp)
    for out in sim.outputs:
        assert_close_to(reference, out)
    assert written_tensors(capture(model, (x,)).graph) == {"running"}  # from the schemas: mul_'s Tensor(a!)


class _Doubled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(48, 96), nn.Linear(96, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_a_forward_put_on_an_instance_is_the_one_captured() -> None:
    """A patch on one instance (``m.forward = MethodType(...)``, as accelerate's hooks do) is what
    the model computes; capture once copied the model without it and computed the class's."""
    torch.manual_seed(0)
    model = nn.Sequential(_Doubled(), nn.Linear(48, 48)).eval()
    model[0].forward = types.MethodType(lambda self, x: _Doubled.forward(self, x) * 2, model[0])
    x = torch.randn(2, 8, 48)
    with torch.no_grad():
        reference = model(x)
    for out in simulate(model, (x,), 2).outputs:
        assert_close_to(reference, out)
