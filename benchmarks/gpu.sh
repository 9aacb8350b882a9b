#!/usr/bin/env bash
# The GPU check of fxcurv, as one command on a fresh CUDA machine (see benchmarks/README.md, "GPU"):
#
#   bash benchmarks/gpu.sh                   # environment, install, tests on CUDA, benchmark, summary
#   bash benchmarks/gpu.sh --dry-run         # the same stages on the CPU, tiny: checks the plumbing
#   bash benchmarks/gpu.sh --prepare-wheels  # here (PyPI reachable): the wheels the GPU machine lacks
#
# Options: --skip-tests, --skip-bench, --total-budget S, --test-budget S (defaults below); extra
# arguments for pytest and for benchmarks/gpu.py in GPU_TEST_ARGS and GPU_BENCH_ARGS, e.g.
#   GPU_BENCH_ARGS="--configs c3d3_128 --backends fused,inductor" bash benchmarks/gpu.sh --skip-tests
# Everything goes under $OUT (a new temporary folder if unset): env.log, install.log, tests.log,
# tests/junit.xml, bench.log, bench/results.{json,md}, stages.tsv, summary.log and SUMMARY.md.
# Each stage runs under `timeout` with its own log; a stage that fails or times out is recorded in
# stages.tsv and the next one runs. The closing summary is printed last (the device tool returns the
# tail of the output).
#
# fxcurv is used from this tree (PYTHONPATH, no build, no dependency fetched); the carried wheels
# (pure Python) are installed into a private folder: nothing else is installed on the machine.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/benchmarks/gpu.sh"
WHEELS_DIR="$ROOT/benchmarks/wheels"
# What the GPU machine lacks, pinned; all pure Python (py3-none-any). BackPACK's metadata requires
# torchvision (for its examples only), hence --no-deps everywhere.
WHEELS="backpack-for-pytorch==1.7.1 einops==0.8.2 unfoldNd==0.2.3 pytest-xdist==3.8.0 execnet==2.1.2"
TARGET_PYTHON=3.12  # the GPU machine's Python

# Time (seconds). The issue's bound for one run is 8 minutes, and a second run must fit in the 15
# device minutes, machine start included: the stages share TOTAL_BUDGET_S, less a margin for
# Python's start-up and for copying $OUT back.
TOTAL_BUDGET_S=450
TEST_BUDGET_S=180       # tests on CUDA: Triton compiles each kernel of each program on first use
ENV_BUDGET_S=60         # nvidia-smi and version queries (seconds, normally)
INSTALL_BUDGET_S=60     # unpacking a few small wheels
SUMMARY_RESERVE_S=25    # kept for the summary when the benchmark's budget is set
BENCH_MARGIN_S=20       # gpu.py stops starting work this long before its stage's timeout
KILL_AFTER_S=15         # SIGINT at the budget (pytest and gpu.py write what they have), SIGKILL after this
MAX_TEST_WORKERS=12     # pytest-xdist workers: kernel compiles are single-threaded, the GPU is shared

PY="${PYTHON:-$(command -v python3 || command -v python)}"

# ---------------------------------------------------------------------------------------------------
# stages, each run as `bash gpu.sh --stage NAME` under timeout (reads OUT, WORK, SITE, DRY_RUN)

stage_env() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -srm)  cores: $(nproc)"
    free -g 2>/dev/null | head -2
    df -h "$ROOT" "$WORK" 2>/dev/null
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit,driver_version --format=csv
    else
        echo "nvidia-smi: not found (no NVIDIA driver: a dry run, or not a GPU machine)"
    fi
    if [ -e "$ROOT/.git" ] && command -v git >/dev/null; then
        echo "git: $(git -C "$ROOT" rev-parse --short HEAD) $(git -C "$ROOT" status --porcelain | wc -l) changed files"
    else
        echo "git: no repository here (a copy of the working tree); fxcurv's source digest below identifies it"
    fi
    # versions from the installed metadata (no imports: the later stages import, and report failures);
    # torch is imported for the device only where a driver is
    HAS_DRIVER=$(command -v nvidia-smi >/dev/null && echo 1 || echo 0) "$PY" - <<'EOF'
import hashlib, importlib.metadata as md, importlib.util, os, pathlib, platform, sys
print("python", platform.python_version(), sys.executable)
for dist, mod in (("torch", "torch"), ("triton", "triton"), ("numpy", "numpy"), ("networkx", "networkx"),
                  ("pytest", "pytest"), ("hypothesis", "hypothesis"), ("scipy", "scipy"),
                  ("pytest-xdist", "xdist"), ("backpack-for-pytorch", "backpack"), ("einops", "einops"),
                  ("unfoldNd", "unfoldNd"), ("fxcurv", "fxcurv")):
    spec = importlib.util.find_spec(mod)
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = "(no metadata)" if spec else "not installed"
    print(f"{mod:<11} {version:<22} {os.path.dirname(spec.origin) if spec and spec.origin else ''}")
