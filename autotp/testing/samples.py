"""Samples for the rule conformance check: PyTorch's OpInfo samples, and hand-written ones.

A :class:`Sample` is one call to check, ``fn(*tensors)`` returning a flat list of tensors.
:func:`opinfo_samples` yields every OpInfo sample of every op that has a rule (at sizes that
split over 2, 3 and 4 ranks, :data:`EVEN_SIZES`); :func:`hand_samples` covers the ops with a
rule but no OpInfo, and those only a symbolic trace emits (``sym_size``).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

from autotp.rules import RULES, rule_for

__all__ = ["Sample", "EVEN_SIZES", "UNIT_SIZES", "sample_sizes", "opinfo_samples", "hand_samples"]

aten = torch.ops.aten


@dataclass
class Sample:
    """One call to check: ``fn(*tensors)`` returns a flat list of tensors."""

    label: str
    fn: Callable[..., list[torch.Tensor]]
    tensors: list[torch.Tensor]
    symbolic: bool = False  # trace with symbolic sizes (as export's dynamic dims), else static


def _flat_call(op: Callable, args: tuple, kwargs: dict) -> tuple[Callable[..., list[torch.Tensor]], list[torch.Tensor]]:
    """``op(*args, **kwargs)`` as a function of its tensors alone, returning a flat list."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def fn(*tensors: torch.Tensor) -> list[torch.Tensor]:
        values = list(leaves)
        for i, t in zip(positions, tensors):
            values[i] = t
        call_args, call_kwargs = pytree.tree_unflatten(values, spec)
        return [t for t in pytree.tree_leaves(op(*call_args, **call_kwargs)) if isinstance(t, torch.Tensor)]

    return fn, [leaves[i] for i in positions]


def _packet_names() -> set[str]:
    """The aten op names that have a rule, registered or derived from their tags."""
    names = {op._schema.name.split("::")[-1] for op in RULES if hasattr(op, "_schema")}
    for name in dir(aten):
        packet = getattr(aten, name, None)
        if isinstance(packet, torch._ops.OpOverloadPacket) and any(
                rule_for(getattr(packet, o)) for o in packet.overloads()):
            names.add(name)
    return names


def _names_of(opinfo: Any) -> set[str]:
    return ({opinfo.aten_name, opinfo.name.split(".")[-1], opinfo.name.replace(".", "_")}
            | {a.name.split(".")[-1] for a in opinfo.aliases})


# OpInfo samples are sized by module constants S, M, L, XS (5, 10, 20, 3): odd sizes split over
# no world size, so most shape rules would only ever be seen refusing. With these sizes the
# same samples split over 2, 3 and 4 ranks (M, L) or 2 and 3 (S).
EVEN_SIZES = {"S": 6, "M": 12, "L": 24, "XS": 4}
# Sizes at which a rank's piece of a split dim is one element (2 over 2 ranks, 3 over 3): torch
# treats a dim of 1 apart (squeeze removes it, its stride does not count for contiguity, it
# broadcasts), so a rule that is right at EVEN_SIZES can be wrong here.
UNIT_SIZES = {"S": 2, "M": 3, "L": 6, "XS": 2}


@contextlib.contextmanager
def sample_sizes(sizes: Optional[dict[str, int]]) -> Iterator[None]:
    """Set the OpInfo size constants in every module of torch's test internals that holds them
    (each ``from ... import S`` made its own copy); ``None`` leaves them."""
    changed = []
    if sizes:
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("torch.testing._internal"):
                for name, value in sizes.items():
                    if isinstance(getattr(module, name, None), int):
                        changed.append((module, name, getattr(module, name)))
                        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in changed:
            setattr(module, name, value)


