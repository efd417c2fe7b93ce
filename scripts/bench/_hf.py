"""The Hugging Face peer: our tokenized examples as its dataset, our collator, and ``TrainingArguments`` from the product's
own conversion (``sweeps.results.export.hf_training_args``), so HF trains what the trial trained. Imported only by the
HF side's own processes (their peak memory and imports are HF's)."""
import tempfile
import time
from pathlib import Path

import optuna
import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from sweeps.results.export import hf_training_args
from trainer.data import collate, run_records, tokenize
from trainer.methods import get_method
from trainer.models import load_model, load_tokenizer, resolve_model_dir


def collator(pad_id: int):
    """Our own ``trainer.data.collate`` of our examples, plus HF's labels: -100 off the completion (as our loss)."""
    def collate_hf(batch: list) -> dict:
        out = collate(batch, pad_id)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"],
                "labels": out["input_ids"].masked_fill(~out["target"], -100)}
    return collate_hf


def data(cfg, tokenizer) -> list[list]:
    """Train and eval examples exactly as our loop reads them (``trainer.data.run_records``, then tokenized)."""
    return [tokenize(records, tokenizer, cfg.seq_len) for records in run_records(cfg)]


def hf_fields(cfg, n_train: int, cadence: bool = True) -> dict:
    """The export's fields, the optimizer steps pinned to ours (``total_steps``) and (``cadence``) our report/eval cadence."""
    fields = {**hf_training_args(cfg, n_train), "max_steps": cfg.total_steps(n_train),
              "logging_steps": max(1, round(cfg.report_every / cfg.examples_per_step))}
    fields.pop("num_train_epochs", None)
    if cadence and cfg.eval_every:
        fields.update(eval_strategy="steps", eval_steps=max(1, round(cfg.eval_every / cfg.examples_per_step)))
    return fields


def training_args(cfg, n_train: int, tmp: str, cadence: bool = True, **extra):
    return TrainingArguments(**{
        "output_dir": str(Path(tmp) / "hf_out"), **hf_fields(cfg, n_train, cadence),
        "label_names": ["labels"],  # a peft-wrapped model hides `labels` from HF's signature sniffing
        "report_to": [], "save_strategy": "no", "disable_tqdm": True, "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0, "remove_unused_columns": False, **extra})


def model_init(cfg):
    """The model as our trial builds it: loaded, then the method's own ``prepare`` (the same trainable parameters)."""
    model, _ = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    return get_method(cfg.method).prepare(model, cfg)


class StepTimes(TrainerCallback):
    """Each optimizer step's seconds, on_step_begin to on_step_end, summed (as our loop's ``train_time_s``); also the
    wall clock at the first step's end and the evaluations' own runtime."""

    def __init__(self):
        self.train_s = self.eval_s = self.t0 = 0.0
        self.first_step_unix = None

    def on_step_begin(self, *_a, **_k):
        self.t0 = time.perf_counter()

    def on_step_end(self, *_a, **_k):
        self.train_s += time.perf_counter() - self.t0
        self.first_step_unix = self.first_step_unix or time.time()

    def on_evaluate(self, args, state, control, metrics=None, **_k):
        self.eval_s += (metrics or {}).get("eval_runtime", 0.0)


def search(base, cfg_of, n_trials: int, cadence: bool = True, callbacks=(), **search_kw) -> float:
    """``Trainer.hyperparameter_search`` (optuna, lowest ``eval_loss``) over our data, each trial's model and arguments from
    ``cfg_of(trial)`` (``base`` for Trainer's own call); evaluates in one batch of the whole eval set, as ours (16 at most).
    Returns the time the search began (after the tokenizer, the data and Trainer's own model_init)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tokenizer = load_tokenizer(resolve_model_dir(base.model))
    train_ds, eval_ds = data(base, tokenizer)
    with tempfile.TemporaryDirectory(prefix="bench-hf-search-") as tmp:
        targs = training_args(base, len(train_ds), tmp, cadence, per_device_eval_batch_size=len(eval_ds), logging_strategy="no")
        trainer = Trainer(model_init=lambda trial: model_init(cfg_of(trial) if trial is not None else base), args=targs,
                          train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator(tokenizer.pad_token_id),
                          callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)  # it prints log dicts on stdout, where a child's answer goes
        begin = time.time()
        trainer.hyperparameter_search(hp_space=lambda trial: hf_fields(cfg_of(trial), len(train_ds), cadence),
                                      n_trials=n_trials, compute_objective=lambda m: m["eval_loss"], direction="minimize",
                                      backend="optuna", **search_kw)
    return begin
