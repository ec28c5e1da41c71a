"""Simulate: every rank of a tensor-parallel model in one process, no process group.

Consumes a model, the inputs of one call and a tp size; produces each rank's output, computed
by the pipeline real ranks run (capture -> plan -> rewrite for the rank -> load the rank's
tensors), with the inserted collectives carried out by an in-process communicator. It is how
the tests, the rule conformance check and the fuzzer compare thousands of sharded graphs with
their unsharded selves in seconds, where starting real ranks takes seconds each.

How the ranks meet: one thread per rank runs that rank's graph; a collective deposits the
rank's tensor in a shared slot and waits at a barrier until every rank has, then each rank
reads all the slots. The sum of an all-reduce is taken in rank order, ``((x0 + x1) + x2) + ...``,
the same association on every rank, so replicated values stay bit-identical across ranks as
they must. At two ranks this is also bit for bit what gloo and DeepSpeed's shared-memory kernel
give (a single addition commutes); at three or more they may associate the sum differently,
and results then agree to rounding (see ``tests/test_simulate.py``).

A rank that raises breaks the barrier, so the others stop too, and :func:`run_ranks_in_threads`
raises the first rank's error: a simulation never hangs.

Start reading at :func:`simulate`.
"""

from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from autotp.aliasing import written_groups
from autotp.call_checks import contiguous_arguments
from autotp.capture import Captured, capture, graph_inputs, normalise_example_inputs
from autotp.collectives import Communicator
from autotp.loading import ModuleSource, load_into
from autotp.opaque import OpaqueCall
from autotp.plan import Plan
from autotp.planner import plan_graph
from autotp.rewrite import rewrite

__all__ = ["simulate", "Simulation", "SimulatedCommunicator", "rank_graphs", "run_ranks_in_threads", "copy_graph_module",
           "written_tensors"]


class _Meeting:
    """The slots and the barrier one simulated group shares."""

    def __init__(self, world_size: int, timeout: float) -> None:
        self.slots: list[Optional[torch.Tensor]] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)

    def deposit(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor, once every rank has deposited one."""
        self.slots[rank] = x
        self.barrier.wait()
        return list(self.slots)  # type: ignore[arg-type]


class SimulatedCommunicator(Communicator):
    """One rank's view of a simulated group: the collectives of :mod:`autotp.collectives` over
    shared memory between threads."""

    def __init__(self, meeting: _Meeting, rank: int, world_size: int) -> None:
        super().__init__(None, world_size, name="simulated")
        self.meeting, self.rank = meeting, rank

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        pieces = self.meeting.deposit(self.rank, x)
        total = pieces[0].clone()
        for piece in pieces[1:]:
            total += piece  # rank order on every rank: replicated results stay identical
        self.meeting.barrier.wait()  # every rank has read every piece before any is overwritten
        return x.copy_(total)

    def all_gather(self, x: torch.Tensor, dim: int, replicas: int = 1) -> torch.Tensor:
        if self.world_size == 1:
            return x
        pieces = self.meeting.deposit(self.rank, x.contiguous())
        whole = torch.cat(pieces[::replicas], dim)  # ranks sharing a chunk hold the same piece
        self.meeting.barrier.wait()
        return whole


def communicators(world_size: int, timeout: float = 120.0) -> list[SimulatedCommunicator]:
    """One communicator per rank of a new simulated group."""
    meeting = _Meeting(world_size, timeout)
    return [SimulatedCommunicator(meeting, rank, world_size) for rank in range(world_size)]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph (nodes, arguments) that shares its tensors and
    submodules: what :func:`autotp.rewrite.rewrite` may edit for one rank while the original
    serves the next. (A plain GraphModule: its code, generated from the graph, unflattens inputs
    and outputs as the original's does.)"""
    with warnings.catch_warnings():  # deepcopying export's pytree specs warns of a deprecated class check
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)  # new nodes; their meta dicts are shallow copies
    return fx.GraphModule(gm, graph)


