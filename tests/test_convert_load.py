"""Checkpoints: convert a saved model into per-rank shard files and load them on real ranks.

Parity: every rank's logits after ``autotp.load`` (and after ``parallelize(meta_model,
checkpoint=DIR)``) equal the unsharded model's. Sizes: each rank file holds exactly the
plan's local bytes. Atomicity: a conversion killed mid-way leaves nothing that loads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import autotp
from autotp.convert import MANIFEST, rank_file, read_manifest
from autotp.errors import AutotpError
from autotp.placement import Shard
from autotp.plan import Plan
from distributed import run_ranks
from models import assert_close_to, hf_model, token_ids

pytestmark = pytest.mark.distributed

IDS = token_ids(2, 9, seed=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """Saved checkpoints and their unsharded logits on IDS (the mixtures of experts' stored as
    transformers saves them: each expert's projections apart, converted back on load)."""
    out = {}
    for name in ("llama_gqa", "gpt2", "gpt2_odd_vocab", "mixtral", "qwen2_moe"):
        model = hf_model(name, seed=7)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        with torch.no_grad():
            out[name] = (directory, model(IDS).logits)
    return out


def load_worker(rank: int, world: int, out_dir: str) -> dict:
    tp_model = autotp.load(out_dir)
    with torch.no_grad():
        logits = tp_model(IDS).logits
    return dict(logits=logits, bytes=tp_model.local_bytes())


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "gpt2_odd_vocab", "mixtral"])
@pytest.mark.parametrize("tp", [2, 4])
def test_convert_then_load_matches_unsharded(saved, tmp_path, name, tp):
    directory, reference = saved[name]
    out = autotp.convert(directory, tp, tmp_path / "out", progress=False)
    manifest = read_manifest(out)
    plan = Plan.from_dict(manifest["plan"])
    assert sorted(manifest["files"]) == [rank_file(r, tp) for r in range(tp)]
    for r in range(tp):  # each rank file holds exactly its planned slices
        with safe_open(str(out / rank_file(r, tp)), framework="pt") as f:
            for key in f.keys():
                assert list(f.get_slice(key).get_shape()) == plan.params[key].local_shape(tp), key
    for p in plan.sharded_params():  # tp pieces make the whole (a padded dim rounded up to tp's
        rows = p.shape[p.placement.dim]  # multiple), each held by `replicas` ranks (kv heads shared)
        rounded = -(-rows // tp) * tp if p.placement.padded else rows
        assert p.local_nbytes(tp) * tp == p.nbytes // rows * rounded * p.placement.replicas, p.name
    if name == "gpt2_odd_vocab":
        assert plan.params["lm_head.weight"].placement == Shard(0, padded=True)
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    for result in run_ranks(load_worker, tp, str(out)):
        assert_close_to(reference, result["logits"])
        # what the rank holds is its planned share (tensors mapped from its file count their own bytes)
        assert result["bytes"] == plan.bytes_per_rank(), (result["bytes"], plan.bytes_per_rank())


def checkpoint_worker(rank: int, world: int, directory: str) -> torch.Tensor:
    """The model is built with its parameters on meta; each rank reads its slices of DIR."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with autotp.init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    assert all(p.device.type == "meta" for p in model.parameters())
    tp_model = autotp.parallelize(model.eval(), checkpoint=directory)
    with torch.no_grad():
        return tp_model(IDS).logits


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "gpt2_odd_vocab", "mixtral", "qwen2_moe"])
def test_parallelize_reads_slices_from_the_checkpoint(saved, name):
    directory, reference = saved[name]
    for logits in run_ranks(checkpoint_worker, 2, str(directory)):
        assert_close_to(reference, logits)


def generation_worker(rank: int, world: int, directory: str, converted: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    with autotp.init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    from_checkpoint = autotp.parallelize(model.eval(), checkpoint=directory)
    loaded = autotp.load(converted)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    return {name: tp_model.generate(IDS, attention_mask=mask, pad_token_id=0)  # the rest from the checkpoint
            for name, tp_model in (("parallelize", from_checkpoint), ("load", loaded))}


def test_generate_takes_the_checkpoints_generation_config(tmp_path):
    """A checkpoint's generation_config.json (its stop tokens, sampling defaults, logits
    processors) was ignored by autotp.load and the command line, which built the model from
    config.json alone: other tokens than from_pretrained's, from the first new token on, a
    banned word generated (found by an adversarial review)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = hf_model("llama_gqa", seed=7)
    model.generation_config = GenerationConfig(repetition_penalty=3.0, no_repeat_ngram_size=2,
                                               bad_words_ids=[[10], [11]], max_new_tokens=7)
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(directory).eval().generate(IDS, attention_mask=mask,
                                                                                    pad_token_id=0)
        plain = hf_model("llama_gqa", seed=7).generate(IDS, attention_mask=mask, pad_token_id=0, max_new_tokens=7)
    assert not torch.equal(reference, plain)  # the checkpoint's settings change the tokens
    converted = autotp.convert(directory, 2, tmp_path / "tp2", progress=False)
    for result in run_ranks(generation_worker, 2, str(directory), str(converted)):
        for name, tokens in result.items():
            assert torch.equal(tokens, reference), (name, tokens[:, IDS.shape[1]:].tolist(),
                                                    reference[:, IDS.shape[1]:].tolist())


def test_torchrun_run_prints_and_saves_last_logits(saved, tmp_path):
    directory, reference = saved["llama_gqa"]
    out = autotp.convert(directory, 2, tmp_path / "out", progress=False)
    saved_logits = tmp_path / "logits.pt"
    ids = ",".join(str(i) for i in IDS[0].tolist())
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "autotp", "run", str(out), "--input-ids", ids, "--save", str(saved_logits)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr  # the group is destroyed before finalization (tests/test_exit.py)
    assert "logits of position 8" in done.stdout
    assert_close_to(reference[0, -1], torch.load(saved_logits))


def test_interrupted_conversion_leaves_nothing_that_loads(tmp_path):
    # big enough (~100 MB) that the conversion is still writing when it is killed
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=4096)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "big")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "autotp", "convert", str(tmp_path / "big"), "--tp", "2", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial = [f for d in tmp_path.glob(".out.autotp-tmp-*") for f in d.glob("rank-*")]
        if partial and sum(f.stat().st_size for f in partial) > 1 << 20:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "conversion finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    with pytest.raises(AutotpError, match="does not exist"):
        read_manifest(out)


def test_existing_output_is_refused_unless_overwrite(saved, tmp_path):
    directory, _ = saved["llama_gqa"]
    out = autotp.convert(directory, 2, tmp_path / "out", progress=False)
    with pytest.raises(AutotpError, match="already exists"):
        autotp.convert(directory, 2, out, progress=False)
    autotp.convert(directory, 4, out, overwrite=True, progress=False)
    assert json.loads((out / MANIFEST).read_text())["tp_size"] == 4
    assert not list(tmp_path.glob(".out.autotp-*"))


def test_an_output_over_the_model_directory_is_refused_even_with_overwrite(saved):
    """Converting a checkpoint into its own directory (or one that holds it) with --overwrite
    replaced the directory and deleted the weights it was reading."""
    directory, _ = saved["llama_gqa"]
    before = sorted(p.name for p in Path(directory).iterdir())
    for out in (Path(directory), Path(directory).parent, Path(directory) / ".." / Path(directory).name):
        with pytest.raises(AutotpError, match="is \\(or holds\\) the model directory"):
            autotp.convert(directory, 2, out, overwrite=True, progress=False)
    assert sorted(p.name for p in Path(directory).iterdir()) == before
