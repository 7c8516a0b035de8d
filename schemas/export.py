"""Writes the JSON Schema files of the events into schemas/json/ (`python -m schemas.export`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from imgstream.schemas.events import AnalysisRequest, ResultEvent
from imgstream.schemas.operations import OperationSpec

SCHEMA_DIR = Path(__file__).parent / "json"
MODELS = {
    "analysis_request.schema.json": AnalysisRequest,
    "result_event.schema.json": ResultEvent,
    "operation.schema.json": OperationSpec,
}


def render() -> dict[str, str]:
    """The file name -> text of every schema file, as it should be on disk."""
    return {
        name: json.dumps(model.model_json_schema(mode="validation"), indent=2, sort_keys=True) + "\n"
        for name, model in MODELS.items()
    }


def main() -> int:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, text in render().items():
        (SCHEMA_DIR / name).write_text(text)
        print(f"wrote {SCHEMA_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
