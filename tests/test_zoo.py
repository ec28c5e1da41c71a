"""A zoo of hand-written modules (``tests/zoo/``), each simulated at tp 2, 3 and 4 against its
unsharded self: every rank's output within the project's bound, and, at tp 2 where the sizes
split, some parameter sharded (the convolutions excepted: they are not candidates, as the
README says). The styles are those of code written by hand rather than by transformers: the
soundness of a rule must not depend on the model being one the tests know."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from autotp.simulate import simulate
from models import assert_close_to
from zoo import attention, hidden, one_per_rank, projections
from zoo.sizes import DIM, VOCAB

MODULES = attention.MODULES + projections.MODULES + hidden.MODULES + one_per_rank.MODULES


def _flat(out: Any) -> torch.Tensor:
    """A module's output as one tensor (a dict's values in order)."""
    values = out.values() if isinstance(out, dict) else [out]
    return torch.cat([v.float().reshape(-1) for v in values])


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__ for m in MODULES])
def test_a_hand_written_module_is_exact_on_every_rank(module) -> None:
    torch.manual_seed(0)
    model = module().eval()
    generator = torch.Generator().manual_seed(1)
    x = (torch.randint(0, VOCAB, (2, 10), generator=generator) if getattr(module, "takes_ids", False)
         else torch.randn(2, 10, DIM, generator=generator))
    with torch.no_grad():
        reference = _flat(model(x))
    for tp in (2, 3, 4):
        sim = simulate(model, (x,), tp)
        for rank, out in enumerate(sim.outputs):
            try:
                assert_close_to(reference, _flat(out))
            except AssertionError as exc:
                raise AssertionError(f"{module.__name__} at tp {tp}, rank {rank}: {exc}") from None
        if tp == 2:
            sharded = [p.name for p in sim.plan.sharded_params()]
            assert bool(sharded) == getattr(module, "shards", True), (sharded, sim.plan.params)
