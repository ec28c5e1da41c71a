"""The command line: outputs of ``plan`` and ``verify``, and one test per bad input.

Bad input must give exit status 2 and exactly one line on stderr, ``autotp: error: ...``,
naming the problem, and no traceback. Rank-local problems (a missing or corrupt shard file)
run on real ranks and must fail every rank, naming the bad one, instead of hanging.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import autotp
from autotp.cli import main
from autotp.convert import rank_file
from autotp.plan import Plan
from distributed import run_ranks
from models import hf_model, save_word_tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    hf_model("llama_gqa").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def converted(llama_dir, tmp_path_factory) -> Path:
    return autotp.convert(llama_dir, 2, tmp_path_factory.mktemp("conv") / "out", progress=False)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("autotp: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_plan_table_from_a_config_only_directory(capsys, tmp_path):
    hf_model("llama_gqa").config.save_pretrained(tmp_path)  # config.json, no weights
    code, out, _ = run_cli(capsys, "plan", tmp_path, "--tp", "2")
    assert code == 0
    assert "model.layers.1.self_attn.o_proj.weight" in out and "rowwise" in out
    assert "per decoder layer: 2 (2 layers)" in out


def test_plan_as_hugging_face_tp_plan(capsys, llama_dir):
    code, out, err = run_cli(capsys, "plan", llama_dir, "--tp", "2", "--format", "hf")
    assert code == 0 and err == ""
    assert json.loads(out) == {
        "lm_head": "colwise_gather_output", "model.embed_tokens": "embedding_rowwise",
        "model.layers.*.mlp.down_proj": "rowwise", "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise", "model.layers.*.self_attn.k_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise", "model.layers.*.self_attn.q_proj": "colwise",
        "model.layers.*.self_attn.v_proj": "colwise",
    }


def test_python_m_autotp_plan_writes_its_whole_output_and_a_reader_may_leave_early(llama_dir):
    """``python -m autotp plan`` exits without the interpreter's teardown (autotp.cli.entry_point):
    what it printed must still arrive whole. A reader that leaves after one line (``| head -1``)
    is no error: it printed a BrokenPipeError traceback before."""
    command = [sys.executable, "-m", "autotp", "plan", str(llama_dir), "--tp", "2"]
    done = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Plan.from_dict(json.loads(done.stdout)).tp_size == 2
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline().startswith("parameter")
        proc.stdout.close()
        code, err = proc.wait(timeout=300), proc.stderr.read()
    assert code == 0 and "Traceback" not in err, err


def test_plan_hf_lists_what_it_cannot_express(capsys, tmp_path):
    hf_model("gpt2").config.save_pretrained(tmp_path)
    code, out, err = run_cli(capsys, "plan", tmp_path, "--tp", "2", "--format", "hf")
    assert code == 0 and json.loads(out) == {"transformer.wpe": "embedding_rowwise"}
    assert "not expressible: transformer.h.*.attn.c_attn.weight: colwise Shard(1, blocks=3) of a Conv1D" in err


def test_plan_json_is_a_plan(capsys, llama_dir):
    code, out, _ = run_cli(capsys, "plan", llama_dir, "--tp", "2", "--json")
    assert code == 0 and Plan.from_json(out).tp_size == 2


def test_plan_of_a_factory(capsys):
    code, out, _ = run_cli(capsys, "plan", "models:plain_block_with_inputs", "--tp", "2")
    assert code == 0 and "attn.qkv.weight" in out and "Shard(0, blocks=3)" in out


@pytest.mark.distributed
def test_verify_reports_parity(capsys, llama_dir):
    code, out, _ = run_cli(capsys, "verify", llama_dir, "--tp", "2")
    assert code == 0, out
    assert "its own weights" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("logits")] == ["OK"]


@pytest.mark.distributed
def test_verify_reads_the_checkpoint_against_transformers_loading(capsys, tmp_path):
    """A mixture of experts saved with its experts apart: transformers' from_pretrained loads
    the reference, each rank reads and merges its slices of the experts."""
    hf_model("mixtral", seed=2).save_pretrained(tmp_path)
    code, out, _ = run_cli(capsys, "verify", str(tmp_path), "--tp", "2")
    assert code == 0, out
    assert "from_pretrained" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("logits")] == ["OK"]


def _write_config(directory: Path, text: str | None = None, **fields) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fields) if text is None else text)
    return directory


def _saved_config(directory: Path, model_type: str, architectures: list[str], **fields) -> Path:
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, architectures=architectures, **fields).save_pretrained(directory)
    return directory


BAD_PLAN_INPUTS = {
    "missing-model": (lambda tmp: tmp / "nope", "does not exist"),
    "model-is-a-file": (lambda tmp: _write_config(tmp / "d", model_type="llama") / "config.json", "is a file"),
    "no-config": (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "has no config.json"),
    "garbage-config": (lambda tmp: _write_config(tmp / "g", "{oops"), "unreadable"),
    "unknown-model-type": (lambda tmp: _write_config(tmp / "u", model_type="not_a_model"), "model_type 'not_a_model' is not one transformers"),
    "no-model-type": (lambda tmp: _write_config(tmp / "n", hidden_size=8), "has no model_type"),
    "factory-import": (lambda tmp: "no_such_module_xyz:make", "cannot import no_such_module_xyz"),
    "not-a-causal-lm": (lambda tmp: _write_config(tmp / "t5", model_type="t5"),
                        "transformers has no causal-LM class for it"),
    "not-a-language-model": (lambda tmp: _saved_config(tmp / "vit", "vit", ["ViTForImageClassification"], hidden_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
                             "its config has no vocab_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLAN_INPUTS))
def test_bad_model_argument(capsys, tmp_path, case):
    make, expected = BAD_PLAN_INPUTS[case]
    code, _, err = run_cli(capsys, "plan", make(tmp_path), "--tp", "2")
    assert_one_line_error(code, err, expected)


def test_tp_larger_than_any_shardable_dim(capsys, llama_dir, tmp_path):
    assert_one_line_error(*run_cli(capsys, "plan", llama_dir, "--tp", "256")[::2], "divides no shardable dimension")
    assert_one_line_error(*run_cli(capsys, "convert", llama_dir, "--tp", "256", "-o", tmp_path / "o")[::2],
                          "divides no shardable dimension")
    assert_one_line_error(*run_cli(capsys, "plan", llama_dir, "--tp", "0")[::2], "--tp must be >= 1")


def _resave(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_checkpoint_missing_a_parameter(capsys, llama_dir, tmp_path):
    bad = _resave(llama_dir, tmp_path / "bad", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    code, _, err = run_cli(capsys, "convert", bad, "--tp", "2", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "missing 1 tensor(s) the model needs: model.layers.1.mlp.up_proj.weight")
    assert not (tmp_path / "o").exists()


def test_checkpoint_with_an_unexpected_parameter(capsys, llama_dir, tmp_path):
    bad = _resave(llama_dir, tmp_path / "bad", lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    code, _, err = run_cli(capsys, "convert", bad, "--tp", "2", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "holds 1 tensor(s) the model does not have: model.layers.9.extra.weight")


def test_convert_without_weights(capsys, tmp_path):
    hf_model("llama").config.save_pretrained(tmp_path / "cfg")
    code, _, err = run_cli(capsys, "convert", tmp_path / "cfg", "--tp", "2", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "has no weights to convert (*.safetensors or pytorch_model*.bin)")


def test_convert_refuses_existing_output(capsys, llama_dir, converted):
    code, _, err = run_cli(capsys, "convert", llama_dir, "--tp", "2", "-o", converted)
    assert_one_line_error(code, err, "already exists (pass --overwrite")


def test_convert_into_the_model_directory_is_refused(capsys, llama_dir):
    before = sorted(p.name for p in llama_dir.iterdir())
    code, _, err = run_cli(capsys, "convert", llama_dir, "--tp", "2", "-o", llama_dir, "--overwrite")
    assert_one_line_error(code, err, "is (or holds) the model directory")
    assert sorted(p.name for p in llama_dir.iterdir()) == before


def test_a_converted_directory_is_not_a_model_argument(capsys, converted):
    for command in ("plan", "verify"):
        code, _, err = run_cli(capsys, command, converted, "--tp", "2")
        assert_one_line_error(code, err, "is a directory autotp convert wrote")


@pytest.mark.parametrize("argv, expected", [
    (["verify", "{llama}", "--tp", "2", "--batch", "0"], "--batch must be >= 1"),
    (["verify", "{llama}", "--tp", "2", "--seq", "-1"], "--seq must be >= 1"),
    (["generate", "{converted}", "--input-ids", "1,2", "--do-sample", "--temperature", "0"],
     "--temperature must be > 0 to sample"),
    (["generate", "{converted}", "--input-ids", "1,2", "--top-p", "2"], "--top-p must be in (0, 1]"),
])
def test_bad_numeric_options(capsys, llama_dir, converted, argv, expected):
    argv = [a.format(llama=llama_dir, converted=converted) for a in argv]
    assert_one_line_error(*run_cli(capsys, *argv)[::2], expected)


def test_run_on_missing_or_unconverted_output(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "run", tmp_path / "nope", "--input-ids", "1")[::2], "does not exist")
    assert_one_line_error(*run_cli(capsys, "run", tmp_path, "--input-ids", "1")[::2], "has no autotp.json")


def test_run_with_another_world_size(capsys, converted):
    code, _, err = run_cli(capsys, "run", converted, "--input-ids", "1,2")  # one process, converted for 2
    assert_one_line_error(code, err, "converted for tp=2, but the world size is 1")


def cli_worker(rank: int, world: int, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _damaged(converted: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    damage(copy / rank_file(1, 2))
    return copy


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.distributed
@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.unlink(), "is missing"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated or replaced"),
    (_flip_last_byte, "sha256 differs"),
], ids=["missing", "truncated", "checksum"])
def test_damaged_shard_file_fails_every_rank(converted, tmp_path, damage, expected):
    copy = _damaged(converted, tmp_path, damage)
    for rank, (code, err) in enumerate(run_ranks(cli_worker, 2, ["run", str(copy), "--input-ids", "1,2"])):
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"[rank {rank}] autotp: error: rank 1: "), err
        assert expected in lines[0] and rank_file(1, 2) in lines[0]


def test_convert_copies_the_tokenizer_and_run_uses_it(llama_dir, tmp_path):
    from autotp.cli import _tokenizer

    with_tokenizer = tmp_path / "model"
    shutil.copytree(llama_dir, with_tokenizer)
    save_word_tokenizer(with_tokenizer)
    out = autotp.convert(with_tokenizer, 2, tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    assert _tokenizer(str(out))("w5 w7 w9")["input_ids"] == [5, 7, 9]


def test_prompt_without_tokenizer(converted):
    from autotp.cli import _tokenizer
    from autotp.errors import AutotpError

    with pytest.raises(AutotpError, match="no usable tokenizer: pass --input-ids"):
        _tokenizer(str(converted))("hello")
