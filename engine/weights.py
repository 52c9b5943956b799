"""Reading HF safetensors checkpoints (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / s for s in shards]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(d.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no .safetensors weights in {d}")
    return found


def load_state_dict(model_dir: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, cast to `dtype`, keyed by their HF names."""
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = sf.get_tensor(name).to(dtype)
    return out


def take(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Pop a tensor by name, with an error that names the checkpoint key."""
    try:
        return sd.pop(name)
    except KeyError:
        raise KeyError(f"checkpoint has no tensor {name!r}") from None
