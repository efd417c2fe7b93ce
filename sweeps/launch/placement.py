"""Where trials run: what each trial asks Ray for, and the packing plan ``--dry-run`` prints.

``resources: auto`` (the default):

- nodes without GPUs: ``resources.cpu`` CPUs per trial (1), so a 2-core machine runs 2 trials at a time;
- nodes with GPUs: each trial asks for a share of one GPU sized from its memory estimate
  (``trainer.memory.estimate``: weights, gradients, optimizer state, activations, logits). The share is 1/k of a
  GPU, with k the number of such trials that fit in ``FILL`` (90%) of its memory (each with ``MARGIN`` over its
  estimate and its CUDA context), so Ray packs k of them on each
  GPU; a trial that needs more than that gets a whole GPU, and the plan says it may not fit.

A trial with a GPU share caps its CUDA memory to its part of ``FILL`` less its CUDA context
(``torch.cuda.set_per_process_memory_fraction``), at least ``MARGIN`` x its estimate: an estimate that was too low
fails that trial with an out-of-memory reason instead of its neighbours.
Each GPU's memory is ``resources.gpu_memory_gib``, else read from the nodes (NVML).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from itertools import product
from typing import Any

from sweeps.spec import SweepSpec, trial_config
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.methods import METHODS

# ray and trainer.memory (torch) are imported inside the functions that need them: --dry-run plans without either

FILL = 0.9  # of a GPU's memory the packed trials may use together; the rest is for fragmentation and other users
MARGIN = 1.25  # each trial may allocate this x its estimate (the estimate is checked within 25%: BENCHMARKS.md)
CONTEXT_GIB = 0.5  # each trial process's CUDA context, outside the allocator and its cap
# space dimensions that change a trial's memory: the plan takes each method's largest combination of them
_MEMORY_KEYS = ("batch_size", "seq_len", "lora_r", "lora_target_modules", "last_layers", "dtype", "quantization",
                "gradient_checkpointing", "optimizer", "model")


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float
    gpu_memory_gib: float | None = None  # of each GPU


@dataclass(frozen=True)
class Share:
    """What one trial asks for, and why."""

    cpu: float
    gpu: float  # 0: no GPU
    estimate_gib: float | None = None  # None: not estimated (a fixed share, or a CPU trial)
    per_gpu: int | None = None  # trials of this size that fit on one GPU (auto only)
    fits: bool = True

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpu, **({"GPU": self.gpu} if self.gpu else {})}


class TrialResources:
    """Per-trial resources from the trial's own settings (picklable: Ray calls it for each trial it starts)."""

    def __init__(self, spec: SweepSpec, gpu_memory_gib: float | None, has_gpus: bool):
        self.resources, self.base = spec.resources, spec.base
        self.gpu_memory_gib, self.has_gpus = gpu_memory_gib, has_gpus

    def share(self, cfg: TrainConfig) -> Share:
        need = self.resources.for_method(cfg.method)
        cpu = float(need["cpu"])
        if need["gpu"] != "auto":
            return Share(cpu, float(need["gpu"]))
        if not self.has_gpus:
            return Share(cpu, 0.0)
        from trainer.memory import estimate

        est = estimate(cfg, device="cuda").total_gib
        per_gpu = math.floor(FILL * self.gpu_memory_gib / (MARGIN * est + CONTEXT_GIB))
        if per_gpu < 1:
            return Share(cpu, 1.0, est, 1, fits=False)
        # rounded down to Ray's 1e-4 resource precision, so that k shares never add up to more than one GPU
        return Share(cpu, math.floor(1e4 / per_gpu) / 1e4, est, per_gpu)

    def sized(self, method: str) -> bool:
        """Whether a trial's share of this method depends on its settings (gpu: auto on GPU nodes)."""
        return self.has_gpus and self.resources.for_method(method)["gpu"] == "auto"

    def __call__(self, config: dict[str, Any]):
        from ray.tune import PlacementGroupFactory

        return PlacementGroupFactory([self.share(trial_config(self.base, config)).bundle()])


def memory_cap(share: float, gpu_memory_gib: float) -> float:
    """The fraction of a GPU's memory a trial with this GPU share may allocate: its part of ``FILL`` of the GPU, less
    its CUDA context (at least ``MARGIN`` x its estimate, by how the share was sized); a whole GPU is not capped."""
    if share >= 1:
        return 1.0
    return max(0.01, FILL * share - CONTEXT_GIB / gpu_memory_gib)


# --- the cluster ----------------------------------------------------------------------------------------------------


