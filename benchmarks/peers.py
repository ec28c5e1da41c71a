"""How each implementation becomes a ready tensor-parallel model, and what it is measured on.

One function per implementation, each run on every rank under torchrun (the unsharded one in
a single process): it reads the same Hugging Face checkpoint and returns a model whose
``forward`` and ``generate`` work, plus the tensors that are this rank's parameters.
"""

from __future__ import annotations

import functools
import os
import resource
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def rss_mib() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from regular files (from /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters and buffers: each allocated storage counted once, whole
    (a view keeps all of it alive); a view of a memory-mapped file counts only its own bytes
    (only the pages it touches are ever read)."""
    mappings = _file_mappings()
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        t = _local(t)
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if any(start <= storage.data_ptr() < end for start, end in mappings):
            key, nbytes = (t.data_ptr(), t.numel()), t.numel() * t.element_size()
        else:
            key, nbytes = storage.data_ptr(), storage.nbytes()
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def unsharded(checkpoint: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def hf_tp_plan(checkpoint: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, tp_plan="auto").eval()


def _deepspeed(checkpoint: str, shm: bool) -> Any:
    import deepspeed

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["LOCAL_SIZE"] = os.environ["WORLD_SIZE"]  # its shared-memory kernel needs it (unset: SIGSEGV)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    if not shm:
        # Before each all-reduce DeepSpeed checks the CPU's vector level its kernel needs;
        # at 0 it takes its own fallback, the process group's all_reduce (gloo).
        import deepspeed.comm.comm as ds_comm

        ds_comm.cdb.shm_vector_kernel_level = 0
    model = unsharded(checkpoint)
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": dist.get_world_size()}, dtype=torch.float32,
                                      replace_with_kernel_inject=False)
    return engine.module


def deepspeed_shm(checkpoint: str) -> Any:
    return _deepspeed(checkpoint, shm=True)


def deepspeed_gloo(checkpoint: str) -> Any:
    return _deepspeed(checkpoint, shm=False)


def dtensor_megatron(checkpoint: str) -> Any:
    """The hand-written plan torchtitan applies: q/k/v and gate/up colwise, o and down rowwise."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dist.init_process_group("gloo")
    model = unsharded(checkpoint)
    if not hasattr(getattr(model, "model", None), "layers"):
        raise NotImplementedError("the hand-written plan names Llama-family modules (model.layers.*.q_proj, ...); "
                                  f"{type(model).__name__} needs another (and ColwiseParallel does not take Conv1D)")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan = {}
    for i, _ in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    return parallelize_module(model, mesh, plan)


def _autotp(checkpoint: str, path: str, kernels: str) -> Any:
    import autotp
    from transformers import AutoConfig, AutoModelForCausalLM

    os.environ["AUTOTP_ALLREDUCE"] = path
    if kernels != "auto":  # "auto": the runner's one choice for the whole run, in AUTOTP_KERNELS
        os.environ["AUTOTP_KERNELS"] = kernels
    with autotp.init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint)).eval()
    return autotp.parallelize(model, checkpoint=checkpoint)


class Implementation(NamedTuple):
    """How to build one implementation and how its figures are read."""

    build: Callable[[str], Any]
    distributed: bool  # launched on --tp ranks (else one process)
    collective_path: str
    # the implementation that is this one at tp 1 on the same kernels: its time over this
    # one's is the speed-up tensor parallelism itself gives (TP scaling). At tp 1 Hugging
    # Face's tp_plan, DeepSpeed AutoTP and a DTensor plan are the unsharded model.
    tp1: str


def _autotp_impl(path: str, kernels: str, distributed: bool, tp1: str) -> Implementation:
    return Implementation(functools.partial(_autotp, path=path, kernels=kernels), distributed,
                          {"deepspeed": "shared memory"}.get(path, path) if distributed else "-", tp1)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "unsharded": Implementation(unsharded, False, "-", "unsharded"),
    "hf_tp_plan": Implementation(hf_tp_plan, True, "gloo", "unsharded"),
    "deepspeed_shm": Implementation(deepspeed_shm, True, "shared memory", "unsharded"),
    "deepspeed_gloo": Implementation(deepspeed_gloo, True, "gloo", "unsharded"),
    "dtensor_megatron": Implementation(dtensor_megatron, True, "gloo", "unsharded"),
    # autotp with its kernel choice (oneDNN where a probe measures it faster, autotp.kernels)
    "autotp_shm": _autotp_impl("deepspeed", "auto", True, "autotp_1_process"),
    "autotp_gloo": _autotp_impl("gloo", "auto", True, "autotp_1_process"),
    # autotp at tp 1, in one process: the unsharded model with autotp's graph and GEMM choice,
    # so that its speed-up over unsharded is the kernels' and autotp tp N / it is tensor parallelism's
    "autotp_1_process": _autotp_impl("gloo", "auto", False, "autotp_1_process"),
    # the same three on PyTorch's own GEMM, the kernels every peer runs on
    "autotp_shm_aten": _autotp_impl("deepspeed", "aten", True, "autotp_1_process_aten"),
    "autotp_gloo_aten": _autotp_impl("gloo", "aten", True, "autotp_1_process_aten"),
    "autotp_1_process_aten": _autotp_impl("gloo", "aten", False, "autotp_1_process_aten"),
}

# implementations that keep something between runs (autotp's graph cache): the runner measures
# their time to a ready model on a first run too
CACHED = {name for name in IMPLEMENTATIONS if name.startswith("autotp")}
