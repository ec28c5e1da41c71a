"""Checkpoint formats (``autotp.checkpoints``): ``pytorch_model*.bin`` read slice by slice like
``*.safetensors``, checked against the safetensors reader on the same weights, and on real ranks
against the unsharded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import autotp
from autotp.checkpoints import LoadError, SafetensorsCheckpoint, TorchCheckpoint, has_weights, open_checkpoint
from autotp.loading import check_checkpoint, checkpoint_names, checkpoint_source
from autotp.placement import Replicate, Shard
from distributed import run_ranks
from models import assert_close_to, hf_model, token_ids

IDS = token_ids(2, 9, seed=5)


def _save_bin(model: torch.nn.Module, directory: Path, files: int = 1) -> None:
    """The state dict as ``torch.save`` wrote it for transformers before safetensors: one
    ``pytorch_model.bin``, or ``files`` shards and their index."""
    model.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if files == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names, weight_map = sorted(state), {}
    for i in range(files):
        part = f"pytorch_model-{i + 1:05d}-of-{files:05d}.bin"
        chunk = names[i::files]
        torch.save({k: state[k] for k in chunk}, directory / part)
        weight_map.update({k: part for k in chunk})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def gpt2_both(tmp_path_factory) -> tuple[Path, Path, Path]:
    """GPT-2 with an odd vocabulary (padded shards), saved as safetensors, as one .bin and as
    three .bin shards with an index."""
    model = hf_model("gpt2_odd_vocab", seed=3)
    st, single, sharded = (tmp_path_factory.mktemp(n) for n in ("st", "bin", "bin3"))
    model.save_pretrained(st)
    _save_bin(model, single)
    _save_bin(model, sharded, files=3)
    return st, single, sharded


PLACEMENTS = [Replicate(), Shard(0), Shard(1), Shard(0, padded=True), Shard(1, 3), Shard(0, replicas=2)]


@pytest.mark.parametrize("mapped", [False, True], ids=["copied", "mapped"])
@pytest.mark.parametrize("which", ["single", "sharded"])
def test_bin_slices_equal_the_safetensors_slices(gpt2_both, which, mapped) -> None:
    st_dir, single, sharded = gpt2_both
    st = SafetensorsCheckpoint(st_dir)
    tb = TorchCheckpoint(single if which == "single" else sharded, mapped=mapped)
    assert set(st.keys()) <= set(tb.keys())  # torch.save keeps a tied name that save_pretrained drops
    checked = 0
    for name in st.keys():
        for placement in PLACEMENTS:
            for rank in range(4):
                try:
                    theirs = st.read(name, placement, rank, 4)
                except (ValueError, IndexError):  # a layout this tensor's shape does not take
                    with pytest.raises((ValueError, IndexError)):
                        tb.read(name, placement, rank, 4)
                    continue
                ours = tb.read(name, placement, rank, 4)
                assert ours.shape == theirs.shape and torch.equal(ours, theirs), (name, placement, rank)
                assert ours.is_contiguous(), (name, placement, rank)
                checked += 1
    assert checked > 100


def test_open_checkpoint_prefers_safetensors_and_names_what_is_missing(gpt2_both, tmp_path) -> None:
    st_dir, single, _ = gpt2_both
    assert isinstance(open_checkpoint(single), TorchCheckpoint)
    both = tmp_path / "both"
    both.mkdir()
    for f in [*st_dir.iterdir(), single / "pytorch_model.bin"]:
        (both / f.name).write_bytes(f.read_bytes())
    assert isinstance(open_checkpoint(both), SafetensorsCheckpoint)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not has_weights(empty) and has_weights(single)
    with pytest.raises(LoadError, match="neither \\*.safetensors nor pytorch_model\\*.bin"):
        open_checkpoint(empty)


class _NotATensor:
    pass


def test_a_bin_that_holds_more_than_tensors_is_refused(tmp_path) -> None:
    torch.save({"weight": torch.ones(2), "extra": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LoadError, match="not a torch checkpoint autotp can read safely"):
        TorchCheckpoint(tmp_path)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "gone.bin"}}))
    with pytest.raises(LoadError, match="lists gone.bin, which is missing"):
        TorchCheckpoint(tmp_path)


def _bin_worker(rank: int, world: int, directory: str) -> torch.Tensor:
    from transformers import AutoConfig, AutoModelForCausalLM

    with autotp.init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    tp_model = autotp.parallelize(model.eval(), checkpoint=directory)
    with torch.no_grad():
        return tp_model(IDS).logits


@pytest.mark.distributed
def test_parallelize_reads_a_sharded_bin_checkpoint(tmp_path) -> None:
    model = hf_model("llama_gqa", seed=11)
    with torch.no_grad():
        reference = model(IDS).logits
    _save_bin(model, tmp_path, files=2)
    for logits in run_ranks(_bin_worker, 2, str(tmp_path)):
        assert_close_to(reference, logits)


def _base_worker(rank: int, world: int, directory: str) -> torch.Tensor:
    return _bin_worker(rank, world, directory)


@pytest.mark.distributed
def test_a_checkpoint_saved_from_the_base_model_loads_into_the_model_with_a_head(tmp_path) -> None:
    """As the classic ``gpt2`` checkpoints are: ``GPT2Model``'s keys (``h.0.attn...``, no
    ``lm_head``) for a ``GPT2LMHeadModel`` (``transformer.h.0.attn...``, its head tied)."""
    model = hf_model("gpt2", seed=13)
    with torch.no_grad():
        reference = model(IDS).logits
    model.transformer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    for logits in run_ranks(_base_worker, 2, str(tmp_path)):
        assert_close_to(reference, logits)


def test_base_model_keys_are_matched_both_ways_and_a_missing_head_is_named(tmp_path) -> None:
    from transformers import LlamaModel

    head_model = hf_model("llama", seed=1)  # lm_head not tied
    head_model.model.save_pretrained(tmp_path / "base")  # keys without "model.", no lm_head
    with pytest.raises(LoadError, match="missing 1 tensor\\(s\\) the model needs: lm_head.weight"):
        check_checkpoint(open_checkpoint(tmp_path / "base"), head_model)
    head_model.save_pretrained(tmp_path / "full")  # a head model's checkpoint for the base model
    check_checkpoint(open_checkpoint(tmp_path / "full"), LlamaModel(head_model.config))


def test_keys_are_mapped_for_the_whole_checkpoint_at_once(tmp_path) -> None:
    """A checkpoint with the base model's prefix on its keys is read by name only: a key
    missing there is missing, not looked for without the prefix (as transformers decides)."""
    model = hf_model("llama", seed=1)
    names = checkpoint_names(model, ["model.norm.weight"])
    assert names["model.norm.weight"] == ["model.norm.weight"]
    assert checkpoint_names(model, ["norm.weight"])["model.norm.weight"] == ["model.norm.weight", "norm.weight"]
    state = model.state_dict()
    save_file({**{k: v.contiguous() for k, v in state.items() if k != "model.norm.weight"},
               "norm.weight": state["model.norm.weight"].contiguous()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError, match="missing 1 tensor\\(s\\) the model needs: model.norm.weight"):
        check_checkpoint(open_checkpoint(tmp_path), model)


def test_a_short_tensor_is_refused_though_a_padded_slice_would_hide_it(tmp_path) -> None:
    """131 vocabulary rows planned, 129 stored: at 4 ranks, rank 3's padded slice of either is 33
    rows, so only the whole shape tells (transformers refuses it too)."""
    model = hf_model("gpt2_odd_vocab", seed=3)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:129].contiguous()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"transformer.wte.weight has shape \[129, 64\], the model's .* \[131, 64\]"):
        checkpoint_source(tmp_path, model)


def test_an_index_that_lists_a_tensor_its_file_lacks_is_refused(tmp_path) -> None:
    model = hf_model("llama", seed=1)
    model.save_pretrained(tmp_path)
    names = list(load_file(str(tmp_path / "model.safetensors")))
    index = {"weight_map": {**{k: "model.safetensors" for k in names}, "model.extra.weight": "model.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="has no tensor 'model.extra.weight', which its index lists there"):
        SafetensorsCheckpoint(tmp_path).shape("model.extra.weight")


def _rope_worker(rank: int, world: int, directory: str) -> torch.Tensor:
    return _bin_worker(rank, world, directory)


@pytest.mark.distributed
def test_a_stored_non_persistent_buffer_is_not_read(tmp_path) -> None:
    """An older Llama conversion stores ``rotary_emb.inv_freq``, here for rope_theta 1e4, while
    config.json says 1e6 (a context extended by editing the config). transformers ignores the
    stored buffer and computes it from the config; so must every rank (it read the stale one:
    6.1 off in the logits)."""
    from transformers import AutoModelForCausalLM

    model = hf_model("llama", seed=2)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.rotary_emb.inv_freq"] = model.model.rotary_emb.inv_freq.clone()  # theta 1e4
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 1e6
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not torch.equal(reference_model.model.rotary_emb.inv_freq, state["model.rotary_emb.inv_freq"])
    with torch.no_grad():
        reference = reference_model(IDS).logits
    assert not checkpoint_source(tmp_path, reference_model).has("model.rotary_emb.inv_freq")
    for logits in run_ranks(_rope_worker, 2, str(tmp_path)):
        assert_close_to(reference, logits)


def test_two_different_stored_copies_of_a_tied_tensor_are_refused(tmp_path) -> None:
    """config.json ties the head to the embedding, the checkpoint holds both, different (an
    untied fine-tune that kept the flag): the model would read one for both uses."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in state  # saved once, as tied
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    checkpoint_source(tmp_path, model)  # two equal copies: fine
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError, match="holds lm_head.weight and model.embed_tokens.weight with different values"):
        checkpoint_source(tmp_path, model)


def test_without_an_index_model_safetensors_is_read_and_a_tensor_in_two_files_refused(tmp_path) -> None:
    """transformers reads ``model.safetensors`` from a directory without an index; an EMA copy
    beside it sorted last and was read instead. With no ``model.safetensors``, two files
    holding one tensor are ambiguous."""
    model = hf_model("llama", seed=1)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: torch.randn_like(v) for k, v in state.items()}, str(tmp_path / "model_ema.safetensors"))
    checkpoint = SafetensorsCheckpoint(tmp_path)
    assert set(checkpoint.weight_map.values()) == {tmp_path / "model.safetensors"}
    name = "model.norm.weight"
    assert torch.equal(checkpoint.read(name, Replicate(), 0, 1), state[name])
    (tmp_path / "model.safetensors").rename(tmp_path / "model-a.safetensors")
    with pytest.raises(LoadError, match="both hold .* has no index"):
        SafetensorsCheckpoint(tmp_path)
