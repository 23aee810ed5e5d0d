#!/usr/bin/env bash
# GPU check of the torch backend, in one run of under ten minutes on a lent GPU machine (offline):
#   1. installs what travels: wheels under $MMEDGE_WHEELS, shared/wheels/ or benchmarks/wheels/ (bitsandbytes, and transformers /
#      safetensors / tokenizers / onnx if the machine lacks them), then mmedge itself (editable, no index);
#   2. runs the GPU-marked tests (tests/test_conformance.py, tests/test_torch_backend.py: -m gpu) on the tiny artifacts
#      carried in benchmarks/test-artifacts/ (exported here by --prepare; exported there when absent);
#   3. measures (benchmarks/gpu_bench.py): copy bandwidth; CLIP ViT-B/32 image tower batch 1 and 64; BLIP-2 OPT-2.7B shapes
#      FP16 batch 1, 64 new tokens forced: HF generate eager and static cache (compiled and not) vs mmedge torch FP16
#      (compiled and not) / NF4 / INT8; writes the JSON after every variant ($MMEDGE_GPU_CHECK_OUT) with its .md beside it,
#      and appends the section, with the card's name, to RESULTS.md.
# Without a bitsandbytes wheel the INT8/NF4 rows say "skipped" and the rest runs.
#
#   bash benchmarks/gpu_check.sh --prepare  # here, before the GPU run: wheels from ../shared/wheels (only their CUDA 13
#                                           # libraries: MMEDGE_GPU_CUDA_TAG), tiny test artifacts
#   bash benchmarks/gpu_check.sh            # on the GPU machine (carry benchmarks/wheels and benchmarks/test-artifacts)
#   bash benchmarks/gpu_check.sh --tiny     # anywhere, CPU: tiny test models, about a minute (MMEDGE_GPU_CHECK_TINY=1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TINY=${MMEDGE_GPU_CHECK_TINY:-0}
PREPARE=0
LIMIT_S=${MMEDGE_GPU_CHECK_LIMIT_S:-500}  # the whole script; the measurements get what the tests leave
TESTS_S=${MMEDGE_GPU_CHECK_TESTS_S:-210}  # the GPU-marked tests at most
OUT=${MMEDGE_GPU_CHECK_OUT:-benchmarks/out/gpu_check.json}
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    --prepare) PREPARE=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (use --tiny or --prepare)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
START=$SECONDS
say() { echo "gpu_check [$((SECONDS - START)) s]: $*" >&2; }

