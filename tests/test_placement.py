"""Placements: text form round trip, block arithmetic and the local chunk of fused layouts."""

import pytest
import torch

from autotp.placement import Partial, Replicate, Shard, block_sizes, divides, local_chunk, parse_placement


@pytest.mark.parametrize("p", [Replicate(), Partial(), Shard(0), Shard(2, 3), Shard(1, (64, 32, 32)), Shard(1, padded=True),
                               Shard(0, (64, 16, 16), whole=(1, 2)), Shard(2, 3, whole=(0,))])
def test_text_round_trip(p):
    assert parse_placement(str(p)) == p


def test_negative_dim_is_rejected():
    with pytest.raises(ValueError):
        Shard(-1)


@pytest.mark.parametrize(
    "shard, size, world, expected",
    [(Shard(0), 8, 2, True), (Shard(0), 6, 4, False), (Shard(0, 3), 192, 2, True),
     (Shard(0, 3), 96, 64, False), (Shard(0, (64, 32, 32)), 128, 4, True), (Shard(0, (64, 32, 32)), 128, 64, False),
     # a padded shard is for the dims that do not split evenly only
     (Shard(0, padded=True), 50257, 2, True), (Shard(0, padded=True), 32000, 2, False)],
)
def test_divides(shard, size, world, expected):
    assert divides(shard, size, world) is expected


def test_block_sizes_must_add_up():
    assert block_sizes(Shard(0, (4, 2)), 6) == [4, 2]
    with pytest.raises(ValueError):
        block_sizes(Shard(0, (4, 2)), 7)


def test_local_chunk_takes_every_block():
    q, k, v = torch.arange(4), torch.arange(10, 14), torch.arange(20, 24)
    fused = torch.cat([q, k, v])
    assert local_chunk(fused, Shard(0, 3), 1, 2).tolist() == [2, 3, 12, 13, 22, 23]
    uneven = torch.cat([torch.arange(4), torch.arange(10, 12), torch.arange(20, 22)])
    assert local_chunk(uneven, Shard(0, (4, 2, 2)), 0, 2).tolist() == [0, 1, 10, 20]


def test_local_chunks_reassemble():
    full = torch.randn(6, 12)
    parts = [local_chunk(full, Shard(1, 3), r, 2) for r in range(2)]
    # rank r holds block b's r-th half: interleave back
    rebuilt = torch.cat([torch.cat([p[:, 2 * b:2 * b + 2] for p in parts], 1) for b in range(3)], 1)
    assert torch.equal(rebuilt, full)


def test_replicas_group_ranks_on_one_chunk():
    full = torch.arange(8)
    two_heads = [local_chunk(full, Shard(0, replicas=2), r, 4).tolist() for r in range(4)]
    assert two_heads == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]
    assert parse_placement("Shard(1, blocks=3, replicas=2)") == Shard(1, 3, 2)
    assert divides(Shard(0, replicas=2), 2, 4) and not divides(Shard(0), 2, 4)


def test_refine_is_the_same_as_slicing_the_full_tensor():
    from autotp.placement import refine

    full = torch.arange(24).reshape(2, 12)
    fine = Shard(1, 3)
    for rank in range(4):
        coarse = local_chunk(full, Shard(1, 3, replicas=2), rank, 4)
        assert torch.equal(refine(coarse, fine, 2, rank), local_chunk(full, fine, rank, 4))


def test_padded_chunks_hold_the_real_rows_then_zeros():
    from autotp.placement import rank_ranges, valid_length

    full = torch.arange(1, 8)  # 7 rows over 2, 3, 4 ranks: 4, 3, 2 rows each
    assert [local_chunk(full, Shard(0, padded=True), r, 2).tolist() for r in range(2)] == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert [local_chunk(full, Shard(0, padded=True), r, 4).tolist() for r in range(4)] == [[1, 2], [3, 4], [5, 6], [7, 0]]
    assert [rank_ranges(Shard(0, padded=True), 7, r, 4) for r in range(4)] == [[(0, 2)], [(2, 4)], [(4, 6)], [(6, 7)]]
    assert [valid_length(Shard(0, padded=True), 7, r, 3) for r in range(3)] == [3, 3, 1]
    # a rank holding nothing but padding (5 rows over 4: 2, 2, 1, 0) is not a layout worth having
    assert not divides(Shard(0, padded=True), 5, 4) and not divides(Shard(0, padded=True), 128, 256)
    with pytest.raises(ValueError):
        Shard(0, 3, padded=True)  # one block, no replicas


def test_whole_blocks_are_held_by_every_rank():
    fused = torch.arange(6)  # q (4) | k (1) | v (1): one kv head, held whole
    mqa = Shard(0, (4, 1, 1), whole=(1, 2))
    assert [local_chunk(fused, mqa, r, 2).tolist() for r in range(2)] == [[0, 1, 4, 5], [2, 3, 4, 5]]
    assert divides(mqa, 6, 4) and not divides(Shard(0, (4, 1, 1)), 6, 2)
    with pytest.raises(ValueError):
        Shard(0, 2, whole=(0, 1))  # every block whole is Replicate()


def test_a_strided_shard_holds_its_chunk_of_every_block() -> None:
    # [batch * heads] with 4 heads over 2 ranks: rank 0 holds heads 0-1 of every batch row
    shard = Shard(0, period=4)
    assert parse_placement(str(shard)) == shard and str(shard) == "Shard(0, period=4)"
    x = torch.arange(12)
    assert local_chunk(x, shard, 0, 2).tolist() == [0, 1, 4, 5, 8, 9]
    assert local_chunk(x, shard, 1, 2).tolist() == [2, 3, 6, 7, 10, 11]
    assert divides(shard, 12, 2) and divides(shard, 12, 4) and not divides(shard, 12, 3)
    with pytest.raises(ValueError):
        Shard(0, blocks=2, period=4)  # a period is its own layout: no fused blocks, replicas or padding
