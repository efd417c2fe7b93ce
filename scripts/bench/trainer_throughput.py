"""Trainer throughput (BENCHMARKS.md section 3): our loop against HF ``Trainer``, tokens/s over the optimizer steps."""
import resource
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: this checkout's packages
from scripts.bench._harness import child, cli, entry, spread

TRAIN_DATA, SEQ_LEN = "builtin:facts", 48
IMPLS = ("ours", "hf")
HEADER = ["method", "ours tok/s", "HF tok/s", "ratio", "verdict", "ours peak MB", "HF peak MB", "ours s/step", "HF s/step"]


def one(a: dict, impl: str, method: str) -> dict:
    """(A fresh process.) Ours: ``train_time_s`` (its optimizer steps); tokens of the examples its stream fed. HF: the
    same model, data, trainable parameters and arguments; on_step_begin to on_step_end of each step, summed."""
    import torch

    from trainer.config import TrainConfig
    from trainer.data import example_stream, read_examples, tokenize
    from trainer.loop import train
    from trainer.models import load_tokenizer, resolve_model_dir
    cfg = TrainConfig(model=a["model"], method=method, device=a["device"], dtype=a["dtype"], threads=a["threads"],
                      train_data=TRAIN_DATA, eval_data="builtin:facts-heldout:4", seq_len=SEQ_LEN, batch_size=a["batch_size"],
                      max_steps=a["steps"], learning_rate=1e-4, warmup_ratio=0.0, scheduler="constant", eval_every=None,
                      memorization=False, forgetting=False, weight_change=False, save_model=False,
                      gradient_checkpointing=a["checkpointing"])  # HF's: the export's activation_checkpointing
    tokenizer = load_tokenizer(resolve_model_dir(cfg.model))
    peak_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    if impl == "ours":
        if (result := train(cfg)).status != "completed":
            raise RuntimeError(f"our trainer did not complete: {result.status} {result.reason}")
        stream = example_stream(tokenize(read_examples(TRAIN_DATA), tokenizer, SEQ_LEN), seed=cfg.seed)
        return {"tokens": sum(len(next(stream).input_ids) for _ in range(cfg.max_steps * cfg.batch_size)), "peak_mb": peak_mb(),
                "seconds": result.metrics["train_time_s"], "trainable": result.metrics["trainable_params"]}
    from transformers import Trainer  # only here: the HF process's peak memory, not ours

    from scripts.bench import _hf
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, (train_ds, _) = _hf.model_init(cfg), _hf.data(cfg, tokenizer)
    seen, times = {"tokens": 0}, _hf.StepTimes()
    model.register_forward_pre_hook(lambda m, _a, kw: seen.update(tokens=seen["tokens"] + int(kw["attention_mask"].sum()))
                                    if m.training else None, with_kwargs=True)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        targs = _hf.training_args(cfg, len(train_ds), tmp, eval_strategy="no", logging_strategy="no", use_cpu=cfg.device == "cpu")
        Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=_hf.collator(tokenizer.pad_token_id),
                callbacks=[times]).train()
    return {"tokens": seen["tokens"], "seconds": times.train_s, "peak_mb": peak_mb(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def measure(args, method: str) -> dict:
    """Ours and HF interleaved, ``reps`` times each (--quick: each pair side by side); parity within the run-to-run spread."""
    with ThreadPoolExecutor(2 if args.quick else 1) as pool:
        reps = [list(pool.map(lambda impl: child(__file__, "one", vars(args), impl, method), IMPLS)) for _ in range(args.reps)]
    runs = {impl: [rep[i] for rep in reps] for i, impl in enumerate(IMPLS)}
    if (ours := runs["ours"][0]["trainable"]) != (hf := runs["hf"][0]["trainable"]):
        raise RuntimeError(f"{method}: trainable parameters differ: {ours} vs {hf}")
    tok_s = {impl: [r["tokens"] / r["seconds"] for r in rs] for impl, rs in runs.items()}
    ratio = statistics.median(tok_s["ours"]) / statistics.median(tok_s["hf"])
    noise = max((max(v) - min(v)) / statistics.median(v) for v in tok_s.values())  # either side's relative range
    verdict = "n/a (1 rep)" if args.reps < 2 else "parity" if abs(ratio - 1) <= noise else "faster" if ratio > 1 else "slower"
    return {"method": method, "tok_s": tok_s, "ratio": ratio, "noise": noise, "verdict": verdict,
            "peak_mb": {impl: [r["peak_mb"] for r in rs] for impl, rs in runs.items()},
            "s_step": {impl: [r["seconds"] / args.steps for r in rs] for impl, rs in runs.items()}}


def main(argv: list[str] | None = None) -> None:
    args, rep = cli(__doc__, __file__, argv, dict(model="tiny", steps=4, reps=1), model="smollm2-135m", steps=12,
                    methods="full,lora,last_layer", batch_size=4, reps=3, threads=2, device=("cpu", "cuda"),
                    dtype=("float32", "bfloat16", "float16"), checkpointing=False)
    rows = [measure(args, m) for m in args.methods.split(",")]
    rep(f"model {args.model}, {TRAIN_DATA} seq_len {SEQ_LEN}, batch {args.batch_size}, {args.steps} optimizer steps, "
        f"{args.threads} torch threads, {args.device} {args.dtype}{', gradient checkpointing' * args.checkpointing}; "
        "each run a fresh process, ours and HF interleaved; "
        f"median (min-max) of {args.reps}; time = the optimizer steps on both sides; parity = |ratio - 1| within "
        "either side's spread", "")
    rep.table(HEADER, [[r["method"], *(spread(r["tok_s"][i], 0) for i in IMPLS), f"{r['ratio']:.2f}", r["verdict"],
                        *(spread(r["peak_mb"][i], 0) for i in IMPLS), *(spread(r["s_step"][i], 3) for i in IMPLS)] for r in rows])
    rep.save({"rows": rows})


if __name__ == "__main__":
    entry(main, globals())