# --- 0. --prepare: what the GPU machine cannot fetch or should not spend its minutes on ---------------------
if [ "$PREPARE" = 1 ]; then
  mkdir -p benchmarks/wheels
  for wheel in ../shared/wheels/*.whl; do  # only the native libraries for the GPU's CUDA (the carry is capped at 64 MiB)
    [ -e "$wheel" ] && "$PY" benchmarks/slim_wheel.py "$wheel" "benchmarks/wheels/$(basename "$wheel")" --keep "${MMEDGE_GPU_CUDA_TAG:-cuda13}"
  done
  "$PY" -m tests.support.artifacts benchmarks/test-artifacts
  say "prepared: carry benchmarks/wheels and benchmarks/test-artifacts ($(du -sh benchmarks/wheels benchmarks/test-artifacts | awk '{print $1}' | paste -sd+))"
  exit 0
fi
mkdir -p "$(dirname "$OUT")"

# --- 1. what travels ---------------------------------------------------------------------------------
WHEEL_DIRS=()
for dir in ${MMEDGE_WHEELS:-} shared/wheels benchmarks/wheels; do
  if [ -d "$dir" ] && compgen -G "$dir/*.whl" > /dev/null; then WHEEL_DIRS+=("$dir"); fi
done
if [ "${#WHEEL_DIRS[@]}" -gt 0 ]; then
  # one wheel per missing import, no index, no dependencies pulled from anywhere
  "$PY" - "${WHEEL_DIRS[@]}" <<'PY' || say "some wheels did not install (see above); going on"
import importlib.util, pathlib, subprocess, sys
IMPORTS = {"bitsandbytes": "bitsandbytes", "transformers": "transformers", "safetensors": "safetensors",
           "tokenizers": "tokenizers", "onnx": "onnx", "onnxscript": "onnxscript", "onnx_ir": "onnx_ir",
           "huggingface_hub": "huggingface_hub", "pillow": "PIL", "ml_dtypes": "ml_dtypes", "hf_xet": "hf_xet"}
for folder in sys.argv[1:]:
    for wheel in sorted(pathlib.Path(folder).glob("*.whl")):
        dist = wheel.name.split("-")[0].lower()
        module = IMPORTS.get(dist, dist)
        if importlib.util.find_spec(module) is None:
            print(f"gpu_check: installing {wheel.name}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", str(wheel)], check=False)
PY
else
  say "no wheels under shared/wheels or benchmarks/wheels: using what is installed"
fi
if ! "$PY" -c "import mmedge.runtimes.torch_backend, mmedge.export" 2> /dev/null; then
  say "installing mmedge (editable, no index)"
  if ! "$PY" -m pip install --no-index --no-deps --no-build-isolation --quiet -e . ; then
    # no setuptools to build with: map mmedge.export / mmedge.runtimes onto their folders for this run only
    SHIM=$(mktemp -d)
    cat > "$SHIM/sitecustomize.py" <<PY
import importlib.util, sys
ROOTS = {"mmedge.export": "$ROOT/export", "mmedge.runtimes": "$ROOT/runtimes"}
class Finder:  # the two subpackages setuptools maps to other folders; their submodules follow __path__
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        folder = ROOTS.get(name)
        return None if folder is None else importlib.util.spec_from_file_location(
            name, folder + "/__init__.py", submodule_search_locations=[folder])
sys.meta_path.insert(0, Finder)
PY
    export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    say "mmedge mapped through $SHIM/sitecustomize.py"
  fi
fi
"$PY" - <<'PY' >&2
import importlib.util
import torch
names = ("transformers", "bitsandbytes", "onnxruntime", "onnx", "tensorrt")
found = {n: importlib.util.find_spec(n) is not None for n in names}
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), GPU: {gpu}; " +
      ", ".join(f"{n} {'yes' if v else 'no'}" for n, v in found.items()))
PY

# --- 2. the GPU-marked tests ---------------------------------------------------------------------------
if [ -d benchmarks/test-artifacts ]; then export MMEDGE_TEST_ARTIFACTS="$ROOT/benchmarks/test-artifacts"; fi
TESTS_LOG="${OUT%.json}-tests.txt"
say "GPU tests (-m gpu, at most ${TESTS_S} s) -> $TESTS_LOG${MMEDGE_TEST_ARTIFACTS:+ (artifacts from $MMEDGE_TEST_ARTIFACTS)}"
set +e
timeout "$TESTS_S" "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider --durations=12 tests/test_conformance.py tests/test_torch_backend.py \
  > "$TESTS_LOG" 2>&1
TESTS_RC=$?
set -e
TESTS_LINE=$(grep -E "(passed|failed|skipped|error|no tests ran)" "$TESTS_LOG" | tail -n 1)
[ "$TESTS_RC" -eq 124 ] && TESTS_LINE="timed out after ${TESTS_S} s; last: $TESTS_LINE"
say "tests: $TESTS_LINE (exit $TESTS_RC)"
if [ "$TESTS_RC" -ne 0 ] && [ "$TESTS_RC" -ne 5 ]; then tail -n 60 "$TESTS_LOG" >&2; fi

# --- 3. the measurements -----------------------------------------------------------------------------
BUDGET=$(( LIMIT_S - (SECONDS - START) - 60 ))  # a variant started inside the budget may run past it
[ "$BUDGET" -lt 30 ] && BUDGET=30
ARGS=(--out "$OUT" --budget-s "$BUDGET" --tests "$TESTS_LINE (exit $TESTS_RC)")
[ "$TINY" = 1 ] && ARGS+=(--tiny)
say "measuring (budget ${BUDGET} s)"
set +e
"$PY" benchmarks/gpu_bench.py "${ARGS[@]}"
BENCH_RC=$?
set -e
say "done: tests exit $TESTS_RC, measurements exit $BENCH_RC; $OUT"
# exit 5 is pytest's "nothing selected/ran" (every GPU test skipped, e.g. --tiny on a CPU): not a failure
if [ "$TESTS_RC" -ne 0 ] && [ "$TESTS_RC" -ne 5 ]; then exit 1; fi
exit "$BENCH_RC"
