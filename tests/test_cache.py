"""The graph cache (autotp.cache): a second run of the same model on the same ranks rebuilds
each rank's rewritten graph from disk instead of capturing it, and computes exactly what the
first run computed.

Distributed checks run on real processes (gloo): each rank builds the same seeded model twice
(a fresh object each time, as a new run would), compares logits with the unsharded model and
greedy tokens with the unsharded ``generate``. The key checks run in one process: what must
change the key does, what the key cannot describe is not cached.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import autotp
from autotp import cache as graph_cache
from distributed import run_ranks
from models import assert_close_to, hf_model, parallelize_and_compare, plain_block, token_ids


def _run_twice_worker(rank: int, world: int, name: str, cache_dir: str) -> list[dict]:
    os.environ["AUTOTP_CACHE_DIR"] = cache_dir
    runs = []
    for _ in range(2):
        model = hf_model(name)
        ids, other = token_ids(2, 8), token_ids(3, 5, seed=2)
        mask = torch.ones_like(other)
        mask[0, :2] = 0  # a left-padded row
        prompt = token_ids(1, 5, seed=3)
        with torch.no_grad():
            ref, ref_other = model(ids).logits, model(input_ids=other, attention_mask=mask).logits
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        tp_model = autotp.parallelize(model)
        with torch.no_grad():
            out = tp_model(ids).logits
            out_other = tp_model(input_ids=other, attention_mask=mask).logits  # a second graph, from the twin
        tokens = tp_model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)  # cached graphs
        runs.append(dict(
            status=tp_model.cache_status,
            later=sorted(tp_model.graph_cache.values()),
            timings=sorted(tp_model.timings),
            diff=(assert_close_to(ref, out), assert_close_to(ref_other, out_other)),
            logits=out,
            same_tokens=torch.equal(tokens, expected),
            state=sorted(tp_model.state_dict()),
        ))
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_second_run_rebuilds_every_graph_from_the_cache(name: str, tmp_path: Path) -> None:
    per_rank = run_ranks(_run_twice_worker, 2, name, str(tmp_path))
    for rank, (first, second) in enumerate(per_rank):
        assert first["status"] == "stored" and second["status"] == "hit", (rank, first["status"], second["status"])
        # the other call's graph, the prefill and the decode graphs
        assert first["later"] == ["stored"] * 3 and second["later"] == ["hit"] * 3, (first["later"], second["later"])
        assert "capture" in first["timings"] and "capture" not in second["timings"]
        assert first["same_tokens"] and second["same_tokens"], f"rank {rank}: greedy tokens differ from unsharded"
        assert torch.equal(first["logits"], second["logits"]), "the cached graph computes something else"
        assert first["state"] == second["state"]  # non-persistent buffers (rotary inv_freq) stay so
    assert len(list(tmp_path.glob("*.pt"))) == 2 * 4  # per rank: the call, the other call, prefill, decode


def _damaged_entry_worker(rank: int, world: int, cache_dir: str) -> dict:
    os.environ["AUTOTP_CACHE_DIR"] = cache_dir
    ids = token_ids(2, 8)
    autotp.parallelize(hf_model("llama"))
    entries = list(Path(cache_dir).glob("*.pt"))
    entry = torch.load(entries[0], weights_only=True)
    for path in entries:
        path.write_bytes(b"not an entry")
    tp_model, warned, diff = parallelize_and_compare(hf_model("llama"), ids)
    return dict(status=tp_model.cache_status, diff=diff, warned=warned,
                constants=sorted(entry["constants"]), params=sorted(tp_model.plan.params),
                rewritten=torch.load(entries[0], weights_only=True)["format"] == graph_cache.FORMAT)


@pytest.mark.distributed
def test_damaged_entry_is_reported_and_captured_again(tmp_path: Path) -> None:
    result = run_ranks(_damaged_entry_worker, 1, str(tmp_path))[0]
    assert result["status"] == "stored" and result["rewritten"]
    assert any("ignoring graph cache entry" in w for w in result["warned"]), result["warned"]
    # an entry holds no weights: only tensors the model made while it was traced
    assert not set(result["constants"]) & set(result["params"]), result["constants"]


# ---- the key, in one process --------------------------------------------------------------------

def _key(model: torch.nn.Module, ids: torch.Tensor | None = None, **settings) -> str:
    return graph_cache.graph_key(model, {"input_ids": token_ids(2, 8) if ids is None else ids},
                                 **{"tp_size": 2, "rank": 0, **settings})


def test_key_is_the_same_for_the_same_model_and_changes_with_what_shapes_the_graph() -> None:
    base = _key(hf_model("llama"))
    assert _key(hf_model("llama", seed=5)) == base, "weights do not shape the graph"
    assert _key(hf_model("llama_gqa")) != base, "another config"
    assert _key(hf_model("llama"), rank=1) != base and _key(hf_model("llama"), tp_size=4) != base
    assert _key(hf_model("llama"), token_ids(2, 1)) != base, "another example size may specialise"
    edited = hf_model("llama")
    edited.model.layers[0].self_attn.scaling = 0.5  # an attribute outside the config
    assert _key(edited) != base
    half = hf_model("llama").to(torch.bfloat16)
    assert _key(half) != base
    moved = hf_model("llama")
    moved.config._name_or_path = "/somewhere/else"  # read from another directory: the same graph
    assert _key(moved) == base


def test_methods_and_functions_patched_after_import_change_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel-patching libraries replace a class's forward or a modeling module's function
    after import; the files are unchanged, the graph is not."""
    from transformers.models.gemma import modeling_gemma
    from transformers.models.llama import modeling_llama

    base = _key(hf_model("llama"))
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", modeling_gemma.GemmaMLP.forward)
    patched_method = _key(hf_model("llama"))
    monkeypatch.undo()
    assert _key(hf_model("llama")) == base
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_gemma.apply_rotary_pos_emb)
    patched_function = _key(hf_model("llama"))
    assert len({base, patched_method, patched_function}) == 3
    # a patch written outside an installed package is never cached
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: x)
    with pytest.raises(graph_cache.Uncacheable, match="outside an installed package"):
        _key(hf_model("llama"))