def opinfo_samples(dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                   per_op: Optional[int] = None, only: Optional[Iterable[str]] = None,
                   sizes: Optional[dict[str, int]] = EVEN_SIZES, with_inplace: bool = True) -> Iterator[Sample]:
    """Samples of every OpInfo named like an op that has a rule (``per_op``: at most that many
    per OpInfo and dtype; ``only``: OpInfo names to keep; ``sizes``: the size constants, see
    :data:`EVEN_SIZES`, ``None`` for PyTorch's own; ``with_inplace``: each sample also through
    the op's in-place variant, on a copy of its input)."""
    from torch.testing._internal.common_methods_invocations import op_db

    wanted, keep = _packet_names(), set(only) if only else None
    for opinfo in op_db:
        if not (_names_of(opinfo) & wanted) or (keep is not None and opinfo.name not in keep):
            continue
        label = opinfo.name + (f".{opinfo.variant_test_name}" if opinfo.variant_test_name else "")
        for dtype in dtypes:
            if dtype not in opinfo.supported_dtypes("cpu"):
                continue
            try:
                with sample_sizes(sizes):
                    samples = list(opinfo.sample_inputs("cpu", dtype, requires_grad=False))
            except Exception:  # an OpInfo whose samples need something this machine lacks
                continue
            inplace = opinfo.inplace_variant
            for i, sample in enumerate(samples[:per_op]):
                fn, tensors = _flat_call(opinfo.op, (sample.input, *sample.args), dict(sample.kwargs))
                yield Sample(f"{label}[{str(dtype).split('.')[-1]} #{i}]", fn, tensors)
                if inplace is not None and with_inplace and isinstance(sample.input, torch.Tensor):
                    fn, tensors = _flat_call(lambda x, *a, op=inplace, **k: op(x.clone(), *a, **k),
                                             (sample.input, *sample.args), dict(sample.kwargs))
                    if _runs(fn, tensors):  # an input that broadcasts cannot be written into
                        yield Sample(f"{label}_[{str(dtype).split('.')[-1]} #{i}]", fn, tensors)


def _runs(fn: Callable[..., list[torch.Tensor]], tensors: list[torch.Tensor]) -> bool:
    try:
        fn(*tensors)
    except Exception:
        return False
    return True


