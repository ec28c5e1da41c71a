"""DeepSpeed's shared-memory kernel is loaded through DeepSpeed's builder once, then straight
from autotp's record of it, until the record no longer holds (``autotp.shm_kernel``).

Each load runs in a fresh process: whether DeepSpeed got imported tells which way it went.
That the kernel sums correctly is checked by every distributed test, which runs over it
wherever DeepSpeed is installed (``AUTOTP_ALLREDUCE=auto``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed (autotp[fast]) is not installed")

# The record is put where the test says (a record in the user's real cache folder would be
# shared with every other run; moving the whole cache folder would move torch's extensions
# folder too, and DeepSpeed would compile the kernel again there).
_LOAD = """
import json, sys, torch
from pathlib import Path
import autotp.shm_kernel as shm_kernel
shm_kernel.record_path = lambda: Path(sys.argv[1])
kernel = shm_kernel.load_kernel()
print(json.dumps({"imported_deepspeed": "deepspeed" in sys.modules, "level": kernel.vector_kernel_level(),
                  "op": hasattr(torch.ops.deepspeed, "inference_all_reduce_")}))
"""


def _load_in_a_fresh_process(folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _LOAD, str(_record(folder))], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _record(folder: Path) -> Path:
    return folder / "deepspeed_shm_comm-record.json"


def test_the_builder_runs_once_then_the_record_loads_the_kernel(tmp_path):
    first = _load_in_a_fresh_process(tmp_path)
    assert first["imported_deepspeed"] and first["op"]
    described = json.loads(_record(tmp_path).read_text())
    assert Path(described["library"]).is_file() and any(p.endswith("shm.cpp") for p in described["files"])

    second = _load_in_a_fresh_process(tmp_path)
    assert second == {**first, "imported_deepspeed": False}


@pytest.mark.parametrize("change", ["a source file", "the library", "torch", "the module's name"])
def test_a_record_that_no_longer_holds_sends_loading_back_to_the_builder(tmp_path, change):
    _load_in_a_fresh_process(tmp_path)
    record = _record(tmp_path)
    truth = json.loads(record.read_text())
    described = json.loads(record.read_text())
    if change == "a source file":
        described["files"][next(iter(described["files"]))][1] += 1  # as if edited since the build
    elif change == "the library":
        described["library_stat"][1] += 1  # as if another environment rebuilt it
    elif change == "torch":
        described["torch"] = "0.0.0"
    else:  # the library then fails to import (its init function is named after its module)
        described["module"] = "not_the_kernel"
    record.write_text(json.dumps(described))

    assert _load_in_a_fresh_process(tmp_path)["imported_deepspeed"]
    assert json.loads(record.read_text()) == truth  # the builder wrote the record again
    assert not _load_in_a_fresh_process(tmp_path)["imported_deepspeed"]


def test_without_a_cache_folder_there_is_no_record(monkeypatch):
    from autotp.shm_kernel import record_path

    monkeypatch.setenv("AUTOTP_CACHE_DIR", "off")
    assert record_path() is None


def test_the_record_stays_in_the_user_cache_wherever_the_graph_cache_goes(monkeypatch, tmp_path):
    """A model's first run (an empty graph cache, in a folder of its own) still finds the
    record the machine's earlier runs left."""
    from autotp.shm_kernel import record_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    paths = set()
    for graphs in ("graphs-a", "graphs-b", None):
        if graphs is None:
            monkeypatch.delenv("AUTOTP_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("AUTOTP_CACHE_DIR", str(tmp_path / graphs))
        paths.add(record_path())
    (path,) = paths
    assert path.parent == tmp_path / "user" / "autotp" / "kernels" and path.name.startswith("deepspeed_shm_comm-")


def _one_rank_cannot_worker(rank: int, world: int) -> tuple[str, list[str], float]:
    from models import hf_model, parallelize_and_compare, token_ids

    if rank == 1:
        os.environ["LOCAL_SIZE"] = "3"  # the kernel would not map its peers: this rank must not use it
    tp_model, warned, diff = parallelize_and_compare(hf_model("llama"), token_ids(2, 8))
    return tp_model.collective_path, [w for w in warned if "shared-memory" in w], diff


@pytest.mark.distributed
def test_when_one_rank_cannot_use_the_kernel_no_rank_does():
    """A rank inside the kernel's initialize waits for every other rank's segment, with no
    timeout: the ranks agree first, and all take the process group."""
    from distributed import run_ranks

    (path0, warned0, _), (path1, warned1, _) = run_ranks(_one_rank_cannot_worker, 2)
    assert path0 == path1 == "gloo", (path0, path1)
    assert any("another rank cannot use" in w for w in warned0), warned0
    assert any("LOCAL_SIZE=3" in w for w in warned1), warned1


def _required_but_one_rank_cannot_worker(rank: int, world: int) -> str:
    import autotp
    from autotp.errors import AutotpError
    from models import hf_model

    os.environ["AUTOTP_ALLREDUCE"] = "deepspeed"
    if rank == 1:
        os.environ["LOCAL_SIZE"] = "3"
    try:
        autotp.parallelize(hf_model("llama"))
    except AutotpError as exc:
        return str(exc)
    return "no error"


@pytest.mark.distributed
def test_when_the_kernel_is_required_and_one_rank_cannot_every_rank_says_which():
    from distributed import run_ranks

    for said in run_ranks(_required_but_one_rank_cannot_worker, 2):
        assert "rank 1: AUTOTP_ALLREDUCE=deepspeed: LOCAL_SIZE=3" in said, said
        assert "rank 0: AUTOTP_ALLREDUCE=deepspeed: another rank cannot use" in said, said
