#!/usr/bin/env bash
# The engine's GPU benchmarks (bench/RESULTS.md) on a machine with no internet, such as the
# GPU machines our workplace lends: the packages those lack travel along as wheels.
#
#   bash bench/gpu.sh fetch            here: wheels for Python 3.12 into .whl/ (git-ignored)
#   bash bench/gpu.sh run tts|streams|replies
#                                      there, in the repository root, with .whl/ beside it;
#                                      results (JSON, logs, nvidia-smi) go to $OUT (or bench/out)
#   bash bench/gpu.sh run check        there, the first GPU run (about 4 minutes): the CUDA graph test,
#                                      StaticLlama vs transformers in bf16 (relative logits difference),
#                                      `voice-agent say` with engine.cuda_graphs on and off and with
#                                      engine.mode = "single" (real-time factor side by side, the log
#                                      lines about the captured graphs), and one Voxtral reply on its
#                                      single path; a summary on stdout, everything in $OUT
#
# The GPU machine must have Python 3.12 with torch (CUDA), numpy, tokenizers,
# huggingface_hub, safetensors, tiktoken, einops, pillow and requests (as the device tool's
# image has); only the packages below are added.
# Each run takes a few minutes (the 3B model is made with random weights on the GPU); the
# image has accelerate, so the loads there go straight to the GPU (device_map).
set -euo pipefail
cd "$(dirname "$0")/.."

# Packages the GPU image lacks (or has in other versions), at the versions of
# constraints.txt, the tested environment: transformers 5.24 and what it needs beyond the
# image (transformers' own checks need regex >= 2025.10.22).
WHEELS="transformers snac llama-models regex"
# Voxtral's processor (bench replies, run check): mistral-common and what it needs beyond the image.
WHEELS="$WHEELS mistral-common pydantic pydantic-core pydantic-extra-types annotated-types typing-inspection
    pycountry jsonschema jsonschema-specifications referencing rpds-py soundfile soxr cffi pycparser attrs"
PROFILE="${PROFILE:-orpheus-3b-random}"

# One step of the check, bounded, its output kept in $out/NAME.log; a failure is counted
# and the next step still runs.
failed=0
step() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name" >&2
    if ! timeout "$limit" "$@" 2> >(tee "$out/$name.log" >&2); then
        echo "!! $name failed (or ran past ${limit} s): see $out/$name.log" >&2
        failed=$((failed + 1))
    fi
}

check() {
    out="$1"
    # PyAV (reading input files) is not on the image and too big to carry; say only writes
    # WAVs (the stdlib's wave), so an empty stand-in satisfies agent/audio.py's import.
    mkdir -p /tmp/stub/av && : > /tmp/stub/av/__init__.py
    export PYTHONPATH="$PYTHONPATH:/tmp/stub"
    # No pytest-asyncio there: only the synchronous CUDA tests run. -s shows the bf16 figures.
    step tests 240 python3 -m pytest -q -s -p no:cacheprovider tests/engine/test_engine.py tests/engine/test_static_llama_bf16.py \
        -k "cuda_graph_replay or bf16_on_gpu" > "$out/tests.txt"
    cat "$out/tests.txt"
    # The same sentence three ways. A small engine (8 slots: 24 graphs) and 700 tokens (8.5 s
    # of audio; random weights rarely stop earlier) keep each run near a minute.
    local env=(VOICE_AGENT_ENGINE__MAX_STREAMS=8 VOICE_AGENT_ORPHEUS__MAX_TOKENS=700)
    local text="Hello there, this is the first run on a GPU."
    step say_graphs 180 env "${env[@]}" VOICE_AGENT_ENGINE__CUDA_GRAPHS=true \
        python3 -m agent.cli say "$text" --profile "$PROFILE" --seed 1 -o "$out/say_graphs.wav" --json > "$out/say_graphs.json"
    step say_eager 180 env "${env[@]}" VOICE_AGENT_ENGINE__CUDA_GRAPHS=false \
        python3 -m agent.cli say "$text" --profile "$PROFILE" --seed 1 -o "$out/say_eager.wav" --json > "$out/say_eager.json"
    step say_single 180 env "${env[@]}" VOICE_AGENT_ENGINE__MODE=single \
        python3 -m agent.cli say "$text" --profile "$PROFILE" --seed 1 -o "$out/say_single.wav" --json > "$out/say_single.json"
    # Voxtral's single path (engine.mode = "single", long prompts, transcription): one reply.
    step voxtral_single 180 python3 bench/gpu_check.py voxtral-single > "$out/voxtral_single.json"
    cat "$out/voxtral_single.json"
    python3 bench/gpu_check.py summary "$out" > "$out/summary.json" || failed=$((failed + 1))
    cat "$out/summary.json"
    echo "check: $failed step(s) failed" >&2
    [ "$failed" = 0 ]
}

case "${1:-}" in
fetch)
    rm -rf .whl && mkdir -p .whl
    for name in $WHEELS; do
        # constraints.txt spells names either way (pydantic_core, llama_models): match both.
        pattern="^$(echo "$name" | sed 's/[-_]/[-_]/g')=="
        wheel="$(grep -i "$pattern" constraints.txt)" || { echo "$name is not in constraints.txt" >&2; exit 1; }
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
    if [ "$what" = check ]; then
        check "$out"
        exit $?
    fi
    python3 -m agent.cli bench "$what" --profile "$PROFILE" --json "$@" > "$out/$what.json" 2> >(tee "$out/$what.log" >&2)
    cat "$out/$what.json"
    ;;
*)
    echo "usage: bench/gpu.sh fetch | run tts|streams|replies [bench options] | run check" >&2
    exit 2
    ;;
esac
