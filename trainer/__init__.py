"""One fine-tuning run of a causal language model: full, LoRA or last-layer tuning.

The same code is a Ray Tune trial of a sweep and the production fine-tune:

    python -m trainer.train CONFIG.yaml [key=value ...]

The trainer never imports ray or mlflow; progress leaves through an injected
``report(metrics)`` callable.
"""
from trainer.config import TrainConfig, load_train_config
from trainer.errors import UserError

__all__ = ["TrainConfig", "TrainResult", "UserError", "load_train_config", "train"]


def __getattr__(name: str):
    # The loop pulls in torch and transformers; keep `import trainer` light.
    if name in ("train", "TrainResult"):
        from trainer import loop

        return getattr(loop, name)
    raise AttributeError(name)
