"""Argument helpers shared by the CLI's modules."""

from __future__ import annotations

from pathlib import Path


def csv_list(value: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'); 'none' or '' -> ()."""
    if value.strip().lower() in ("", "none"):
        return ()
    return tuple(v.strip() for v in value.split(",") if v.strip())


def resolve_model(value: str) -> tuple[str, str]:
    """(folder, label): an existing folder is used as is, a known name is built if needed."""
    path = Path(value)
    if path.is_dir():
        return str(path), path.name
    from alignedserve.model_zoo.model_builder import MODEL_NAMES, ensure_model

    if value not in MODEL_NAMES:
        raise SystemExit(f"--model {value!r} is neither a folder nor one of {list(MODEL_NAMES)}")
    return str(ensure_model(value)), value
