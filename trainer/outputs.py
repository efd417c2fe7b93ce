"""What a run leaves on disk, and how to load it back.

    OUTPUT_DIR/
      model/              the fine-tuned model (full, last_layer) or the LoRA adapter (lora)
      config.yaml         the resolved config: `python -m trainer.train OUTPUT_DIR/config.yaml` reruns it
      metrics.json        final metrics, per-report history, provenance (git SHA, package versions)
      weight_change.csv   per tensor ||W - W0|| / ||W0|| (LoRA merged)
"""
from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from trainer.config import TrainConfig
from trainer.yamlio import safe_load

_PACKAGES = ("torch", "transformers", "peft", "ray", "optuna", "mlflow")


def provenance() -> dict[str, Any]:
    """Git SHA of the code and the versions of the packages that shape a run."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"git_sha": git_sha(), "python": platform.python_version(), "versions": versions}


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_outputs(cfg: TrainConfig, model, tokenizer, method, metrics, history, changes) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.save_model and metrics.get("status") == "completed":
        method.save(model, out / "model")
        tokenizer.save_pretrained(out / "model")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
    payload = {"metrics": finite(metrics), "history": finite(history), "provenance": provenance()}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2))
    if changes:
        with (out / "weight_change.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["name", "block", "numel", "rel_change"])
            writer.writeheader()
            writer.writerows(changes)
    return out


def load_finetuned(output_dir: str | Path):
    """Load a run's output back as ``(model, tokenizer, cfg)``: the base plus adapter for an adapter method."""
    from transformers import AutoModelForCausalLM

    from trainer.methods import get_method
    from trainer.models import load_for, load_tokenizer

    out = Path(output_dir)
    cfg = TrainConfig.model_validate(safe_load((out / "config.yaml").read_text()))
    if get_method(cfg.method).saves_adapter:
        from peft import PeftModel

        base, tokenizer = load_for(cfg)  # the base as the run trained on it (dtype, 4-bit)
        return PeftModel.from_pretrained(base, out / "model"), tokenizer, cfg
    model = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=cfg.trust_remote_code)
    return model, load_tokenizer(out / "model"), cfg


def finite(obj):
    """JSON has no NaN: write non-finite floats as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj
