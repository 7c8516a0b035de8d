"""Train collection classifiers: a thin wrapper around `imgstream train-classifiers` (see its --help).

Kept for the commands people already run, e.g.

    python scripts/train_classifier.py --collection-id 7 --results results.jsonl \\
        --labels labels.csv --key metadata.photo_id --embedding-type embed_clip_vit_b_32 \\
        --region prominent_face

Without --out/--classifiers-dir it writes into this repository's trained_classifiers/, as it always has.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgstream.producer.cli import main as imgstream  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--out", "--classifiers-dir") or a.startswith(("--out=", "--classifiers-dir=")) for a in args):
        args += ["--classifiers-dir", str(ROOT / "trained_classifiers")]
    return imgstream(["train-classifiers", *args])


if __name__ == "__main__":
    sys.exit(main())
