"""The Hugging Face peer: our tokenized data as an HF dataset, its collator, and ``TrainingArguments`` from the product's
own conversion (``sweeps.results.export.hf_training_args``), so HF trains what the trial trained."""
from pathlib import Path


def rows(examples) -> list[dict]:
    """Our examples as HF rows: input_ids, attention_mask, labels (-100 off the completion, as our loss)."""
    return [{"input_ids": list(e.input_ids), "attention_mask": [1] * len(e.input_ids),
             "labels": [t if is_target else -100 for t, is_target in zip(e.input_ids, e.target)]} for e in examples]


def collator(pad_id: int):
    """Right-pads a batch to its longest row, as ``trainer.data.collate`` does."""
    import torch
    pad = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}

    def collate(batch: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in batch)
        return {k: torch.tensor([r[k] + [fill] * (width - len(r[k])) for r in batch]) for k, fill in pad.items()}
    return collate


def data(cfg, tokenizer) -> tuple[list[dict], list[dict]]:
    """Train and eval examples exactly as our loop reads them (``trainer.data.run_records``, then tokenized)."""
    from trainer.data import run_records, tokenize
    train, evals = run_records(cfg)
    return rows(tokenize(train, tokenizer, cfg.seq_len)), rows(tokenize(evals, tokenizer, cfg.seq_len))


def hf_fields(cfg, n_train: int, cadence: bool = True) -> dict:
    """The export's fields, the optimizer steps pinned to ours (``total_steps``) and (``cadence``) our report/eval cadence."""
    from sweeps.results.export import hf_training_args
    fields = {**hf_training_args(cfg, n_train), "max_steps": cfg.total_steps(n_train),
              "logging_steps": max(1, round(cfg.report_every / cfg.examples_per_step))}
    fields.pop("num_train_epochs", None)
    if cadence and cfg.eval_every:
        fields.update(eval_strategy="steps", eval_steps=max(1, round(cfg.eval_every / cfg.examples_per_step)))
    return fields


def training_args(cfg, n_train: int, tmp: str, cadence: bool = True, **extra):
    import torch
    from transformers import TrainingArguments
    return TrainingArguments(**{
        "output_dir": str(Path(tmp) / "hf_out"), **hf_fields(cfg, n_train, cadence),
        "label_names": ["labels"],  # a peft-wrapped model hides `labels` from HF's signature sniffing
        "report_to": [], "save_strategy": "no", "disable_tqdm": True, "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0, "remove_unused_columns": False, **extra})


def model_init(cfg):
    """The model as our trial builds it: loaded, then the method's own ``prepare`` (the same trainable parameters)."""
    from trainer.methods import get_method
    from trainer.models import load_model
    model, _ = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    return get_method(cfg.method).prepare(model, cfg)


def search(base, cfg_of, n_trials: int, cadence: bool = True, callbacks=(), **search_kw) -> float:
    """``Trainer.hyperparameter_search`` (optuna, lowest ``eval_loss``) over our data, each trial's model and arguments from
    ``cfg_of(trial)`` (``base`` for Trainer's own call); evaluates in one batch of the whole eval set, as ours (16 at most).
    Returns the time the search began (after the tokenizer, the data and Trainer's own model_init)."""
    import tempfile
    import time

    from transformers import PrinterCallback, Trainer

    from trainer.models import load_tokenizer, resolve_model_dir
    tokenizer = load_tokenizer(resolve_model_dir(base.model))
    train_ds, eval_ds = data(base, tokenizer)
    with tempfile.TemporaryDirectory(prefix="bench-hf-search-") as tmp:
        targs = training_args(base, len(train_ds), tmp, cadence, per_device_eval_batch_size=len(eval_ds), logging_strategy="no")
        trainer = Trainer(model_init=lambda trial: model_init(cfg_of(trial) if trial is not None else base), args=targs,
                          train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator(tokenizer.pad_token_id),
                          callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)  # it prints log dicts on stdout, where a child's answer goes
        begin = time.time()
        trainer.hyperparameter_search(hp_space=lambda trial: hf_fields(cfg_of(trial), len(train_ds), cadence), n_trials=n_trials,
                                      compute_objective=lambda m: m["eval_loss"], direction="minimize", backend="optuna", **search_kw)
    return begin