def test_a_torch_function_patched_through_its_module_changes_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """``F.silu = F.gelu`` (issue 13: a cache hit computed with the function the capture saw):
    the key follows the modules a model's code names (``F``, ``nn``, ``torch``) to what their
    names hold now, both ways: patching changes the key, and so does undoing it."""
    import torch.nn.functional as F

    base = _key(hf_model("llama"))
    monkeypatch.setattr(F, "silu", F.gelu)
    patched = _key(hf_model("llama"))
    monkeypatch.setattr(torch, "matmul", torch.mm)
    assert len({base, patched, _key(hf_model("llama"))}) == 3
    monkeypatch.undo()
    assert _key(hf_model("llama")) == base
    monkeypatch.setattr(F, "silu", lambda x, inplace=False: x)  # written in a script: never cached
    with pytest.raises(graph_cache.Uncacheable, match="outside an installed package"):
        _key(hf_model("llama"))


def test_ties_shared_modules_registries_and_environment_are_in_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    base = _key(hf_model("llama"))
    untied = hf_model("llama")
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    tied = hf_model("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    shared = hf_model("llama")
    shared.model.layers[1].mlp = shared.model.layers[0].mlp
    assert _key(tied) != _key(untied), "which tensors are one object shapes the graph"
    assert _key(shared) != base, "so does which modules are one object"
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")  # read by transformers' sdpa attention
    assert _key(hf_model("llama")) != base
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA")
    # a patch in a script, disguised by functools.wraps, or put in the attention registry
    original = modeling_llama.LlamaMLP.forward

    @functools.wraps(original)
    def doubled(self, x):
        return original(self, x) * 2

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", doubled)
    with pytest.raises(graph_cache.Uncacheable, match="outside an installed package"):
        _key(hf_model("llama"))
    monkeypatch.undo()
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", lambda *args, **kwargs: None)
    with pytest.raises(graph_cache.Uncacheable, match="outside an installed package"):
        _key(hf_model("llama"))


def test_a_key_that_cannot_be_computed_or_a_folder_that_cannot_be_read_runs_uncached(tmp_path: Path) -> None:
    odd = hf_model("llama")
    odd.config.extra = {1, 2}  # not JSON: the config's own serialisation raises TypeError
    slot = graph_cache.slot(True, odd, {"input_ids": token_ids(2, 8)}, tp_size=2, rank=0)
    assert slot.status.startswith("uncacheable: TypeError"), slot.status
    # a folder another user made: reading it raises PermissionError (patched: tests run as root)
    store = graph_cache.GraphCache(tmp_path / "cache")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "is_file", denied)
        with pytest.warns(UserWarning, match="cannot read the graph cache"):
            assert store.get("0" * 64, None) is None


