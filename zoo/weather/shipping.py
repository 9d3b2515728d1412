"""Ship trained OSSE weights: copy a training run's checkpoints into ``zoo/weights`` with a manifest.

``python -m zoo.weather.shipping RUN_DIR`` takes ``forecaster.safetensors`` / ``adas.safetensors``
with their ``.json`` sidecars (written by ``zoo train weather``) and ``results.json`` (metrics of
``zoo eval weather``), and writes ``zoo/weights/<arch>.osse.safetensors`` plus
``<arch>.osse.json`` (sha256, dataset, metrics, layout, normalisation, command). Importing
``zoo.weather`` registers every such manifest as the pretrained tag ``<arch>.osse``, so
``zoo.weather.assimilate(background, observations)`` finds its default model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from zoo.registry import sha256_of, weights_dir

__all__ = ["ship"]

DATASET = "zoo shallow-water OSSE nature run (64x128, 6-hourly; 2001-2003 train, 2004 held out)"


def _metrics(results: dict, name: str) -> dict[str, float]:
    ev = results.get("eval", results)
    out: dict[str, float] = {}
    if name == "adas":
        for frac, entry in ev.get("by_fraction", {}).items():
            for var, ratio in entry.get("adas_over_background", {}).items():
                out[f"rmse_ratio_{var}@{float(frac) * 100:g}%"] = round(float(ratio), 4)
        cycling = ev.get("cycling", {})
        adas_cycle = cycling.get("adas", {})
        for var, rmse in adas_cycle.get("rmse_last_30_days", {}).items():
            out[f"cycle_rmse_last_30_days_{var}"] = round(float(rmse), 4)
        if "cycles" in cycling:
            out["cycles"] = int(cycling["cycles"])
            out["cycle_diverged"] = bool(adas_cycle.get("diverged"))
    else:
        metrics = results.get("forecaster", {}).get("metrics", {})
        for lead in ("rmse_6h", "rmse_20_steps"):
            out.update({f"{lead}_{k}": round(float(v), 4) for k, v in metrics.get(lead, {}).items()})
    return out


def ship(
    run_dir: str | Path,
    tag: str = "osse",
    command: str = "zoo train weather all",
    target_dir: str | Path | None = None,
) -> list[Path]:
    """Copy the run's checkpoints into ``target_dir`` (default ``zoo/weights``) with manifests; returns the weight files."""
    run_dir = Path(run_dir)
    shipped_dir = Path(target_dir) if target_dir is not None else weights_dir()
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    written = []
    for name in ("forecaster", "adas"):
        ckpt = run_dir / f"{name}.safetensors"
        if not ckpt.is_file():
            continue
        meta = json.loads(ckpt.with_suffix(".json").read_text())
        arch = meta["arch"]
        target = shipped_dir / f"{arch}.{tag}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ckpt, target)
        manifest = {
            "arch": arch,
            "tag": tag,
            "file": target.name if shipped_dir == weights_dir() else str(target.resolve()),
            "sha256": sha256_of(target),
            "dataset": DATASET,
            "metrics": _metrics(results, name),
            "config": meta.get("config", {}),
            "command": command,
            "extra": {k: meta[k] for k in ("layout", "normalisation", "history") if k in meta},
        }
        target.with_suffix(".json").write_text(json.dumps(manifest, indent=1))
        written.append(target)
    return written


if __name__ == "__main__":
    for path in ship(sys.argv[1]):
        print(f"shipped {path}")
