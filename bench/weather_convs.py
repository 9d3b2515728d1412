"""Adas's "same" 3D convolutions on a GPU: cuDNN's Conv3d against one Conv2d over depth-folded channels.

For every gated-convolution shape of the two published configurations (721 x 1440, d 192 and
128 x 256, d 96; batch 1, bf16, channels-last activations as in the model) times
``conv(x)`` and ``zoo.weather.adas.conv3d_as_2d(conv, x, fold_depth=True)``, and checks they
agree. The kernels where folding wins are listed in ``zoo.weather.adas.DEPTH_FOLDED_KERNELS``.
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
                got = conv3d_as_2d(conv, x, fold_depth=True).float()
                row = {
                    "size": size,
                    "conv": name,
                    "in_channels": conv.in_channels,
                    "out_channels": conv.out_channels,
                    "kernel": list(conv.kernel_size),
                    "tokens": list(grid),
                    "conv3d_ms": timed(lambda conv=conv, x=x: conv(x), 10, 3, x.device)["median_ms"],
                    "depth_folded_ms": timed(
                        lambda conv=conv, x=x: conv3d_as_2d(conv, x, fold_depth=True), 10, 3, x.device
                    )["median_ms"],
                    "rel_diff": float((got - want).norm() / want.norm()),
                }
            row["speedup"] = row["conv3d_ms"] / row["depth_folded_ms"]
            rows.append(row)
            print(
                f"{size:6s} {name:8s} {str(tuple(conv.kernel_size)):10s} {conv.in_channels:4d}->{conv.out_channels:<4d}"
                f" conv3d {row['conv3d_ms']:7.3f} ms  folded {row['depth_folded_ms']:7.3f} ms  x{row['speedup']:.2f}",
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
    }
    (out / "weather_conv_variants.json").write_text(json.dumps(result, indent=1))
    print("written", out / "weather_conv_variants.json")


if __name__ == "__main__":
    main()
