#!/usr/bin/env bash
# make gpu-check's steps in one call with a time limit: for a lent GPU machine, whose session has
# minutes of device time and one command at most 10 of them. Each step runs under `timeout` with
# its own cap, cut to what is left of BUDGET_S (a step with under a minute left is skipped), and
# writes its log under the output folder; the benchmark writes its JSON after every row, so a
# step cut short keeps what it measured. The summary is printed last (a remote call's reply
# carries the end of the output).
#
#   SORA_KERNELS_REVISION=<rev> bash benchmarks/gpu_session.sh [OUT_DIR]   # OUT_DIR: $OUT, else /tmp/gpu-session
#
# Steps: the GPU and versions; build the extension in place for this GPU's architecture only
# (SORA_KERNELS_CUDA_ARCHS, e.g. 9.0a); sora_kernels.info; every test on CUDA but the
# ahead-of-time spill check (pytest-xdist; TEST_ARGS, default "-n 14 --ignore=tests/
# test_triton_aot.py tests": that check compiles 4,600 configs on the CPUs, in each xdist worker
# that draws one of its tests; CI runs it, and its Triton 3.6 list, the lent machine's, is
# compiled without a GPU too; tests/test_aot_jobs.py, which checks the jobs against the real
# JIT's launches, does run); then the benchmarks, in three runs so that the ones that
# matter most come first: those that choose defaults (varlen_attention's dq modes and forward
# loads, adaln_norm's backward grid, group_norm_silu's three-pass forward and its default cuda
# forward) into cuda-variants.json, the rest of varlen_attention into cuda-attention.json,
# everything else into cuda.json. Last: the end of build.log if the build failed, the test
# summary lines, python -m benchmarks.variants over the JSON files that load, and each step's
# exit status and seconds. Seven files land in OUT_DIR (a lent machine returns at most 8):
# session.log, build.log, tests.log, bench.log and the three JSON files. Commit the JSON files
# as benchmarks/results/cuda-<gpu>.json, .attention.json and .variants.json.
#
# The defaults fit a 15-minute lease: about 2 minutes to start the machine, 8 for this
# (BUDGET_S=480; give the call timeout_s 540), and time left to rerun a step.
# SORA_KERNELS_REVISION: the revision the results files record (git rev-parse --short HEAD, run
# here: a lent machine's copy of the tree has no .git). The exit status is 0 when every step ran
# and passed.
# Environment: BUDGET_S (seconds for everything), TEST_S (the tests' share, default 200),
# PYTHON (python3), GPU_CXX (the host compiler; /usr/bin/g++ where it exists: the lent image's
# default g++ builds an extension whose C++ exceptions crash inside its torch), TEST_ARGS (the
# tests' pytest arguments, paths included), BENCH_ARGS (extra pytest arguments for the
# benchmark runs, e.g. --quick).
set -u
out=${1:-${OUT:-/tmp/gpu-session}}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
budget=${BUDGET_S:-480}
test_s=${TEST_S:-200}
py=${PYTHON:-python3}
cxx=${GPU_CXX:-$(test -x /usr/bin/g++ && echo /usr/bin/g++ || echo c++)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS
summary=()

log() { echo "[$((SECONDS - start))s] $*" | tee -a "$out/session.log"; }
left() { echo $((budget - (SECONDS - start))); }

# step NAME LIMIT_S LOGFILE CMD...: runs CMD under timeout (SIGINT first, so pytest writes its
# summary; SIGKILL 20 s later) with at most LIMIT_S seconds and what the budget has left
step() {
  local name=$1 limit=$2 logfile=$3 t0=$SECONDS rc
  shift 3
  local avail=$(($(left) - 30))
  ((limit > avail)) && limit=$avail
  if ((limit < 60)); then        # under a minute a benchmark run barely starts CUDA
    log "$name skipped: ${limit}s left in the budget"
    summary+=("$name: skipped (budget)")
    return 1
  fi
  log "$name (limit ${limit}s): $*"
  timeout -s INT -k 20 "$limit" "$@" >>"$out/$logfile" 2>&1
  rc=$?
  log "$name rc=$rc in $((SECONDS - t0))s"
  summary+=("$name: rc=$rc, $((SECONDS - t0))s$( ((rc == 124 || rc == 137)) && echo ' (cut at its limit)')")
  return $rc
}

# the revision in the results files: a lent machine's copy of the tree has no .git, so pass it
if [[ -z "${SORA_KERNELS_REVISION:-}" ]] && git rev-parse --git-dir >/dev/null 2>&1; then
  SORA_KERNELS_REVISION="$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+changes')"
fi
export SORA_KERNELS_REVISION=${SORA_KERNELS_REVISION:-unknown}
log "start: revision $SORA_KERNELS_REVISION, budget ${budget}s"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader >>"$out/session.log" 2>&1
$py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                                   'triton', triton.__version__)" >>"$out/session.log" 2>&1
arch=$($py -c "import torch; c = torch.cuda.get_device_capability()
print(f'{c[0]}.{c[1]}' + ('a' if c[0] == 9 else ''))" 2>>"$out/session.log")
[[ -n "$arch" ]] && export SORA_KERNELS_CUDA_ARCHS=${SORA_KERNELS_CUDA_ARCHS:-$arch}

if step build 240 build.log env CXX="$cxx" "$py" setup.py -q build_ext --inplace; then
  $py -m sora_kernels.info >>"$out/session.log" 2>&1
  # shellcheck disable=SC2086 # TEST_ARGS and BENCH_ARGS are lists of arguments
  step tests "$test_s" tests.log "$py" -m pytest -q -p no:cacheprovider ${TEST_ARGS:--n 14 --ignore=tests/test_triton_aot.py tests}
  # the settings a default is chosen from, and group_norm_silu's default row beside its variant
  # (the other variant benchmarks time their default setting as one of their rows)
  pick="test_dq_modes or test_fwd_loads or test_backward_grid or test_cuda_three_pass"
  pick+=" or (test_group_norm_silu and cuda-fwd-contiguous)"
  # shellcheck disable=SC2086
  step bench-variants 150 bench.log "$py" -m benchmarks.run -k "$pick" --results "$out/cuda-variants.json" \
    ${BENCH_ARGS:-}
  # shellcheck disable=SC2086
  step bench-attention 180 bench.log "$py" -m benchmarks.run -k "bench_varlen_attention and not ($pick)" \
    --results "$out/cuda-attention.json" ${BENCH_ARGS:-}
  # shellcheck disable=SC2086
  step bench 600 bench.log "$py" -m benchmarks.run -k "not bench_varlen_attention and not ($pick)" \
    --results "$out/cuda.json" ${BENCH_ARGS:-}
fi

{
  if ! grep -q "build: rc=0" <<<"${summary[*]}"; then
    echo "== build (the end of build.log)"
    tail -30 "$out/build.log" 2>/dev/null
  fi
  echo "== tests"
  grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$out/tests.log" 2>/dev/null | tail -15
  echo "== variants (the rows a default is chosen from)"
  files=()
  for f in "$out"/cuda-variants.json "$out"/cuda-attention.json "$out"/cuda.json; do
    test -s "$f" && "$py" -c "import json, sys; json.load(open(sys.argv[1]))" "$f" 2>/dev/null && files+=("$f")
  done
  ((${#files[@]})) && $py -m benchmarks.variants "${files[@]}"
  echo "== steps"
  printf '%s\n' "${summary[@]}"
  echo "total $((SECONDS - start))s of ${budget}s; logs and results in $out"
} 2>&1 | tee -a "$out/session.log"
# exit status: 0 when every step ran and passed
for line in "${summary[@]}"; do [[ "$line" == *": rc=0,"* ]] || exit 1; done