def gpu_memory_here() -> list[float]:
    """Each GPU's total memory on this machine, in GiB (NVML, else nvidia-smi; [] when there is none)."""
    try:
        from ray._private.thirdparty import pynvml

        pynvml.nvmlInit()
        try:
            return [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total / 1024**3
                    for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no NVML library: try the command line tool
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            return [float(line) / 1024 for line in out.split() if line.strip()]
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return []


def local_nodes() -> list[Node]:
    """This machine, without starting Ray (a dry run without --address)."""
    memory = gpu_memory_here()
    return [Node(float(os.cpu_count() or 1), float(len(memory)), min(memory) if memory else None)]


def ray_nodes() -> list[Node]:
    """The alive nodes of the Ray cluster this process joined; GPU memory read on each GPU node (NVML)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0)(gpu_memory_here)
    out = []
    for n in nodes:
        res = n["Resources"]
        memory = None
        if res.get("GPU", 0):
            strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            found = ray.get(probe.options(scheduling_strategy=strategy).remote(), timeout=60)
            memory = min(found) if found else None
        out.append(Node(res.get("CPU", 0.0), res.get("GPU", 0.0), memory))
    return out


def gpu_memory(spec: SweepSpec, nodes: list[Node]) -> float | None:
    """The memory of one GPU the plan packs into: the spec's, else the smallest read from the GPU nodes."""
    if spec.resources.gpu_memory_gib:
        return spec.resources.gpu_memory_gib
    gpu_nodes = [n for n in nodes if n.gpus]
    if not gpu_nodes:
        return None
    if any(n.gpu_memory_gib is None for n in gpu_nodes):
        raise UserError(f"{spec.source}: resources: auto sizes each trial's GPU share from its memory, but this cluster's "
                        "GPU memory could not be read (no NVML on a GPU node); give it as resources.gpu_memory_gib")
    return min(n.gpu_memory_gib for n in gpu_nodes)


def trial_resources(spec: SweepSpec, nodes: list[Node]) -> TrialResources:
    has_gpus = any(n.gpus for n in nodes)
    return TrialResources(spec, gpu_memory(spec, nodes) if has_gpus else None, has_gpus)


# --- the plan -------------------------------------------------------------------------------------------------------


def largest_trials(spec: SweepSpec, placer: TrialResources) -> dict[str, TrainConfig]:
    """Per method, the trial of the space that needs the most memory (over the dimensions that change it); the base
    settings for a method whose share does not depend on them."""
    dims = {k: list(dict.fromkeys(corner[k] for _, corner in spec.space[k].corners(k))) for k in _MEMORY_KEYS
            if k in spec.space}
    out = {}
    for method in spec.methods:
        if not placer.sized(method):
            out[method] = spec.base.model_copy(update={"method": method})
            continue
        configs = [spec.base.model_copy(update={"method": method, **dict(zip(dims, values))})
                   for values in product(*dims.values())]
        configs = [c for c in configs if not c.quantization or METHODS[method].quantized_base] or configs
        from trainer.memory import estimate
        out[method] = max(configs, key=lambda c: estimate(c, device="cuda").total_bytes)
    return out


def at_once(share: Share, nodes: list[Node], max_concurrent: int | None) -> int:
    """How many trials of this size Ray runs at once on these nodes."""
    n = 0
    for node in nodes:
        by_cpu = math.floor(node.cpus / share.cpu + 1e-9)
        by_gpu = math.floor(node.gpus / share.gpu + 1e-9) if share.gpu else by_cpu
        n += min(by_cpu, by_gpu)
    return min(n, max_concurrent) if max_concurrent else n


def plan_lines(spec: SweepSpec, nodes: list[Node]) -> list[str]:
    """The packing plan in words: the nodes, then per method its largest trial's estimate, share and concurrency."""
    placer = trial_resources(spec, nodes)
    gpus = sum(n.gpus for n in nodes)
    cpus = sum(n.cpus for n in nodes)
    where = f"{len(nodes)} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s)"
    if placer.gpu_memory_gib:
        where += f" of {placer.gpu_memory_gib:.1f} GiB"
    lines = [f"resources: {where}"]
    for method, cfg in largest_trials(spec, placer).items():
        share = placer.share(cfg)
        n = at_once(share, nodes, spec.search.max_concurrent)
        if share.estimate_gib is None:
            ask = f"{share.cpu:g} CPU" + (f" and {share.gpu:g} GPU" if share.gpu else "")
            lines.append(f"  {method}: {ask} per trial; {n} trial(s) at once")
            continue
        head = f"  {method}: estimate {share.estimate_gib:.2f} GiB (batch {cfg.batch_size}, seq_len {cfg.seq_len})"
        if not share.fits:
            lines.append(f"{head}: more than {FILL:.0%} of a GPU: one per GPU, and it may run out of memory "
                         "(try gradient_checkpointing: true, dtype: bfloat16, quantization: 4bit with lora, or a smaller batch)")
        else:
            cap = memory_cap(share.gpu, placer.gpu_memory_gib) * placer.gpu_memory_gib
            lines.append(f"{head}: {share.gpu:g} GPU each, {share.per_gpu} per GPU, capped at {cap:.1f} GiB; "
                         f"{n} trial(s) at once")
    if not gpus and any(spec.resources.for_method(m)["gpu"] == "auto" for m in spec.methods):
        lines.append("  (no GPU: 1 trial per CPU; on GPU nodes each trial would get a share sized from its memory estimate)")
    return lines


def ignored_gpus_warning(spec: SweepSpec, nodes: list[Node]) -> str | None:
    """A line when the cluster has GPUs but the spec asks for none for some method (they would train on the CPU)."""
    gpus = sum(n.gpus for n in nodes)
    cpu_only = [m for m in spec.methods if spec.resources.for_method(m)["gpu"] == 0]
    if gpus and cpu_only:
        return (f"note: the cluster has {gpus:g} GPU(s), but resources ask for none for {', '.join(cpu_only)}: those trials "
                "train on CPUs (Ray hides the GPUs from a trial that asks for none); use resources: auto to use them")
    return None
