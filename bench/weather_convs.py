"""Adas's "same" 3D convolutions on a GPU: cuDNN's Conv3d against Conv2d over depth-folded channels.

For every gated-convolution shape of the two published configurations (721 x 1440, d 192 and
128 x 256, d 96; batch 1, bf16, channels-last activations as in the model) times ``conv(x)``
and ``zoo.weather.adas.conv3d_as_2d(conv, x, fold_depth=True, tiles=...)`` for each split of
the kernel's (rows, columns) into tiles in ``TILINGS`` (one Conv2d per tile), and checks they
agree. The splits that win are listed in ``zoo.weather.adas.DEPTH_FOLDED_TILES``; ``best``
per kernel is the split with the least time summed over the shapes of a size, weighted by how
often each runs per assimilation (three streams per stage, one fusion).
Writes ``--out/weather_conv_variants.json``.

    python bench/weather_convs.py --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.weather import timed  # noqa: E402
from zoo.weather import create_model  # noqa: E402
from zoo.weather.adas import conv3d_as_2d  # noqa: E402

SIZES = {"small": "adas_fengwu69_1p40625", "large": "adas_fengwu69_0p25"}
TILINGS = {
    (5, 7): [
        ((5,), (7,)),
        ((3, 2), (7,)),
        ((5,), (4, 3)),
        ((3, 2), (4, 3)),
        ((3, 2), (5, 2)),
        ((5,), (5, 2)),
    ],
    (3, 5): [((3,), (5,)), ((3,), (3, 2))],
    (3, 3): [((3,), (3,))],
}


def conv_shapes(model) -> list[tuple[str, torch.nn.Conv3d, tuple[int, int, int]]]:
    depth, height, width = model.token_grid
    half = lambda n: (n + 1) // 2  # noqa: E731  (patch merging pads odd sizes)
    grids = [
        (depth, height, width),
        (depth, half(height), half(width)),
        (depth, half(half(height)), half(half(width))),
        (depth, half(height), half(width)),
        (depth, height, width),
    ]
    shapes = [
        (f"stage{i + 1}", stage.background_conv, grid)
        for i, (stage, grid) in enumerate(zip(model.stages, grids))
    ]
    return shapes + [("fusion", model.fusion, grids[0])]


def best_tilings(rows: list[dict]) -> dict:
    """Per size and kernel (rows, columns): the fastest of Conv3d and each split, by time weighted by uses."""
    best = {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["size"], str(tuple(row["kernel"][1:]))), []).append(row)
    for (size, kernel), group in groups.items():
        totals = {"conv3d": sum(r["uses"] * r["conv3d_ms"] for r in group)}
        for key in group[0]["depth_folded_ms"]:
            totals[key] = sum(r["uses"] * r["depth_folded_ms"][key] for r in group)
        choice = min(totals, key=totals.get)
        best[f"{size} {kernel}"] = {"choice": choice, "ms": totals}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/weather_convs.py: needs a CUDA GPU")
    torch.manual_seed(0)
    rows = []
    for size in args.sizes:
        model = create_model(SIZES[size]).cuda().to(torch.bfloat16).eval()
        for name, conv, grid in conv_shapes(model):
            x = torch.randn(1, conv.in_channels, *grid, device="cuda", dtype=torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.no_grad():
                want = conv(x).float()
                row = {
                    "size": size,
                    "conv": name,
                    "in_channels": conv.in_channels,
                    "out_channels": conv.out_channels,
                    "kernel": list(conv.kernel_size),
                    "tokens": list(grid),
                    "uses": 1 if name == "fusion" else 3,
                    "conv3d_ms": timed(lambda conv=conv, x=x: conv(x), 10, 3, x.device)["median_ms"],
                    "depth_folded_ms": {},
                    "rel_diff": {},
                }
                for tiles in TILINGS[tuple(conv.kernel_size[1:])]:
                    key = f"rows {tiles[0]} cols {tiles[1]}"
                    got = conv3d_as_2d(conv, x, fold_depth=True, tiles=tiles).float()
                    row["rel_diff"][key] = float((got - want).norm() / want.norm())
                    row["depth_folded_ms"][key] = timed(
                        lambda conv=conv, x=x, tiles=tiles: conv3d_as_2d(
                            conv, x, fold_depth=True, tiles=tiles
                        ),
                        10,
                        3,
                        x.device,
                    )["median_ms"]
            rows.append(row)
            folded = " ".join(f"[{k}] {v:.3f}" for k, v in row["depth_folded_ms"].items())
            print(
                f"{size:6s} {name:8s} {str(tuple(conv.kernel_size)):10s} {conv.in_channels:4d}->{conv.out_channels:<4d}"
                f" conv3d {row['conv3d_ms']:7.3f} ms  folded {folded}",
                flush=True,
            )
        del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "rows": rows,
        "best": best_tilings(rows),
    }
    print("best", json.dumps(result["best"]))
    (out / "weather_conv_variants.json").write_text(json.dumps(result, indent=1))
    print("written", out / "weather_conv_variants.json")


if __name__ == "__main__":
    main()
