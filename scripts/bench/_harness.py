"""What every benchmark shares: its options, the header it prints, tables, spread over repeats, child processes, sweeps."""
import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from trainer.outputs import provenance

ROOT = Path(__file__).resolve().parents[2]


def cli(doc: str, script: str, argv: list[str] | None, quick: dict, **defaults) -> tuple[argparse.Namespace, "Report"]:
    """--quick, --out and an option per default, typed by it (a list appends; a tuple is the choices, the first the
    default; a bool is a flag, --no-NAME for True); under --quick, ``quick``'s values. Then the report's header."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run on the tiny model (CI); not a measurement")
    p.add_argument("--out", metavar="FILE", help="also write the report to FILE, its figures to FILE's .json")
    for name, default in defaults.items():
        flag = name.replace("_", "-")
        if isinstance(default, bool):  # a flag that flips it
            p.add_argument(f"--no-{flag}" if default else f"--{flag}", dest=name, action=f"store_{not default}".lower())
        elif isinstance(default, tuple):  # the values allowed, the first the default
            p.add_argument(f"--{flag}", choices=default, default=default[0])
        elif isinstance(default, list):
            p.add_argument(f"--{flag}", action="append", default=[], metavar="KEY=VALUE")
        else:
            p.add_argument(f"--{flag}", type=type(default), default=default)
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(quick)
    return args, Report(Path(script).name, argv, args.quick, args.out)


def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def gpus() -> list[dict]:
    out = sh("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits")
    return [{"name": n.strip(), "memory_gib": float(m) / 1024, "driver": d.strip()}
            for n, m, d in (line.split(",") for line in out.splitlines())]


class Report:
    """Prints each line as it comes, and keeps --out's markdown up to date; ``save`` writes the figures (.json)."""

    def __init__(self, script: str, argv: list[str] | None, quick: bool, out: str | None = None):
        self.lines, self.out = [], Path(out) if out else None
        cpu = next((ln.split(":", 1)[1].strip() for ln in sh("cat", "/proc/cpuinfo").splitlines()
                    if ln.startswith("model name")), platform.processor())
        found = ", ".join(f"{g['name']} ({g['memory_gib']:.0f} GiB, driver {g['driver']})" for g in gpus()) or "none"
        commit = (sh("git", "rev-parse", "--short", "HEAD") or "unknown") + ("-dirty" if sh("git", "status", "-s") else "")
        self(f"command: python scripts/bench/{script} {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip(),
             f"commit: {commit}; {time.strftime('%Y-%m-%d %H:%M')}",
             f"machine: {platform.platform()}, CPU {cpu}, {len(os.sched_getaffinity(0))} cores; GPU: {found}; "
             f"Python {platform.python_version()}",
             # the run's own provenance (what metrics.json records): the packages that shape a run, those installed
             "versions: " + ", ".join(f"{n} {v}" for n, v in provenance()["versions"].items()))
        if quick:
            self("--quick: a smoke run on the tiny model; the numbers below are not a measurement")

    def __call__(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
        self.lines.extend(lines)
        if self.out and self.out.suffix != ".json":  # rewritten as it grows: a run stopped midway keeps what it had
            self.out.write_text("\n".join(self.lines) + "\n")

    def table(self, header: list[str], rows: list[list], title: str = "") -> None:
        self(*([title, ""] if title else []), "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), "")

    def save(self, figures: dict) -> None:
        if self.out:
            self.out.with_suffix(".json").write_text(json.dumps({"lines": self.lines, **figures}, indent=1, default=str))


def fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def spread(values: list, digits: int = 1) -> str:
    """``median (min-max)`` over the repeats; one value alone; n/a when none was measured."""
    v = [x for x in values if x is not None]
    return "n/a" if not v else fmt(v[0], digits) if len(v) == 1 else \
        f"{fmt(statistics.median(v), digits)} ({fmt(min(v), digits)}-{fmt(max(v), digits)})"


def timed(fn, *args):
    """``fn(*args)`` and the seconds it took."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def child(script: str, fn: str, *args, timeout: float = 3600) -> dict:
    """``fn(*args)`` of SCRIPT in a fresh process (its own peak memory and imports); arguments and answer as JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, script, "--child", fn], input=json.dumps(args), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {fn} {json.dumps(args)[:300]} failed (exit {proc.returncode}):\n"
                           + proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def entry(main, scope: dict) -> None:
    """A script run as a file: ``--child FN`` (from ``child``) prints ``FN(*stdin's JSON)`` as JSON; else ``main()``."""
    if sys.argv[1:2] == ["--child"]:
        from trainer.quiet import quiet_libraries
        quiet_libraries()
        print(json.dumps(scope[sys.argv[2]](*json.load(sys.stdin)), default=str), flush=True)
    else:
        main()


def stop_session(sid: int) -> None:
    """TERM, then KILL, each process of the sweep's session by id (Ray's workers leave its process group, not it)."""
    def pids() -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
                if int(fields[3]) == sid and fields[0] != "Z":
                    found.append(int(stat.parent.name))
        return found

    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        while (left := pids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not left:
            return


def run_sweep(spec: str, name: str, out: Path, overrides: list[str], store: str | None, *, stop=None,
              timeout: float = 7200) -> dict:
    """``python sweeps/run.py SPEC name=NAME output_dir=OUT OVERRIDES`` in a session of its own, each console line with
    its arrival time; its MLflow runs in the store STORE (None: where the spec says), whose tables are made first, as a
    user's existing store has them (not timed). ``stop()`` (polled) ends it early. Raises if it failed on its own."""
    if store:
        from mlflow.tracking import MlflowClient
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "Creating initial MLflow database tables"
        MlflowClient(tracking_uri=store).search_experiments(max_results=1)
    overrides = [f"name={name}", f"output_dir={out}", *overrides, *(["tracking.uri=null"] if store else [])]
    cmd, lines = [sys.executable, str(ROOT / "sweeps" / "run.py"), str(ROOT / spec), *overrides], []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"MLFLOW_TRACKING_URI": store} if store else {})}
    with tempfile.TemporaryFile("w+") as err:
        launch, stopped = time.time(), False
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        reader = threading.Thread(target=lambda: lines.extend((time.time(), t.rstrip("\n")) for t in proc.stdout), daemon=True)
        reader.start()
        while proc.poll() is None and not (stopped := time.time() - launch > timeout or (stop is not None and stop())):
            time.sleep(0.2)
        exit_unix = time.time()
        stop_session(proc.pid)  # a sweep stopped early; else Ray's processes, which may linger a moment after the driver
        proc.wait(timeout=30)
        reader.join(timeout=10)
        err.seek(0)
        if proc.returncode != 0 and not stopped:
            raise RuntimeError(f"sweep failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
                               + "\n".join(t for _, t in lines[-30:]) + "\n" + err.read()[-3000:])
    return {"launch_unix": launch, "exit_unix": exit_unix, "wall_s": exit_unix - launch, "stopped_early": stopped,
            "cpus": len(os.sched_getaffinity(0)), "overrides": overrides, "lines": lines}
