"""The streaming safetensors reader and writer agree with the safetensors library, and a
slice read from a file equals ``local_chunk`` of the full tensor for every layout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from autotp.placement import Shard, local_chunk, rank_ranges
from autotp.safetensors_io import SafetensorsFormatError, SafetensorsReader, SafetensorsWriter, empty_huge

TENSORS = {
    "w": torch.randn(6, 12),
    "ids": torch.arange(10, dtype=torch.int64),
    "half": torch.randn(4, 6, 9).to(torch.bfloat16),
    "scalar": torch.tensor(3.0),
}


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, str(path))
    return path


def test_reads_whole_tensors(saved):
    reader = SafetensorsReader(saved)
    for name, value in TENSORS.items():
        assert torch.equal(reader.read(name), value), name


@pytest.mark.parametrize("name, shard", [
    ("w", Shard(0)), ("w", Shard(1)), ("w", Shard(1, 3)), ("w", Shard(1, (6, 3, 3))), ("half", Shard(1)), ("half", Shard(2, 3)),
])
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_reads_each_ranks_slice(saved, name, shard, rank):
    full = TENSORS[name]
    ranges = rank_ranges(shard, full.shape[shard.dim], rank, 3)
    assert torch.equal(SafetensorsReader(saved).read(name, shard.dim, ranges), local_chunk(full, shard, rank, 3))


@pytest.mark.parametrize("gap, run, per_call", [(0, 1 << 20, 512), (16, 1 << 20, 3), (64 << 10, 16, 512), (64 << 10, 1 << 20, 2)],
                         ids=["no-coalescing", "small-gaps-only", "small-runs-only", "two-runs-per-call"])
def test_coalesced_reads_equal_the_slice(tmp_path, monkeypatch, gap, run, per_call):
    import autotp.safetensors_io as io

    monkeypatch.setattr(io, "_COALESCE_GAP", gap)
    monkeypatch.setattr(io, "_COALESCE_RUN", run)
    monkeypatch.setattr(io, "_RUNS_PER_CALL", per_call)
    full = torch.randn(1500, 12)  # a column slice: one run per row, 1500 runs
    save_file({"w": full}, str(tmp_path / "w.safetensors"))
    reader = SafetensorsReader(tmp_path / "w.safetensors")
    for shard in (Shard(1), Shard(1, 3)):
        for rank in range(3):
            got = reader.read("w", 1, rank_ranges(shard, 12, rank, 3))
            assert torch.equal(got, local_chunk(full, shard, rank, 3)), (shard, rank)


def test_mapped_reads_are_views_of_the_file_only_when_contiguous(saved):
    reader = SafetensorsReader(saved)
    rows = reader.read("w", 0, rank_ranges(Shard(0), 6, 1, 3), mapped=True)
    columns = reader.read("w", 1, rank_ranges(Shard(1), 12, 1, 3), mapped=True)
    assert torch.equal(rows, local_chunk(TENSORS["w"], Shard(0), 1, 3))
    assert torch.equal(columns, local_chunk(TENSORS["w"], Shard(1), 1, 3))
    mapping = reader._mapping()
    assert rows.untyped_storage().data_ptr() == mapping.data_ptr(), "a row slice is a view of the mapped file"
    assert columns.untyped_storage().data_ptr() != mapping.data_ptr(), "a column slice is copied"
    reader.close()
    rows.add_(1)  # private mapping: the tensor stays valid after close, and writes never reach the file
    assert torch.equal(SafetensorsReader(saved).read("w"), TENSORS["w"])


def test_a_copy_of_2_mib_or_more_is_its_own_exact_storage(tmp_path):
    """Copied slices from 2 MiB up live in their own huge-page-advised map (empty_huge): the
    values, the layout and the storage size are those of a plain tensor."""
    full = torch.randn(1024, 1536)
    save_file({"big": full}, str(tmp_path / "big.safetensors"))
    reader = SafetensorsReader(tmp_path / "big.safetensors")
    for rank in range(3):  # 2 MiB column slices, read with coalesced preadv into the map
        columns = reader.read("big", 1, rank_ranges(Shard(1), 1536, rank, 3))
        assert torch.equal(columns, local_chunk(full, Shard(1), rank, 3))
        assert columns.is_contiguous() and columns.untyped_storage().nbytes() == 1024 * 512 * 4
        columns.add_(1)  # writable, and private to this tensor
    assert torch.equal(reader.read("big"), full)
    assert empty_huge([3, 5], torch.bfloat16).shape == (3, 5)  # below 2 MiB: plain torch.empty


def test_writer_output_loads_with_safetensors(tmp_path):
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, [(k, v.dtype, list(v.shape)) for k, v in TENSORS.items()], {"format": "pt"})
    for name, value in TENSORS.items():
        writer.write(name, value)
    writer.close()
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in TENSORS.items())


def test_writer_refuses_out_of_order_tensors(tmp_path):
    writer = SafetensorsWriter(tmp_path / "o.safetensors", [("a", torch.float32, [2])], {})
    with pytest.raises(SafetensorsFormatError):
        writer.write("b", torch.zeros(2))


def test_truncated_file_is_reported(saved):
    saved.write_bytes(saved.read_bytes()[:-4])
    with pytest.raises(SafetensorsFormatError, match="truncated"):
        SafetensorsReader(saved)
