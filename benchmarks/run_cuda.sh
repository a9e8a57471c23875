#!/usr/bin/env bash
# The GPU checks of a session, in one call (a lent GPU machine's time is short and each start costs
# minutes): the conformance suite on CUDA, `attnzoo bench` in float32 and bfloat16, the peer tables
# of issue 13, and, with the time left, compiled figures. Each step is bounded, and the whole run
# stays inside BUDGET seconds, so that one slow step cannot starve the rest; every step's output
# goes to a file in OUT, and steps.txt says how each ended and how long it took.
#
#   OUT=/tmp/attnzoo-cuda bash benchmarks/run_cuda.sh              # on the GPU machine
#   DEVICE=cpu BUDGET=120 PYTHON=.venv/bin/python bash benchmarks/run_cuda.sh   # a dry run here
#
# It needs only the image's python with torch, pytest, pytest-xdist and pytest-timeout; attnzoo is
# read from src/ (nothing is installed), and timm or torch_geometric, where they import, are timed
# as themselves (benchmarks/_peer.py).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/attnzoo-cuda}
device=${DEVICE:-cuda}
budget=${BUDGET:-500}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_COMPILE_THREADS=1 # the test workers already fill the cores
export ATTNZOO_TEST_DEVICE=$device

# step NAME FILE LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds (less if the budget is
# nearly spent), appending its output to FILE; an interrupt first, so pytest still prints its summary
step() {
    local name=$1 file=$2 limit=$3
    shift 3
    local left=$((budget - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "$name: skipped, the budget is spent" | tee -a "$out/steps.txt"
        return
    fi
    local start=$SECONDS
    echo "=== $name" >>"$out/$file"
    timeout -s INT -k 15 "$limit" "$@" >>"$out/$file" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/steps.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$py" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())'
    lscpu | grep -m1 "Model name"
} >"$out/steps.txt" 2>&1

workers=$(($(nproc) > 13 ? 12 : $(nproc)))
step conformance conformance.txt 190 \
    "$py" -m pytest tests/conformance -n "$workers" -v -p no:cacheprovider --timeout 150 -rfE --tb=short
step gating_peers peers.txt 50 "$py" benchmarks/bench_gating.py --peers --device "$device" --repeats 10
step criss_cross_peers peers.txt 40 \
    "$py" benchmarks/bench_criss_cross.py --peers --sides 64 128 --device "$device" --repeats 10
step split_attention_peers peers.txt 40 \
    "$py" benchmarks/bench_selective.py --peers --device "$device" --repeats 10
step graph_peers peers.txt 40 "$py" benchmarks/bench_graph_attention.py --peers --device "$device" --repeats 10
step mha_peers peers.txt 50 "$py" benchmarks/bench_mha_peers.py --device "$device" --repeats 10
step kept_weights peers.txt 30 "$py" benchmarks/bench_kept_weights.py --quick --device "$device" --repeats 10
step bench bench.txt 80 \
    "$py" -m attnzoo bench --device "$device" --dtype bfloat16 --batch 8 --width 256 --extent 64 --repeats 10 -q
step mha_torch peers.txt 30 "$py" benchmarks/bench_mha.py --device "$device" --repeats 10
step compiled bench.txt 120 \
    "$py" -m attnzoo bench cbam non_local mha --compile --device "$device" --batch 8 --width 256 --extent 64 -q
exit 0
