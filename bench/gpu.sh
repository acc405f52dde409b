#!/usr/bin/env bash
# The engine's GPU benchmarks (bench/RESULTS.md) on a machine with no internet, such as the
# GPU machines our workplace lends: the packages those lack travel along as wheels.
#
#   bash bench/gpu.sh fetch            here: wheels for Python 3.12 into .whl/ (git-ignored)
#   bash bench/gpu.sh run tts|streams|replies
#                                      there, in the repository root, with .whl/ beside it;
#                                      results (JSON, logs, nvidia-smi) go to $OUT (or bench/out)
#   bash bench/gpu.sh run check        there: the test that CUDA graph replay matches eager steps
#
# The GPU machine must have Python 3.12 with torch (CUDA), numpy, tokenizers,
# huggingface_hub, safetensors, tiktoken, einops, pillow and requests (as the device tool's
# image has); only the packages below are added.
# Each run takes a few minutes (the 3B model is made with random weights on the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

# Versions the test suite runs with (transformers' own checks need regex >= 2025.10.22).
WHEELS="transformers==5.23.0 snac==1.2.1 llama-models==0.3.0 regex==2026.11.15"
# Voxtral's processor (bench replies): mistral-common and what it needs beyond the image.
WHEELS="$WHEELS mistral-common==1.13.1 pydantic==2.14.3 pydantic-core==2.50.4 pydantic-extra-types==2.11.1
    annotated-types==0.8.0 typing-inspection==0.4.5 pycountry==26.2.16 jsonschema==4.26.0
    jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 soundfile==0.14.0
    soxr==1.1.0 cffi==2.1.1 pycparser==3.12 attrs==26.1.0"
PROFILE="${PROFILE:-orpheus-3b-random}"

case "${1:-}" in
fetch)
    rm -rf .whl && mkdir -p .whl
    for wheel in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
            -d .whl "$wheel"
    done
    ls -l .whl
    ;;
run)
    what="${2:-}"
    case "$what" in tts|streams|replies|check) ;; *) echo "usage: bench/gpu.sh run tts|streams|replies|check" >&2; exit 2 ;; esac
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    out="${OUT:-bench/out}"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.csv" || true
    python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__)' > "$out/versions.txt"
    shift 2
    if [ "$what" = check ]; then  # no pytest-asyncio there: only the synchronous CUDA test runs
        python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k cuda_graph 2>&1 | tee "$out/check.log"
        exit "${PIPESTATUS[0]}"
    fi
    python3 -m agent.cli bench "$what" --profile "$PROFILE" --json "$@" > "$out/$what.json" 2> >(tee "$out/$what.log" >&2)
    cat "$out/$what.json"
    ;;
*)
    echo "usage: bench/gpu.sh fetch | run tts|streams|replies [bench options] | run check" >&2
    exit 2
    ;;
esac
