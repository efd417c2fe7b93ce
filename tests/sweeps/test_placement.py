"""resources: auto, planned without a GPU: shares from the memory estimate, Ray's packing, the plan's words, the cap,
the note on unused GPUs, and the memory finding."""
from __future__ import annotations

import math

import pytest

from sweeps.launch.placement import (
    CONTEXT_GIB,
    FILL,
    MARGIN,
    Node,
    at_once,
    ignored_gpus_warning,
    largest_trials,
    memory_cap,
    plan_lines,
    trial_resources,
)
from sweeps.results.analysis import memory_findings
from sweeps.results.records import TrialRecord
from sweeps.spec import load_spec
from trainer.memory import estimate


def _spec(tmp_path, resources: str = "auto", space: str = "  batch_size: [4, 8]\n"):
    path = tmp_path / "s.yaml"
    path.write_text(f"""name: plan
model: tiny
data: {{train: "builtin:facts:16", eval: "builtin:facts-heldout:16"}}
train: {{seq_len: 48, forgetting: false}}
search: {{algorithm: grid}}
space:
  method: [full, lora]
  learning_rate: [1.0e-3, 1.0e-2]
{space}resources: {resources}
""")
    return load_spec(path)


def test_without_gpus_auto_is_one_cpu_per_trial(tmp_path, tiny_model_dir):
    spec = _spec(tmp_path)
    nodes = [Node(2, 0)]
    placer = trial_resources(spec, nodes)
    share = placer.share(spec.base)
    assert (share.cpu, share.gpu, share.estimate_gib) == (1, 0, None)
    assert at_once(share, nodes, None) == 2
    assert "  full: 1 CPU per trial; 2 trial(s) at once" in plan_lines(spec, nodes)


def test_on_gpus_the_share_packs_as_many_as_fit_with_the_margin_and_context(tmp_path, tiny_model_dir):
    spec = _spec(tmp_path)
    big = largest_trials(spec, trial_resources(spec, [Node(64, 1, 24.0)]))
    sizes = [estimate(big["full"].model_copy(update={"batch_size": b}), device="cuda").total_bytes for b in (4, 8)]
    assert estimate(big["full"], device="cuda").total_bytes == max(sizes), "each method sized by its largest trial"
    est = estimate(big["lora"], device="cuda").total_gib
    nodes = [Node(64, 2, 24.0)]
    share = trial_resources(spec, nodes).share(big["lora"])
    k = math.floor(FILL * 24.0 / (MARGIN * est + CONTEXT_GIB))
    assert share.per_gpu == k and share.gpu * k <= 1 < (share.gpu + 1e-4) * k + 1e-9
    assert at_once(share, nodes, None) == min(64, 2 * k)
    assert at_once(share, nodes, 3) == 3
    cap = memory_cap(share.gpu, 24.0) * 24.0
    assert cap >= MARGIN * est and k * (cap + CONTEXT_GIB) <= FILL * 24.0 + 1e-6
    line = next(ln for ln in plan_lines(spec, nodes) if ln.strip().startswith("lora:"))
    assert f"{k} per GPU" in line and f"{min(64, 2 * k)} trial(s) at once" in line


def test_a_trial_larger_than_a_gpu_gets_a_whole_one_and_the_plan_says_it_may_not_fit(tmp_path, tiny_model_dir):
    spec = _spec(tmp_path, "{gpu: auto, gpu_memory_gib: 0.05}")
    nodes = [Node(8, 1)]
    share = trial_resources(spec, nodes).share(spec.base)
    assert (share.gpu, share.fits) == (1.0, False)
    assert any("may run out of memory" in ln for ln in plan_lines(spec, nodes))
    assert memory_cap(1.0, 80) == 1.0


def test_gpu_memory_must_be_known_to_size_shares(tmp_path):
    from trainer.errors import UserError

    with pytest.raises(UserError, match="give it as resources.gpu_memory_gib"):
        trial_resources(_spec(tmp_path), [Node(8, 1, None)])


def test_a_fixed_share_is_kept_and_unused_gpus_are_named(tmp_path):
    spec = _spec(tmp_path, "{cpu: 1, gpu: 0, per_method: {lora: {gpu: 0.25}}}")
    nodes = [Node(8, 1, 80.0)]
    placer = trial_resources(spec, nodes)
    assert placer.share(spec.base.model_copy(update={"method": "lora"})).gpu == 0.25
    note = ignored_gpus_warning(spec, nodes)
    assert note and "ask for none for full" in note and "lora" not in note.split("for full")[1]
    assert ignored_gpus_warning(spec, [Node(8, 0)]) is None


def _record(method: str, **final) -> TrialRecord:
    return TrialRecord(trial_id=f"t{len(final)}{method}", config={"method": method, "learning_rate": 1e-3},
                       final=final, outcome="converged")


def test_the_memory_finding_compares_the_gpu_peak_with_the_estimate_and_names_a_cpu_peak_as_such():
    gpu = [_record("lora", peak_mem_gib=1.0, mem_estimate_gib=1.25, gpu_share=0.1, mem_cap_gib=2.0),
           _record("lora", peak_mem_gib=1.5, mem_estimate_gib=1.25, gpu_share=0.1, mem_cap_gib=2.0, x=1)]
    [line] = memory_findings(gpu)
    assert "GPU memory peak 1.00-1.50 GiB against an estimate of up to 1.25 GiB (peak/estimate 0.80-1.20" in line
    [line] = memory_findings([_record("full", peak_mem_gib=0.7)])
    assert "peak resident memory of a trial's process 0.70-0.70 GiB (CPU" in line