src = sorted(pathlib.Path(os.environ["ROOT"], "fxcurv").rglob("*.py"))
digest = hashlib.sha256(b"".join(f.read_bytes() for f in src)).hexdigest()[:16]
print("fxcurv source digest", digest, f"({len(src)} files)")
print("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"))
if os.environ["HAS_DRIVER"] == "1":
    import torch
    print("torch CUDA build", torch.version.cuda, "| cuda available", torch.cuda.is_available(),
          "| TF32 matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn", torch.backends.cudnn.allow_tf32)
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device {i} {p.name}: capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
              f"{p.multi_processor_count} SMs")
EOF
    "$PY" -m pip --version 2>&1
}

stage_install() {
    echo "fxcurv: from $ROOT (PYTHONPATH; no build, no dependency fetched)"
    shopt -s nullglob
    local wheels=("$WHEELS_DIR"/*.whl) rc=0 w
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no wheels in $WHEELS_DIR: BackPACK and pytest-xdist are unavailable (their methods are reported"
        echo "as such, the tests run in one process); prepare them with: bash benchmarks/gpu.sh --prepare-wheels"
    else
        rm -rf "$SITE" && mkdir -p "$SITE"
        if "$PY" -m pip install --no-deps --no-index --no-compile --disable-pip-version-check \
                --target "$SITE" "${wheels[@]}"; then
            echo "pip: installed ${#wheels[@]} wheels into $SITE"
        else
            echo "pip failed (exit $?): unpacking the wheels instead (pure Python: a wheel is a zip of the tree)"
            for w in "${wheels[@]}"; do
                "$PY" -m zipfile -e "$w" "$SITE" || { echo "could not unpack $w"; rc=1; }
            done
        fi
    fi
    # where the later stages will find each package (they import them, and report an import's failure);
    # a missing one fails this stage: fxcurv always, the others when wheels were carried
    WHEELS_GIVEN=${#wheels[@]} "$PY" - <<'EOF' || rc=1
import importlib.util, os, sys
missing = []
for mod in ("fxcurv", "backpack", "einops", "unfoldNd", "xdist", "execnet"):
    spec = importlib.util.find_spec(mod)
    print(f"{mod}: {os.path.dirname(spec.origin) if spec and spec.origin else 'NOT FOUND'}")
    if spec is None:
        missing.append(mod)
sys.exit(1 if "fxcurv" in missing or (missing and os.environ["WHEELS_GIVEN"] != "0") else 0)
EOF
    return $rc
}

stage_tests() {
    local device=cuda workers f files=() xdist_error
    local args=(-m pytest -p no:cacheprovider -v -rfE --durations=20 --junitxml="$OUT/tests/junit.xml")
    mkdir -p "$OUT/tests"
    if [ "$DRY_RUN" = 1 ]; then
        device=cpu
        echo "dry run: --device cpu (no CUDA here) on tests/test_packaging.py only: checks this stage's plumbing"
        args+=(tests/test_packaging.py)
    else
        # Exactness first (without pytest-xdist the budget may end the run): pytest keeps the order
        # of the files it is given, not of overlapping folders.
        for f in tests/test_exactness.py tests/test_hesscale.py tests/test_mc.py tests/rules/test_*.py \
                 tests/passes/test_*.py $(find tests -name 'test_*.py' | sort); do
            if [ "$f" = tests/test_gpu_script.py ]; then continue; fi
            [[ " ${files[*]} " == *" $f "* ]] || files+=("$f")
        done
        args+=("${files[@]}")
        echo "tests/test_gpu_script.py is left out: it runs this script's dry run on the CPU (CI runs it)"
    fi
    args+=(--device "$device")
    workers=$(( $(nproc) - 2 ))
    [ "$workers" -gt "$MAX_TEST_WORKERS" ] && workers=$MAX_TEST_WORKERS
    if ! "$PY" -c "import xdist" 2>/dev/null; then
        echo "one process: pytest-xdist is not installed"
    elif ! xdist_error=$("$PY" -c "import xdist.plugin" 2>&1); then
        # pytest would load the broken plugin by itself (an entry point) and fail to start
        echo "one process: pytest-xdist does not load with this pytest: $(echo "$xdist_error" | tail -n 1)"
        args+=(-p no:xdist -p no:xdist.looponfail)
    elif [ "$workers" -gt 1 ]; then
        args+=(-n "$workers" --dist load)
        echo "pytest-xdist: $workers workers"
    else
        echo "one process: too few cores for pytest-xdist"
    fi
    # shellcheck disable=SC2206  # split on purpose: a list of arguments
    args+=(${GPU_TEST_ARGS:-})
    echo "$PY ${args[*]}"
    "$PY" "${args[@]}"
}

stage_bench() {
    local budget=$1
    local args=(benchmarks/gpu.py --out "$OUT" --budget-s "$budget")
    [ "$DRY_RUN" = 1 ] && args+=(--dry-run)
    # shellcheck disable=SC2206  # split on purpose: a list of arguments
    args+=(${GPU_BENCH_ARGS:-})
    echo "$PY ${args[*]}"
    "$PY" "${args[@]}"
}

prepare_wheels() {
    mkdir -p "$WHEELS_DIR"
    # shellcheck disable=SC2086  # WHEELS is a list of requirement specifiers
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" \
        --dest "$WHEELS_DIR" $WHEELS || exit 1
    local bad=0 w
    for w in "$WHEELS_DIR"/*.whl; do
        case "$(basename "$w")" in
            *-py3-none-any.whl|*-py2.py3-none-any.whl) echo "ok (pure Python): $(basename "$w")" ;;
            *) echo "NOT pure Python, may not install on the GPU machine: $(basename "$w")"; bad=1 ;;
        esac
    done
    du -sh "$WHEELS_DIR"
    exit $bad
}

# ---------------------------------------------------------------------------------------------------

record() {  # record NAME STATUS RC SECONDS NOTE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$OUT/stages.tsv"
}

run_stage() {  # run_stage NAME BUDGET_S [ARG]: `gpu.sh --stage NAME [ARG]` under timeout, logged
    local name=$1 budget=$2 start=$SECONDS rc status
    shift 2
    if [ "$budget" -lt 5 ]; then
        record "$name" skipped - 0 "no time left"
        echo "== $name: skipped (no time left)"
        return
    fi
    echo "== $name (at most ${budget} s) -> $OUT/$name.log"
    timeout -s INT -k "$KILL_AFTER_S" "$budget" bash "$SELF" --stage "$name" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" "$rc" "$((SECONDS - start))" ""
    tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
    echo "   $name: $status (exit $rc, $((SECONDS - start)) s)"
}

left() { echo $(( TOTAL_BUDGET_S - (SECONDS - T0) )); }

min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

main() {
    local dry_run=0 skip_tests=0 skip_bench=0
    while [ $# -gt 0 ]; do
        case $1 in
            --stage) shift; cd "$ROOT" || exit 1; "stage_$1" "${@:2}"; exit $? ;;
            --dry-run) dry_run=1 ;;
            --prepare-wheels) prepare_wheels ;;
            --skip-tests) skip_tests=1 ;;
            --skip-bench) skip_bench=1 ;;
            --total-budget) shift; TOTAL_BUDGET_S=$1 ;;
            --test-budget) shift; TEST_BUDGET_S=$1 ;;
            -h|--help) sed -n '2,18p' "$SELF"; exit 0 ;;
            *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
        esac
        shift
    done
    DRY_RUN=$dry_run
    T0=$SECONDS
    OUT="${OUT:-$(mktemp -d -t fxcurv-gpu-out.XXXXXX)}"
    mkdir -p "$OUT" || exit 1
    OUT="$(cd "$OUT" && pwd)"
    if [ "$DRY_RUN" = 1 ]; then
        WORK="$(mktemp -d -t fxcurv-gpu-work.XXXXXX)"  # a dry run leaves nothing behind
        trap 'rm -rf "$WORK"' EXIT
    else
        # kept between the runs of one machine: Triton's, inductor's and fxcurv's kernel caches
        WORK="${TMPDIR:-/tmp}/fxcurv-gpu"
    fi
    SITE="$WORK/site"
    mkdir -p "$WORK"
    export ROOT OUT WORK SITE DRY_RUN PYTHON="$PY"
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export FXCURV_KERNEL_CACHE="$WORK/fxcurv-kernels" TRITON_CACHE_DIR="$WORK/triton-cache"
    export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-cache" PYTHONUNBUFFERED=1
    # inductor's caches of whole graphs, so that gpu.py's prewarm processes compile for the measuring one
    export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
    unset TRITON_INTERPRET  # compiled kernels on the GPU; the dry run's tests set it themselves
    cd "$ROOT" || exit 1
    : >"$OUT/stages.tsv"
    echo "fxcurv GPU check$([ "$DRY_RUN" = 1 ] && echo ' (dry run: the CPU, tiny sizes)'): $ROOT -> $OUT"
    echo "python: $PY | budget ${TOTAL_BUDGET_S} s | work folder $WORK"

    run_stage env "$ENV_BUDGET_S"
    run_stage install "$INSTALL_BUDGET_S"
    if [ "$skip_tests" = 1 ]; then
        record tests skipped - 0 "--skip-tests"
    else
        run_stage tests "$(min "$TEST_BUDGET_S" $(( $(left) - SUMMARY_RESERVE_S )))"
    fi
    if [ "$skip_bench" = 1 ]; then
        record bench skipped - 0 "--skip-bench"
    else
        local budget
        budget=$(( $(left) - SUMMARY_RESERVE_S ))
        run_stage bench "$budget" "$(( budget - BENCH_MARGIN_S ))"
    fi
    echo "== summary"
    if ! timeout -k "$KILL_AFTER_S" "$SUMMARY_RESERVE_S" "$PY" benchmarks/gpu_report.py "$OUT" >"$OUT/summary.log" 2>&1; then
        echo "the summary failed: its log, then the stage logs' tails"
        for f in "$OUT"/*.log; do echo "--- $f"; tail -n 15 "$f"; done
    fi
    cat "$OUT/summary.log"
    echo "total: $((SECONDS - T0)) s; results in $OUT"
    # exit status: 0 when every stage that ran passed
    awk -F'\t' '$2 != "ok" && $2 != "skipped" { bad = 1 } END { exit bad }' "$OUT/stages.tsv"
}

main "$@"
