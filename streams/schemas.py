"""JSON Schemas of every event, generated from the msgspec classes in `dtf.events`.

One file per event type, `schemas/<EventType>.json`, so a client in another language can validate what
it publishes. Each schema carries its `$id`, a title, the event's current version (`x-dtf-version`) and
the subject it is published on (`x-dtf-subject`). The output is deterministic (sorted keys, indent 2,
trailing newline): the committed files are compared with a fresh export by tests/test_schemas.py.

Regenerate after changing an event class:  python -m dtf.streams.schemas
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from dtf import events as ev
from dtf import subjects

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "https://dtf.invalid/schemas/events/"
"""Schema ids are names, not addresses: nothing is served there."""
DEFAULT_DIR = Path(__file__).parent / "schemas"
REQUIRED_ON_THE_WIRE = ("type", "id", "time")
"""`decode` refuses an event without these although the Python constructors fill them in."""


def subject_template(cls: type[ev.Event]) -> str:
    """The subject an event of this type is published on, with its id fields as `{placeholders}`."""
    if cls is ev.WorkerHeartbeat:
        return subjects.heartbeat("{worker_id}")
    if cls in subjects.WORKER_KINDS:
        return subjects.worker("{worker_id}", subjects.WORKER_KINDS[cls])
    if cls is ev.TaskSubmitted:
        party = "{submitter}"
    elif cls is ev.TaskCancelled:
        party = "{by|coordinator}"
    elif issubclass(cls, ev.AttemptEvent):
        party = "{worker_id}"
    elif issubclass(cls, ev.Detection):
        party = subjects.DETECTOR
    else:
        party = subjects.COORDINATOR
    return subjects.task("{run_id}", "{task_id}", subjects.TASK_KINDS[cls], party)


def tidy_descriptions(node: Any) -> Any:
    """Every `description` dedented by `inspect.cleandoc`: msgspec 0.23 began to tidy docstrings itself
    and older releases did not, so the committed files must not depend on which one is installed."""
    if isinstance(node, dict):
        return {key: inspect.cleandoc(value) if key == "description" and isinstance(value, str)
                else tidy_descriptions(value) for key, value in node.items()}
    if isinstance(node, list):
        return [tidy_descriptions(item) for item in node]
    return node


def schema_for(cls: type[ev.Event]) -> dict[str, Any]:
    name = cls.__name__
    schema = tidy_descriptions(msgspec.json.schema(cls))
    definition = schema["$defs"][name]
    definition["required"] = sorted(set(definition.get("required", [])) | set(REQUIRED_ON_THE_WIRE))
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": f"{ID_BASE}{name}.json",
        "title": name,
        "x-dtf-version": ev.CURRENT_VERSION[name],
        "x-dtf-subject": subject_template(cls),
        **schema,
    }


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every event type's schema by type name (what `dtf schema` prints)."""
    return {name: schema_for(cls) for name, cls in sorted(ev.EVENT_TYPES.items())}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export(out_dir: Path | str = DEFAULT_DIR) -> list[Path]:
    """Write `<EventType>.json` for every event type into `out_dir`; return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in all_schemas().items():
        path = out / f"{name}.json"
        text = render(schema)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in export(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR):
        print(path)
