"""Checkpoints transformers converts on load (``autotp.conversions``): a mixture of experts saved
by ``save_pretrained`` stores every expert's projections apart, which the model holds stacked and
fused. Every tensor autotp reads, whole or as any rank's slice, must equal what transformers'
own ``from_pretrained`` loads (and the saved model held); a slice must be read as slices of the
stored tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import autotp.conversions as conversions
from autotp.checkpoints import LoadError, open_checkpoint
from autotp.loading import checkpoint_source
from autotp.placement import Replicate, Shard, local_chunk
from models import hf_model

MOE = ["mixtral", "qwen2_moe"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    out = {}
    for name in MOE:
        model = hf_model(name, seed=3)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        out[name] = directory, model
    return out


def _placements(shape: list[int]) -> list[tuple[Shard, int]]:
    """Layouts of every dim the shape takes, at 2 and 4 ranks: plain, two fused blocks, padded."""
    out = []
    for dim, size in enumerate(shape):
        for world in (2, 4):
            out += [(Shard(dim), world)] if size % world == 0 else []
            out += [(Shard(dim, blocks=2), world)] if size % (2 * world) == 0 else []
        out.append((Shard(dim, padded=True), 3))
    return out


def _loaded_by_transformers(directory: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return type(model).from_pretrained(directory).state_dict()


@pytest.mark.parametrize("name", MOE)
def test_every_read_equals_what_transformers_loads(saved, name) -> None:
    directory, model = saved[name]
    stored = open_checkpoint(directory).keys()
    assert not set(model.state_dict()) <= set(stored)  # the experts are stored apart: a conversion is needed
    theirs = _loaded_by_transformers(directory, model)
    source = checkpoint_source(directory, model)
    checked = 0
    for tensor_name, expected in theirs.items():
        whole = source.read(tensor_name, Replicate(), 0, 1)
        assert torch.equal(whole, expected) and torch.equal(whole, model.state_dict()[tensor_name]), tensor_name
        for placement, world in _placements(list(expected.shape)):
            for rank in range(world):
                got = source.read(tensor_name, placement, rank, world)
                want = local_chunk(expected, placement, rank, world)
                assert got.shape == want.shape and torch.equal(got, want), (tensor_name, placement, rank)
                checked += 1
    assert checked > 400


def test_a_rank_reads_slices_of_the_stored_experts(saved, monkeypatch) -> None:
    """gate|up sharded by blocks: rank 1 of 2 reads half of each expert's w1 and w3 rows, never a
    whole stored tensor."""
    directory, model = saved["mixtral"]
    source = checkpoint_source(directory, model)
    checkpoint = source.checkpoint.checkpoint
    reads: list[tuple[str, object]] = []
    real = checkpoint.read_ranges
    monkeypatch.setattr(checkpoint, "read_ranges", lambda key, dim, ranges: reads.append((key, dim)) or real(key, dim, ranges))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    source.read(name, Shard(1, blocks=2), 1, 2)
    assert len(reads) == 2 * 4 and all(dim == 0 for _, dim in reads), reads  # w1 and w3 of 4 experts, rows only
    assert {key.rsplit(".", 2)[-2] for key, _ in reads} == {"w1", "w3"}


def test_a_conversion_run_whole_equals_the_sliced_one(saved, monkeypatch) -> None:
    """Where a conversion is not described as slices, transformers' own operations convert the
    whole tensors; the rank's slice of that is the same."""
    directory, model = saved["qwen2_moe"]
    sliced = checkpoint_source(directory, model)
    monkeypatch.setattr(conversions._Group, "described", lambda *args: None)
    whole = checkpoint_source(directory, model)
    assert any(isinstance(t, conversions._Converted) for t in whole.checkpoint.tensors.values())
    for tensor_name in model.state_dict():
        if "experts" not in tensor_name:
            continue
        for placement, world in _placements(list(model.state_dict()[tensor_name].shape)):
            assert torch.equal(whole.read(tensor_name, placement, world - 1, world),
                               sliced.read(tensor_name, placement, world - 1, world)), (tensor_name, placement)


def test_legacy_names_are_read_as_transformers_renames_them(tmp_path) -> None:
    """``LayerNorm.gamma`` / ``beta``, as old BERT-style checkpoints spell a norm's weight and bias."""
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    model = BertLMHeadModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=64, is_decoder=True)).eval()
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in state.items()}
    assert legacy.keys() != state.keys()
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    source = checkpoint_source(tmp_path, model)
    for tensor_name, expected in model.state_dict().items():
        if source.has(tensor_name):
            assert torch.equal(source.read(tensor_name, Replicate(), 0, 1), expected), tensor_name
    assert source.has("bert.embeddings.LayerNorm.weight")


def test_an_expert_missing_from_the_checkpoint_is_refused(saved, tmp_path) -> None:
    directory, model = saved["mixtral"]
    state = load_file(str(directory / "model.safetensors"))
    del state["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError, match="experts"):
        checkpoint_source(tmp_path, model)


def test_a_converter_that_keeps_the_name_is_applied(tmp_path) -> None:
    """Qwen3-VL-MoE's experts keep their names and are transposed from the original layout: no
    key is renamed, yet transformers converts them, and so must autotp."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    config = Qwen3VLMoeConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_experts=4,
                         num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=128, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           deepstack_visual_indexes=[]))
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    experts = [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts
    save_file({k: v.transpose(1, 2).contiguous() if k in experts else v for k, v in state.items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    theirs = _loaded_by_transformers(tmp_path, model)
    source = checkpoint_source(tmp_path, model)
    for key in experts:
        name = next(n for n in theirs if n.endswith(key.split("layers.", 1)[1]))
        assert torch.equal(source.read(name, Replicate(), 0, 1), theirs[name]), name
        assert torch.equal(source.read(name, Shard(0), 1, 2), local_chunk(theirs[name], Shard(0), 1, 2)), name


def test_a_tensor_stored_twice_is_refused(saved, tmp_path) -> None:
    """Stored whole and as experts apart: which one transformers loads depends on the order it
    meets them, so autotp reads neither."""
    directory, model = saved["mixtral"]
    state = load_file(str(directory / "model.safetensors"))
    state["model.layers.0.mlp.experts.down_proj"] = model.state_dict()["model.layers.0.mlp.experts.down_proj"].contiguous()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError, match="holds model.layers.0.mlp.experts.down_proj twice"):
        checkpoint_source(tmp_path, model)


def test_a_missing_expert_is_refused_by_shape(saved, tmp_path) -> None:
    """Every projection of expert 3 gone: the stack holds 3 experts where the model has 4."""
    directory, model = saved["mixtral"]
    state = load_file(str(directory / "model.safetensors"))
    state = {k: v for k, v in state.items() if ".layers.0.block_sparse_moe.experts.3." not in k}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"has shape \[3, .*the model's model.layers.0.mlp.experts.* \[4, "):
        checkpoint_source(tmp_path, model)


def test_a_head_checkpoint_loads_into_the_base_model(saved) -> None:
    from transformers import MixtralModel

    directory, model = saved["mixtral"]
    base = MixtralModel(model.config).eval()
    source = checkpoint_source(directory, base)  # its head is not read
    for name, expected in model.model.state_dict().items():
        assert torch.equal(source.read(name, Replicate(), 0, 1), expected), name
