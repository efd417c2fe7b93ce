"""resources: auto packs trials on GPUs by their memory estimate: shown on a real Ray cluster of this CPU machine
started with logical GPUs (``ray start --num-gpus 2``), the trainer forced to the CPU. Real Ray, Optuna, MLflow."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sweeps.launch.placement import CONTEXT_GIB, FILL, MARGIN
from tests.conftest import ray_node, run_cli, stop_ray_nodes_under
from tests.test_faults import _free_port as free_port

pytestmark = pytest.mark.slow

GPUS, CPUS, PER_GPU = 2, 4, 2
TOKEN = {"RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with 2 logical GPUs and 4 CPUs (token auth, as Ray starts by default), stopped at the end."""
    temp_dir = Path(f"/tmp/ray-gpu-{os.getpid()}")  # short: Ray's socket paths must fit
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    try:
        ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                  f"--num-gpus={GPUS}", f"--num-cpus={CPUS}"], temp_dir, env)
        yield f"127.0.0.1:{port}"
    finally:
        stop_ray_nodes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _spec(tmp_path: Path, gpu_memory_gib: float) -> Path:
    spec = tmp_path / "packed.yaml"
    spec.write_text(f"""name: packed
model: tiny
data: {{train: "builtin:facts:16", eval: "builtin:facts-heldout:16"}}
train: {{batch_size: 4, seq_len: 48, epochs: 12, report_every: 16, eval_every: 96, device: cpu, forgetting: false}}
search: {{algorithm: grid}}
space:
  method: [lora]
  learning_rate: {{values: [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2, 1.0e-1, 3.0e-1]}}
  fault: {{values: [null, "oom@3"], when: {{learning_rate: [1.0e-4]}}}}  # out of memory at step 3: that trial alone fails
pruning: {{rule: none}}
resources: {{gpu: auto, gpu_memory_gib: {gpu_memory_gib:.4f}}}
output_dir: {tmp_path / 'out'}
""")
    return spec


def _memory_for_two_per_gpu() -> float:
    """A GPU size into which exactly two of these trials fit (90% of it), from the estimate itself."""
    from trainer import TrainConfig
    from trainer.memory import estimate

    cfg = TrainConfig(model="tiny", method="lora", batch_size=4, seq_len=48, train_data="builtin:facts:16",
                      eval_data="builtin:facts-heldout:16", forgetting=False, device="cpu")
    return (MARGIN * estimate(cfg, device="cuda").total_gib + CONTEXT_GIB) * (PER_GPU + 0.5) / FILL


def test_dry_run_against_the_cluster_prints_the_packing_plan(cluster, tmp_path, tiny_model_dir):
    spec = _spec(tmp_path, _memory_for_two_per_gpu())
    proc = run_cli(["sweeps/run.py", str(spec), "--dry-run", "--address", cluster], timeout=300, env=TOKEN)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{CPUS} CPU(s), {GPUS} GPU(s)" in proc.stdout
    plan = next(line for line in proc.stdout.splitlines() if line.strip().startswith("lora: estimate"))
    assert f"0.5 GPU each, {PER_GPU} per GPU" in plan and f"{GPUS * PER_GPU} trial(s) at once" in plan, plan
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_a_sweep_runs_the_planned_number_of_trials_at_once_each_with_its_gpu(cluster, tmp_path, tiny_model_dir):
    spec = _spec(tmp_path, _memory_for_two_per_gpu())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["sweeps/run.py", str(spec), "--address", cluster], timeout=900, env={**TOKEN, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = json.loads((tmp_path / "out" / "packed" / "trials.json").read_text())
    oom = [t for t in trials if t["config"].get("fault")]
    assert len(oom) == 1 and oom[0]["outcome"] == "failed", oom
    reason = oom[0]["final"]["reason"]
    assert "out of memory at step 3" in reason and "estimated" in reason and "share: 0.5 of a GPU" in reason, reason
    trials = [t for t in trials if not t["config"].get("fault")]
    assert len(trials) == 8 and all(t["final"].get("status") == "completed" for t in trials), "the sweep went on"
    for t in trials:
        final = t["final"]
        assert final["gpu_share"] == 0.5 and len(final["gpu_ids"]) == 1, final
        assert final["mem_estimate_gib"] > 0 and final["peak_mem_gib"] > 0
    # each GPU held at most two trials at a time, and both GPUs were used
    assert {t["final"]["gpu_ids"][0] for t in trials} == {"0", "1"}
    spans = [(t["final"]["start_unix"], t["final"]["end_unix"]) for t in trials]
    overlap = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert overlap == GPUS * PER_GPU, f"{overlap} trials ran at once; the plan says {GPUS * PER_GPU}"