def rank_graphs(captured: Captured, plan: Plan, model: nn.Module,
                comms: Optional[Sequence[Communicator]] = None) -> list[fx.GraphModule]:
    """Every rank's rewritten graph, loaded with its slices of ``model``'s tensors. A tensor the
    graph writes into (a running statistic, a cache buffer) is each rank's own copy, as on real
    ranks: shared, every rank's write would land in the one tensor (and in ``model``'s). So is a
    module run whole (:class:`autotp.opaque.OpaqueCall`), with what it keeps between calls."""
    comms = comms or communicators(plan.tp_size)
    written = written_tensors(captured.graph_module.graph)
    graphs = []
    for rank in range(plan.tp_size):
        gm = rewrite(copy_graph_module(captured.graph_module), plan, rank, comm=comms[rank])
        memo: dict[int, Any] = {}  # one copy of a module its calls share
        for name, child in list(gm.named_children()):
            if isinstance(child, OpaqueCall):  # what its module keeps between calls is each rank's own too
                setattr(gm, name, copy.deepcopy(child, memo))
        graphs.append(load_into(gm, plan, rank, _OwnCopies(ModuleSource(model), written)))
    return graphs


class _OwnCopies:
    """A tensor source that copies the ``written`` tensors it reads."""

    def __init__(self, source: ModuleSource, written: set[str]) -> None:
        self.source, self.written = source, written

    def has(self, name: str) -> bool:
        return self.source.has(name)

    def read(self, name: str, *args: Any) -> torch.Tensor:
        value = self.source.read(name, *args)
        return value.clone() if name in self.written else value


def written_tensors(graph: fx.Graph) -> set[str]:
    """The parameters and buffers ``graph`` writes into, directly or through a view: those in an
    alias group some op writes into (:func:`autotp.aliasing.written_groups`, from the schemas:
    ``Tensor(a!)`` written, ``Tensor(a)`` a view)."""
    groups, written = written_groups(graph)
    return {str(node.target) for node in graph.nodes if node.op == "get_attr" and groups.find(node) in written}


def run_ranks_in_threads(fn: Callable[[int], Any], world_size: int,
                         comms: Sequence[SimulatedCommunicator] = ()) -> list[Any]:
    """``fn(rank)`` for every rank at once, one thread each; every rank's result in rank order.
    ``comms``: the communicators the ranks meet through.

    Raises:
        the first exception a rank raised (the others, left waiting at the barrier of
        ``comms``, are released by breaking it, and their ``BrokenBarrierError`` is not
        reported).
    """
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def run(rank: int) -> None:
        try:
            with torch.no_grad():
                results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors.append((rank, exc))
            for comm in comms:
                comm.meeting.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,), name=f"autotp-rank-{rank}") for rank in range(world_size)]
    if world_size == 1:
        run(0)
    else:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        root = [e for e in errors if not isinstance(e[1], threading.BrokenBarrierError)] or errors
        raise root[0][1]
    return results


@dataclass
class Simulation:
    """The outcome of :func:`simulate`: each rank's output, the plan and each rank's graph."""

    outputs: list[Any]
    plan: Plan
    graphs: list[fx.GraphModule]


def simulate(model: nn.Module, inputs: Any, tp_size: int, *, example_inputs: Any = None,
             gather_outputs: bool = True, timeout: float = 120.0) -> Simulation:
    """Run ``model`` on ``inputs`` as ``tp_size`` tensor-parallel ranks would, in this process.

    Args:
        model: the model, with real weights (each rank's slices are taken from them).
        inputs: a tensor, a tuple of arguments or a dict of keyword arguments.
        tp_size: the number of simulated ranks.
        example_inputs: what to capture with (default: ``inputs``); sizes stay dynamic.
        gather_outputs: as for :func:`autotp.parallelize`.
        timeout: seconds a rank waits for the others at a collective before the run fails.

    Returns:
        A :class:`Simulation`; ``outputs[r]`` is what rank ``r`` returns.

    A graph that draws random numbers (dropout in training mode) draws them here from the one
    generator the threads share, so ranks draw different numbers; real ranks draw rank 0's
    (:mod:`autotp.call_checks`). Check such a model on real ranks.

    Example:
        >>> sim = simulate(model, torch.randn(2, 8, 64), tp_size=4)          # doctest: +SKIP
        >>> torch.testing.assert_close(sim.outputs[3], model(x))             # doctest: +SKIP
    """
    call = normalise_example_inputs(model, inputs)
    captured = capture(model, call if example_inputs is None else example_inputs)
    plan = plan_graph(captured.graph, tp_size, model=type(model).__name__, inputs=captured.input_names,
                      gather_outputs=gather_outputs)
    comms = communicators(tp_size, timeout)
    graphs = rank_graphs(captured, plan, model, comms)
    taken = graph_inputs(model, call)
    outputs = run_ranks_in_threads(lambda rank: graphs[rank](**contiguous_arguments(graphs[rank], taken)), tp_size,
                                   comms)
    return Simulation(outputs, plan, graphs)
