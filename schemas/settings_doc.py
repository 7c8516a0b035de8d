"""The settings tables of docs/DEPLOY.md, generated from schemas/config.py (`python -m schemas.settings_doc`)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, SecretStr

from imgstream.schemas.config import DAY_MS, ENV_PREFIX, WorkerConfig

DEPLOY_DOC = Path(__file__).resolve().parent.parent / "docs" / "DEPLOY.md"
START = "<!-- settings:start (generated from schemas/config.py by `python -m schemas.settings_doc`) -->"
END = "<!-- settings:end -->"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Setting:
    """One leaf of the configuration: where it lives, its variable, default and description."""

    path: tuple[str, ...]
    default: Any
    description: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + "__".join(part.upper() for part in self.path)


def settings(config: BaseModel | None = None) -> list[Setting]:
    """Every leaf setting of `config` (default: the defaults of `WorkerConfig`), in declaration order."""
    return list(_walk(config if config is not None else WorkerConfig(), ()))


def _walk(model: BaseModel, path: tuple[str, ...]) -> Iterator[Setting]:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        here = (*path, name)
        if isinstance(value, BaseModel):
            yield from _walk(value, here)
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            for key, item in value.items():  # e.g. models.batching.<model>
                yield from _walk(item, (*here, key))
        else:
            yield Setting(here, value, " ".join((field.description or "").split()))


def _format_default(setting: Setting) -> str:
    value, name = setting.default, setting.path[-1]
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else "empty"
    text = f"`{json.dumps(value)}`"
    if isinstance(value, int) and name.endswith("_bytes") and value >= MIB and value % MIB == 0:
        text += f" ({value // MIB} MiB)"
    elif isinstance(value, int) and name.endswith("_ms") and value >= DAY_MS and value % DAY_MS == 0:
        text += f" ({value // DAY_MS} days)"
    return text


def render_tables(config: BaseModel | None = None) -> str:
    """Markdown: one table per section (`kafka`, `fetch`, ...; `worker` for the top-level settings)."""
    sections: dict[str, list[Setting]] = {}
    for setting in settings(config):
        sections.setdefault(setting.path[0] if len(setting.path) > 1 else "worker", []).append(setting)
    out = []
    for section, rows in sections.items():
        out += [f"#### `{section}`", "", "| variable | default | what it is; when to change it |", "|---|---|---|"]
        out += [f"| `{s.env}` | {_format_default(s)} | {s.description.replace('|', '/')} |" for s in rows]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def with_tables(text: str) -> str:
    """`text` (DEPLOY.md) with the part between the START and END markers regenerated."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the settings markers are missing: {START!r} ... {END!r}")
    return f"{head}{START}\n\n{render_tables()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    path = Path(argv[0]) if argv else DEPLOY_DOC
    path.write_text(with_tables(path.read_text()))
    print(f"wrote the settings tables of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
