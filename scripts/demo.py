"""`make demo`: the main job end to end on the embedded default.

Starts the embedded broker and a worker, submits a real photo with a face (the astronaut
that ships inside scikit-image) with a face-box task and a CLIP task, prints the results.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgstream.blobs import DirectoryBlobStore  # noqa: E402
from imgstream.producer.embedded_broker import EmbeddedBroker  # noqa: E402
from imgstream.producer.submit import build_requests, expand_inputs, parse_task_spec, submit, summarise  # noqa: E402
from imgstream.producer.topics import create_topics  # noqa: E402
from imgstream.schemas.config import Topics  # noqa: E402

WORK = ROOT / ".imgstream" / "demo"
TASKS = ["detect_bounding_box:prominent_face", "embed_clip_vit_b_32"]


def pretrained_available() -> bool:
    """Whether the real CLIP weights are already in the local cache (nothing is downloaded here)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache("timm/vit_base_patch32_clip_224.openai", filename)
        if isinstance(hit, str) and os.path.exists(hit):
            return True
    return False


def astronaut_photo() -> Path:
    from PIL import Image
    from skimage import data

    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "astronaut.png"
    if not path.exists():
        Image.fromarray(data.astronaut()).save(path)
    return path


def start_worker(bootstrap: str, weights: str, log_path: Path) -> subprocess.Popen:
    # The worker reads file:// blobs only inside its blob store directory: the one the demo submits into.
    env = dict(os.environ, HF_HUB_OFFLINE="1", IMGSTREAM_MODELS__PRELOAD='["clip", "face"]',
               IMGSTREAM_BLOBS__DIR=str(WORK / "blobs"))
    cmd = [sys.executable, "-m", "imgstream", "worker", "--bootstrap", bootstrap, "--weights", weights,
           "--group", "imgstream-demo"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)


async def run_demo(bootstrap: str, weights: str) -> int:
    topics = Topics()
    await create_topics(bootstrap, topics, partitions=4)
    photo = astronaut_photo()
    requests = build_requests(expand_inputs([str(photo)], DirectoryBlobStore(WORK / "blobs")),
                              [parse_task_spec(t) for t in TASKS],
                              metadata={"source": "make demo"}, prefix="demo")
    print(f"submitting {photo.name} ({requests[0].request.request_id}) with tasks {TASKS}; waiting for results ...",
          flush=True)
    results, missing = await submit(bootstrap, topics.requests, topics.results, requests, wait=True,
                                    timeout_s=600, progress=False)
    print()
    for result in results:
        print(summarise(result))
        if result.type == "embed_clip_vit_b_32" and result.status == "success":
            print(f"    -> embedding size: {len(result.data)} ({result.model.name}, weights={result.model.weights})")
        if result.type == "detect_bounding_box" and result.status == "success":
            print(f"    -> face box [xmin, ymin, xmax, ymax] on the {result.image.width}x{result.image.height} photo: "
                  f"{result.data}")
    if missing:
        print(f"demo: {missing} results missing", file=sys.stderr)
        return 1
    return 0 if all(r.status == "success" for r in results) else 1


def main() -> int:
    weights = "pretrained" if pretrained_available() else "random"
    print("CLIP weights: " + ("pretrained (found in the local cache)" if weights == "pretrained" else
                              "random (no pretrained weights on this machine; MTCNN uses its real bundled weights)"))
    WORK.mkdir(parents=True, exist_ok=True)
    log_path = WORK / "worker.log"
    with EmbeddedBroker() as broker:
        print(f"embedded broker on {broker.bootstrap}")
        worker = start_worker(broker.bootstrap, weights, log_path)
        print(f"worker started (pid {worker.pid}, log {log_path.relative_to(ROOT)})", flush=True)
        started = time.monotonic()
        try:
            code = asyncio.run(run_demo(broker.bootstrap, weights))
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if code != 0 or worker.returncode not in (0, None):
            print(f"worker exit code {worker.returncode}; last log lines:", file=sys.stderr)
            print("\n".join(log_path.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)
        print(f"\ndone in {time.monotonic() - started:.1f}s; worker exited with {worker.returncode}")
    return code


if __name__ == "__main__":
    sys.exit(main())
