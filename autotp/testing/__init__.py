"""Tools that check autotp against its promise: sharded results equal unsharded ones.

- :mod:`autotp.testing.conformance`: every propagation rule run on PyTorch's own per-op sample
  inputs (OpInfo), for every input placement the rule accepts, on simulated ranks;
- :mod:`autotp.testing.fuzz`: random modules built from the blocks real models use, compared
  with their unsharded selves, failures shrunk to small reproducers.

Both run every rank in one process (:mod:`autotp.simulate`). ``scripts/conformance.py`` and
``scripts/fuzz.py`` are their command lines.
"""