def test_every_family_of_the_coverage_matrix_is_cacheable() -> None:
    """Each transformers family autotp covers gets a key (a run of the coverage matrix twice
    over one cache: all 30 families pass from cached graphs at tp2 and tp4), except those
    whose modules register hooks, which the key cannot describe: they are captured every time."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from arch_configs import ARCHS, build

    from autotp.capture import normalise_example_inputs

    hooked = set()
    for arch in ARCHS:
        model = build(arch)
        try:
            assert graph_cache.graph_key(model, normalise_example_inputs(model, None), tp_size=2, rank=0), arch
        except graph_cache.Uncacheable as exc:
            assert "has hooks" in str(exc), (arch, str(exc))
            hooked.add(arch)
    assert hooked == {"mamba"}  # MambaModel registers a hook on its backbone


def test_what_the_key_cannot_describe_is_not_cached() -> None:
    hooked = hf_model("llama")
    hooked.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(graph_cache.Uncacheable, match="hooks"):
        _key(hooked)
    block = plain_block()  # defined in this test folder, not in an installed package
    with pytest.raises(graph_cache.Uncacheable, match="outside an installed package"):
        graph_cache.graph_key(block, {"x": torch.randn(2, 6, 64)})
    assert graph_cache.slot(False, hf_model("llama"), {"input_ids": token_ids(2, 8)}).status == "off"


def test_cache_dir_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOTP_CACHE_DIR", "off")
    assert graph_cache.cache_dir() is None
    monkeypatch.setenv("AUTOTP_CACHE_DIR", str(tmp_path))
    assert graph_cache.cache_dir() == tmp_path
    monkeypatch.delenv("AUTOTP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert graph_cache.cache_dir() == tmp_path / "autotp"


class _WithConstants(torch.nn.Module):
    """A non-persistent buffer, and a constant made in forward (export lifts it)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 32)
        self.register_buffer("scale", torch.full((32,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale + torch.tensor([1.0, 2.0]).repeat(16)


def test_a_decoded_graph_keeps_what_is_state_and_what_is_not() -> None:
    from autotp.capture import capture
    from autotp.collectives import Communicator
    from autotp.planner import plan_graph
    from autotp.rewrite import rewrite

    captured = capture(_WithConstants(), (torch.randn(4, 16),))
    plan = plan_graph(captured.graph, 1, model="m", inputs=captured.input_names)
    gm = rewrite(captured.graph_module, plan, 0, comm=Communicator())
    graph, constants = graph_cache.encode_graph(gm, captured.guards)
    decoded = graph_cache.decode_graph(graph, constants, Communicator())
    assert sorted(decoded.state_dict()) == sorted(gm.state_dict()) == ["proj.bias", "proj.weight"]


def _age(path: Path, seconds: float) -> None:
    import time

    then = time.time() - seconds
    os.utime(path, (then, then))


def test_prune_drops_the_least_recently_used_entries_down_to_three_quarters(tmp_path: Path) -> None:
    def entry(c: str) -> str:
        return c * 64 + ".pt"  # entries are named by their key, a sha256

    for c, kib, age in [("a", 400, 5000), ("b", 300, 4000), ("c", 200, 3000), ("d", 100, 2000), ("e", 100, 60)]:
        (tmp_path / entry(c)).write_bytes(b"x" * kib * 1024)
        _age(tmp_path / entry(c), age)
    # what is not an entry is neither counted nor deleted: an entry being written, a user's file
    (tmp_path / f".{entry('f')}.123.tmp").write_bytes(b"x" * 4096 * 1024)
    (tmp_path / "model.pt").write_bytes(b"x" * 4096 * 1024)
    _age(tmp_path / "model.pt", 9000)
    assert graph_cache.prune(tmp_path, 1100 * 1024) == []  # 1100 KiB of entries: within the bound
    # over it: the least recently used go until 3/4 of the bound (750 KiB) is reached
    assert [p.name for p in graph_cache.prune(tmp_path, 1000 * 1024)] == [entry("a")]
    assert [p.name for p in graph_cache.prune(tmp_path, 400 * 1024)] == [entry("b"), entry("c")]
    # entries used recently stay even when the cache is still over its bound
    assert graph_cache.prune(tmp_path, 0, keep_recent_s=2500) == []
    assert [p.name for p in graph_cache.prune(tmp_path, 0, keep_recent_s=1000)] == [entry("d")]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [entry("e"), "model.pt"]


def test_a_hit_marks_its_entry_used_and_a_write_prunes_what_was_not(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTP_CACHE_DIR", str(tmp_path))
    ids, other = token_ids(2, 8), token_ids(3, 5, seed=2)
    autotp.parallelize(hf_model("llama"))  # one process, tp 1: stores the call's graph
    [entry] = list(tmp_path.glob("*.pt"))
    _age(entry, 86400)
    stale = tmp_path / ("0" * 64 + ".pt")  # an entry of an older autotp, unused for two days
    stale.write_bytes(b"x" * 2**20)
    _age(stale, 2 * 86400)
    monkeypatch.setenv("AUTOTP_CACHE_MAX_MB", "0.5")

    model = hf_model("llama")
    with torch.no_grad():
        ref, ref_other = model(ids).logits, model(other).logits
    tp_model = autotp.parallelize(model)
    assert tp_model.cache_status == "hit"
    import time

    assert time.time() - entry.stat().st_mtime < 600  # used now
    with torch.no_grad():
        assert_close_to(ref, tp_model(ids).logits)
        assert_close_to(ref_other, tp_model(input_ids=other, attention_mask=torch.ones_like(other)).logits)
    assert sorted(tp_model.graph_cache.values()) == ["stored"]  # that write pruned the stale entry
    assert entry.exists() and not stale.exists() and len(list(tmp_path.glob("*.pt"))) == 2


def test_a_bad_cache_size_bound_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from autotp.errors import AutotpError

    monkeypatch.setenv("AUTOTP_CACHE_DIR", str(tmp_path))
    for bad in ("lots", "-1", "nan", "1e400"):
        monkeypatch.setenv("AUTOTP_CACHE_MAX_MB", bad)
        with pytest.raises(AutotpError, match="AUTOTP_CACHE_MAX_MB"):
            graph_cache.max_bytes()
        with pytest.raises(AutotpError, match="AUTOTP_CACHE_MAX_MB"):  # when a run looks its graph up
            graph_cache.slot(True, hf_model("llama"), {"input_ids": token_ids(2, 8)}, tp_size=2, rank=0)
    monkeypatch.setenv("AUTOTP_CACHE_MAX_MB", "0.5")
    assert graph_cache.max_bytes() == 2**19


def test_the_layer_sharing_setting_is_in_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A graph captured with copied layers must not serve a process that asked for every layer
    traced (``AUTOTP_SHARE_LAYERS=0``), nor the other way round."""
    monkeypatch.setenv("AUTOTP_CACHE_DIR", str(tmp_path))
    inputs = {"input_ids": token_ids(2, 8)}
    keys = set()
    for setting in ("", "0", "1"):
        monkeypatch.setenv("AUTOTP_SHARE_LAYERS", setting)
        keys.add(graph_cache.slot(True, hf_model("llama"), inputs, tp_size=2, rank=0).key)
    assert len(keys) == 3