def hand_samples() -> list[Sample]:
    """Samples for ops that have a rule but no OpInfo, or that only a symbolic trace emits."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    x, y = randn(4, 6, 8), randn(4, 6, 8)
    mask = randn(4, 6, 8) > 0
    calls: list[tuple[str, Callable, tuple, bool]] = [
        ("and", lambda a, b: a & b, (mask, randn(6, 8) > 0), False),
        ("or", lambda a, b: a | b, (mask, randn(4, 1, 8) > 0), False),
        ("_softmax", lambda a: aten._softmax(a, -1, False), (x,), False),
        ("_log_softmax", lambda a: aten._log_softmax(a, 1, False), (x,), False),
        ("_to_copy", lambda a: aten._to_copy(a, dtype=torch.float64), (x,), False),
        ("_unsafe_view", lambda a: aten._unsafe_view(a, [4, 6, 2, 4]), (x,), False),
        ("alias", lambda a: aten.alias(a), (x,), False),
        ("detach", lambda a: a.detach() * 2, (x,), False),
        ("lift_fresh_copy", lambda a: aten.lift_fresh_copy(a), (x,), False),
        ("dropout-eval", lambda a: torch.dropout(a, 0.5, False), (x,), False),
        ("feature_dropout-eval", lambda a: torch.feature_dropout(a, 0.5, False), (x,), False),
        ("native_dropout-eval", lambda a: list(torch.native_dropout(a, 0.5, False)), (x,), False),
        ("numpy_T", lambda a: aten.numpy_T(a), (x,), False),
        ("type_as", lambda a, b: a.type_as(b), (x, y.double()), False),
        ("sizes", lambda a: a.view(a.shape[0], a.shape[1], -1) * a.shape[-1], (x,), True),
        ("sizes-2", lambda a: a.reshape(a.shape[0] * a.shape[1], a.shape[2]).sum(0), (x,), True),
        ("new_ones", lambda a: a.new_ones(a.shape) + a, (x,), False),
        ("new_zeros", lambda a: a.new_zeros(4, 6, 8) * a, (x,), False),
        ("new_full", lambda a: a.new_full((6, 8), 2.0) * a, (x,), False),
        ("grouped_mm", lambda a, w, offs: torch._grouped_mm(a, w, offs=offs),  # bf16 only, on CPU
         (randn(8, 16, dtype=torch.bfloat16), randn(2, 16, 16, dtype=torch.bfloat16),
          torch.tensor([4, 8], dtype=torch.int32)), False),
        ("index_select", lambda a, i: a.index_select(1, i), (x, torch.tensor([0, 2, 5])), False),
        # advanced indexing (aten.index.Tensor, which no OpInfo reaches): adjacent indexed dims
        # stay in place, dims indexed apart go in front, an index of rank 2 adds a dim
        ("index-2d", lambda a, i: a[:, i], (x, torch.tensor([[0, 2, 5], [1, 1, 3]])), False),
        ("index-apart", lambda a, i, j: a[i, :, j], (x, torch.tensor([0, 3]), torch.tensor([1, 7])), False),
        ("index-adjacent", lambda a, i, j: a[:, i, j], (x, torch.tensor([0, 5]), torch.tensor([2, 7])), False),
        ("index-broadcast", lambda a, i, j: a[i, j], (x, torch.tensor([[0], [3]]), torch.tensor([1, 2, 5])), False),
        ("sdpa-gqa", lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
         (randn(2, 4, 6, 8), randn(2, 2, 6, 8), randn(2, 2, 6, 8)), False),
        ("sdpa-mask", lambda q, k, v, m: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m),
         (randn(2, 4, 6, 8), randn(2, 4, 6, 8), randn(2, 4, 6, 8), randn(2, 4, 6, 6)), False),
        ("repeat_interleave", lambda a: a.repeat_interleave(2, dim=1), (x,), False),
        # the output size given as a literal (mamba2 repeats its B/C groups to its heads so)
        ("repeat_interleave-output_size", lambda a: a.repeat_interleave(2, dim=1, output_size=12), (x,), False),
        ("repeat-tiles", lambda a: a.repeat(2, 1, 2, 1), (x,), False),
        # a fused gate|up viewed as [..., 2, inner] (moshi), then one of the two taken
        ("view-blocks-apart", lambda a: [a.view(4, 6, 2, 4) * 2, a.view(4, 6, 2, -1)[:, :, 1]], (x,), False),
        # an interleaved gate|up taken apart (gpt-oss), and every third of a dim of 24
        ("slice-every-other", lambda a, b: [a[..., ::2] * 2, a[..., 1::2], b[:, 2::3]], (x, randn(4, 24)), False),
        ("expand_as", lambda a, b: a.expand_as(b) * b, (randn(4, 1, 8), x), False),
        ("concatenate", lambda a, b: [torch.concatenate([a, b], 1), torch.concat([b, a], -1)], (x, y), False),
        # rows of a table looked up by id, negative ids counting from the end (weight[position_ids])
        ("index-rows", lambda w, i: w[i] * 2, (randn(12, 8), torch.tensor([[0, 5, -1], [11, -12, 3]])), False),
        ("index_add", lambda a, i, b: a.index_add(0, i, b, alpha=2), (x, torch.tensor([3, 0, 3]), randn(3, 6, 8)),
         False),
        # a mamba in_proj's z|x|B|C|dt: the pieces of a split keep the blocks held whole, through
        # the depthwise conv of x|B|C, its causal cut, activation and transposes
        ("fused-conv-pieces", lambda a, w, cw, cb: _conv_pieces(a, w, cw, cb),
         (randn(2, 5, 8), randn(32, 8), randn(16, 1, 4), randn(16)), False),
        ("embedding", lambda w, i: torch.nn.functional.embedding(i, w), (randn(12, 8), torch.tensor([[0, 5, 11]])), False),
        # a vocabulary that splits over no world size here: padded lookups and logits
        ("embedding-odd-vocab", lambda w, i: torch.nn.functional.embedding(i, w) * 2,
         (randn(13, 8), torch.tensor([[0, 5, 12, 6]])), False),
        ("logits-odd-vocab", lambda x, w, b: torch.tanh(torch.nn.functional.linear(x, w, b) / 3.0) * 3.0,
         (randn(2, 4, 8), randn(13, 8), randn(13)), False),
        # multi-query attention's fused q|k|v: the q block sharded, the one kv head whole
        ("fused-q-kv", lambda x, w, b: list(torch.nn.functional.linear(x, w, b).split([8, 8], -1)),
         (randn(2, 3, 8), randn(16, 8), randn(16)), False),
        ("fused-q-kv-unsqueezed", lambda x, w: [t * 2 for t in torch.nn.functional.linear(x, w).unsqueeze(1).split(
            [8, 8], 3)], (randn(2, 3, 8), randn(16, 8)), False),
        ("logits-odd-vocab-sum", lambda x, w: torch.nn.functional.linear(x, w).sum(-1), (randn(2, 4, 8), randn(13, 8)),
         False),
        ("contiguous", lambda a: a.transpose(0, 1).contiguous(), (x,), False),
        ("copy", lambda a, b: aten.copy(a, b), (x, randn(6, 8)), False),
        ("copy_", lambda a, b: a.clone().copy_(b), (x, randn(8)), False),
        ("to-dtype-layout", lambda a: aten.to.dtype_layout(a, dtype=torch.float64) + 1, (x,), False),
        ("norm-dim", lambda a: aten.norm.ScalarOpt_dim(a, 2, [1]), (x,), False),
        ("to-export", lambda a: a.to(torch.float64) * 2, (x,), True),
        ("numel", lambda a: a * a.numel(), (x,), True),
        ("stride", lambda a: a * a.stride(0), (x,), True),
        # the causal depthwise conv of Mamba blocks (every channel its own group), and a grouped
        # conv whose groups map 4 input channels to 2 output channels
        ("conv1d-depthwise", lambda a, w, b: torch.nn.functional.conv1d(a, w, b, padding=3, groups=24)[..., :8],
         (randn(2, 24, 8), randn(24, 1, 4), randn(24)), False),
        # complex rotary embeddings: pairs of the last dim as complex numbers, rotated, back to pairs
        ("complex-rotary", lambda a, f: torch.view_as_real(torch.view_as_complex(a.reshape(4, 6, 4, 2))
                                                            * torch.view_as_complex(f.reshape(6, 4, 2))).flatten(-2),
         (x, randn(6, 8)), False),
        ("view_as", lambda a, b: a.view_as(b) * b, (x, randn(4, 6, 2, 4)), False),
        # rotary embeddings built as pairs stacked in a new last dim, then reshaped as the input
        ("reshape_as", lambda a, b: torch.stack([-a[..., 1::2], a[..., ::2]], -1).reshape_as(a) * b, (x, randn(6, 8)),
         False),
        ("pad-sequence", lambda a: torch.nn.functional.pad(a, (3, 0)), (x,), False),
        ("conv1d-grouped", lambda a, w: torch.nn.functional.conv1d(a, w, groups=6), (randn(2, 24, 8), randn(12, 4, 3)),
         False),
        # aten.convolution itself (what a traced nn.Conv reaches on some paths), and transposed
        ("convolution-grouped", lambda a, w: torch.convolution(a, w, None, [1], [1], [1], False, [0], 6),
         (randn(2, 24, 8), randn(12, 4, 3)), False),
        ("convolution-transposed", lambda a, w: torch.convolution(a, w, None, [1], [0], [1], True, [0], 6),
         (randn(2, 24, 8), randn(24, 2, 3)), False),
    ]
    grouped = _transformers_grouped_mm()
    if grouped is not None:
        calls.append(("grouped_mm_fallback", grouped, (randn(8, 16), randn(2, 16, 12),
                                                       torch.tensor([4, 8], dtype=torch.int32)), False))
    samples = []
    for label, fn, tensors, symbolic in calls:
        flat, leaves = _flat_call(lambda *a, fn=fn: fn(*a), tensors, {})
        samples.append(Sample(f"hand:{label}", flat, leaves, symbolic))
    return samples


def _conv_pieces(a: torch.Tensor, w: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor) -> list[torch.Tensor]:
    zx, rest = torch.nn.functional.linear(a, w).split([16, 16], -1)
    conv = torch.nn.functional.conv1d(zx.transpose(1, 2), conv_w, conv_b, padding=3, groups=16)[..., :a.shape[1]]
    z, x = torch.nn.functional.silu(conv).transpose(1, 2).split([8, 8], -1)
    return [z, x * 2, rest.sigmoid()]


def _transformers_grouped_mm() -> Optional[Callable]:
    """transformers' grouped matmul op (its MoE experts' fallback), when transformers is installed."""
    try:
        import transformers.integrations.moe  # noqa: F401  (registers the op)
    except ImportError:
        return None
    op = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    return None if op is None else (lambda a, w, offs: op(a, w, offs))
