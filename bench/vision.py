"""FaViT vs timm peers on one GPU: inference and training throughput, parameters and GMACs.

FaViT: "Factorization Vision Transformer: Modeling Long Range Dependency with Local Window
Cost", arXiv 2312.08614. Peers in the same process and run: timm's Swin-T, PVTv2-B0, PVTv2-B2,
ConvNeXt-T, and the official FaViT implementation when its model file is given (``--official
PATH/favit.py`` from github q2479036243/FaViT, ``classification/favit.py``).

Measured per model (bf16 autocast, channels-last, random data, 224 px by default):
- inference img/s at batch 256 (``torch.inference_mode``);
- training img/s at batch 128 (forward, cross-entropy, backward, AdamW step; the fused
  single-kernel AdamW on CUDA, ``torch.optim.AdamW(fused=True)``, for every model);
- parameters (M) and GMACs per image (``torch.utils.flop_counter``: matmuls, convolutions,
  attention; MAC = FLOP / 2);
- optionally the same in other execution modes, each for the models it names:
  ``--compile`` (``torch.compile`` of the whole model), ``--compile-blocks`` (each repeated
  block compiled, ``zoo.vision.compile.compile_blocks``) and ``--cuda-graph`` (inference and
  the whole training step, AdamW included, captured once in a CUDA graph and replayed: no
  kernel-launch cost, the GPU time alone).
With ``--official``, the official FaViT-B2 is loaded with the same random weights as ours
and the relative error of the logits (fp32) is recorded.

Writes ``OUT/vision.json`` (``--name``; device, versions, date, settings, every row, ratios to Swin-T)
after every model, so a run cut short keeps what it measured, and prints a table.

    python bench/vision.py --out bench/results                          # eager, ~3 min on one H100
    python bench/vision.py --official /path/to/FaViT/classification/favit.py --out $OUT
    python bench/vision.py --name vision_compiled --models favit_b2 swin_tiny_patch4_window7_224 \
        --compile favit_b2 swin_tiny_patch4_window7_224 --profile --out $OUT   # compiled, ~5-7 min
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zoo.timing import capture_graph  # noqa: E402

OURS = ["favit_b0", "favit_b1", "favit_b2", "favit_b3"]
PEERS = ["swin_tiny_patch4_window7_224", "pvt_v2_b0", "pvt_v2_b2", "convnext_tiny"]
REFERENCE_PEER = "swin_tiny_patch4_window7_224"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for vision.json")
    p.add_argument("--models", nargs="+", default=OURS + PEERS, help="zoo or timm model names")
    p.add_argument("--official", default="", help="official FaViT model file (favit.py) to compare with")
    p.add_argument("--official-variants", nargs="+", default=["favit_b2"], help="official variants to time")
    p.add_argument("--official-checkpoint", default="", help="official weights for the equivalence check")
    p.add_argument("--compile", nargs="*", default=[], help="models also timed with torch.compile")
    p.add_argument("--compile-blocks", nargs="*", default=[], help="models also timed block-compiled")
    p.add_argument("--cuda-graph", nargs="*", default=[], help="models also timed as CUDA graphs")
    p.add_argument("--name", default="vision", help="results file name: OUT/NAME.json")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations")
    p.add_argument("--iters", type=int, default=15, help="timed iterations")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument(
        "--time-limit", type=float, default=6.0, help="minutes; compiled runs do not start after it"
    )
    p.add_argument(
        "--profile", nargs="*", default=["favit_b2"], help="models whose inference kernels are profiled"
    )
    p.add_argument("--profile-train", action="store_true", help="profile their training steps too")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call (mean of ``iters`` after ``warmup``)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def count_gmacs(model: torch.nn.Module, img_size: int, device: torch.device) -> Optional[float]:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        x = torch.randn(1, 3, img_size, img_size, device=device)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x)
        return counter.get_total_flops() / 2 / 1e9
    except Exception as err:  # a model the counter cannot trace still gets timed
        warnings.warn(f"GMACs not counted: {err}", stacklevel=1)
        return None


def load_official_module(path: str):
    """Import the official favit.py without letting it register its models with timm."""
    import timm.models._registry as registry
    import timm.models.registry as legacy_registry

    saved = (registry.register_model, legacy_registry.register_model)
    registry.register_model = legacy_registry.register_model = lambda fn: fn
    try:
        spec = importlib.util.spec_from_file_location("favit_official", path)
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.loader.exec_module(module)
    finally:
        registry.register_model, legacy_registry.register_model = saved
    return module


def build(name: str, official_module=None) -> torch.nn.Module:
    import timm

    import zoo

    if name.startswith("official:"):
        return getattr(official_module, name.split(":", 1)[1])()
    if name in zoo.list_models():
        return zoo.create(name)
    return timm.create_model(name)


MODES = ("eager", "compiled", "blocks", "graph")


def make_optimizer(
    model: torch.nn.Module, device: torch.device, capturable: bool = False
) -> torch.optim.Optimizer:
    """The benchmark's AdamW, the same for every model: fused (one kernel for all tensors) on CUDA."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        model.parameters(), lr=1e-5, weight_decay=0.05, fused=fused, capturable=capturable
    )


def measure(
    name: str,
    model: torch.nn.Module,
    args: argparse.Namespace,
    device: torch.device,
    mode: str = "eager",
) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "graph" and device.type != "cuda":
        raise ValueError(f"mode: 'graph' needs a CUDA device, got {device}")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model = model.to(device).to(memory_format=memory_format)
    row: dict[str, Any] = dict(model=name, mode=mode, compiled=mode in ("compiled", "blocks"))
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    if mode == "eager":
        model.eval()
        row["gmacs"] = count_gmacs(model, args.img_size, device)
        row["gmacs"] = None if row["gmacs"] is None else round(row["gmacs"], 3)
    # autocast's weight-cast cache cannot live across CUDA graph replays
    autocast = torch.autocast(
        device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=mode != "graph"
    )
    run_model = model
    if mode == "compiled":
        run_model = torch.compile(model)
    elif mode == "blocks":
        from zoo.vision.compile import compile_blocks

        compile_blocks(model)

    # inference
    x = torch.randn(args.infer_batch, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    model.eval()
    start = time.perf_counter()

    def infer() -> None:
        with torch.inference_mode(), autocast:
            run_model(x)

    infer_call = infer
    if mode == "graph":

        def infer_no_grad() -> None:
            with torch.no_grad(), autocast:
                run_model(x)

        infer_call = capture_graph(infer_no_grad, device)
    else:
        infer()  # compiles here when compiled
    sync(device)
    row["infer_first_call_s"] = round(time.perf_counter() - start, 2)
    seconds = timed(infer_call, args.warmup, args.iters, device)
    row["infer_img_s"] = round(args.infer_batch / seconds, 1)

    # training
    model.train()
    if mode == "compiled":
        torch._dynamo.reset()
        run_model = torch.compile(model)
    opt = make_optimizer(model, device, capturable=mode == "graph")
    x = torch.randn(args.train_batch, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    target = torch.randint(0, 1000, (args.train_batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with autocast:
            loss = loss_fn(run_model(x), target)
        opt.zero_grad(set_to_none=mode != "graph")
        loss.backward()
        opt.step()

    start = time.perf_counter()
    step_call = step
    if mode == "graph":  # the graph's memory pool is allocated while capturing: count it
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_call = capture_graph(step, device)
    step_call()
    sync(device)
    row["train_first_call_s"] = round(time.perf_counter() - start, 2)
    if device.type == "cuda" and mode != "graph":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step_call, args.warmup, args.iters, device)
    row["train_img_s"] = round(args.train_batch / seconds, 1)
    if device.type == "cuda":
        row["train_peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def profile_model(
    name: str, model: torch.nn.Module, args: argparse.Namespace, device: torch.device, train: bool = False
) -> str:
    """The top kernels and the top operators (by device time) of a few eager batches, as tables."""
    from torch.profiler import ProfilerActivity, profile

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model = model.to(device).to(memory_format=memory_format).train(train)
    batch = args.train_batch if train else args.infer_batch
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    target = torch.randint(0, 1000, (batch,), device=device)
    opt = make_optimizer(model, device) if train else None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run() -> None:
        if opt is None:
            with torch.inference_mode(), autocast:
                model(x)
            return
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(3):
        run()
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(3):
            run()
        sync(device)
    events = prof.key_averages()
    what = f"{name}: 3 {'training steps' if train else 'inference batches'} of {batch}"
    if device.type != "cuda":
        return what + "\n" + events.table(sort_by="self_cpu_time_total", row_limit=30)
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA") if events else 0
    return (
        f"{what}; {kernels / 3:.0f} kernels per call\n"
        + events.table(sort_by="self_cuda_time_total", row_limit=30)
        + "\noperators by total device time\n"
        + events.table(sort_by="cuda_time_total", row_limit=40)
    )


def equivalence(official_module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Relative error of our FaViT-B2 vs the official one, same weights, fp32 (and bf16 autocast)."""
    from zoo import checkpoints
    from zoo.vision import favit

    official = official_module.favit_b2().to(device).eval()
    if args.official_checkpoint:
        state = checkpoints.load(args.official_checkpoint)
        official.load_state_dict(state, strict=True)
    ours = favit.favit_b2().to(device).eval()
    report = checkpoints.load_into(
        ours, official.state_dict(), filter_fn=favit.checkpoint_filter_fn, strict=True
    )
    out: dict[str, Any] = dict(
        model="favit_b2", weights=args.official_checkpoint or "random", load=str(report)
    )
    for size in (224, 160):
        x = torch.randn(8, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
        with torch.inference_mode():
            prev_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            a, b = official(x), ours(x)
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_tf32
            out[f"rel_err_fp32_{size}"] = float((a - b).norm() / a.norm())
            with torch.autocast(device.type, dtype=torch.bfloat16):
                a16, b16 = official(x).float(), ours(x).float()
            out[f"rel_err_bf16_{size}"] = float((a16 - b16).norm() / a16.norm())
            out[f"top1_agree_bf16_{size}"] = float((a16.argmax(-1) == b16.argmax(-1)).float().mean())
    return out


def environment(device: torch.device) -> dict[str, Any]:
    import timm

    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        timm=timm.__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        ref = next((r for r in rows if r["model"] == REFERENCE_PEER and r.get("mode") == mode), None)
        if ref is None or "infer_img_s" not in ref:
            continue
        for r in rows:
            if r.get("mode") != mode or "infer_img_s" not in r:
                continue
            key = r["model"] + ("" if mode == "eager" else f" ({mode})")
            out[key] = dict(
                infer_vs_swin_t=round(r["infer_img_s"] / ref["infer_img_s"], 3),
                train_vs_swin_t=round(r["train_img_s"] / ref["train_img_s"], 3),
            )
    official = next((r for r in rows if r["model"] == "official:favit_b2" and r.get("mode") == "eager"), None)
    ours = next((r for r in rows if r["model"] == "favit_b2" and r.get("mode") == "eager"), None)
    if official and ours and "infer_img_s" in official and "infer_img_s" in ours:
        out["favit_b2 vs official"] = dict(
            infer=round(ours["infer_img_s"] / official["infer_img_s"], 2),
            train=round(ours["train_img_s"] / official["train_img_s"], 2),
        )
    return out


def print_table(rows: list[dict[str, Any]], env: dict[str, Any]) -> None:
    print(f"\n{env['device']}  torch {env['torch']}  timm {env['timm']}  ({env['date']})")
    head = f"{'model':<34}{'params M':>9}{'GMACs':>8}{'infer img/s':>13}{'train img/s':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        name = r["model"] + ("" if r.get("mode", "eager") == "eager" else f" [{r['mode']}]")
        if "error" in r:
            print(f"{name:<34}  error: {r['error'][:80]}")
            continue
        gmacs = f"{r['gmacs']:.2f}" if r.get("gmacs") is not None else "-"
        print(f"{name:<34}{r['params_m']:>9.2f}{gmacs:>8}{r['infer_img_s']:>13.0f}{r['train_img_s']:>13.0f}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    result: dict[str, Any] = dict(
        env,
        command="python bench/vision.py " + " ".join(sys.argv[1:] if argv is None else argv),
        settings=dict(
            img_size=args.img_size,
            infer_batch=args.infer_batch,
            train_batch=args.train_batch,
            dtype=args.dtype,
            channels_last=not args.no_channels_last,
            warmup=args.warmup,
            iters=args.iters,
            optimizer="AdamW(fused=True)" if device.type == "cuda" else "AdamW(foreach)",
        ),
        rows=[],
    )
    official_module = load_official_module(args.official) if args.official else None
    plan = [(m, "eager") for m in args.models]
    if official_module is not None:
        plan += [(f"official:{v}", "eager") for v in args.official_variants]
    plan += [(m, "graph") for m in (args.cuda_graph or [])]
    plan += [(m, "blocks") for m in (args.compile_blocks or [])]
    plan += [(m, "compiled") for m in (args.compile or [])]

    def save() -> None:
        result["ratios"] = ratios(result["rows"])
        (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))

    if official_module is not None:
        try:
            result["equivalence"] = equivalence(official_module, args, device)
        except Exception as err:
            result["equivalence"] = dict(error=f"{type(err).__name__}: {err}")
        print("equivalence:", result["equivalence"])
        save()

    def run_profiles() -> None:
        for name in args.profile or []:
            for train in (False, True) if args.profile_train else (False,):
                try:
                    table = profile_model(name, build(name, official_module), args, device, train)
                    suffix = "_train" if train else ""
                    (out_dir / f"vision_profile_{name.replace(':', '_')}{suffix}.txt").write_text(table)
                    print(table)
                except Exception as err:
                    print(f"profile of {name} failed: {err}")

    profiled = False
    for name, mode in plan:
        compiled = mode in ("compiled", "blocks")
        if mode != "eager" and not profiled:  # eager profiles before the other modes
            run_profiles()
            profiled = True
        if compiled and time.perf_counter() - started > args.time_limit * 60:
            result["rows"].append(dict(model=name, mode=mode, compiled=True, error="skipped: time limit"))
            continue
        torch.manual_seed(0)
        try:
            model = build(name, official_module)
            row = measure(name, model, args, device, mode)
        except Exception as err:
            row = dict(model=name, mode=mode, compiled=compiled, error=f"{type(err).__name__}: {err}")
        finally:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if compiled:
                torch._dynamo.reset()
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
    if not profiled:
        run_profiles()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    save()
    print_table(result["rows"], env)
    print(json.dumps(result.get("ratios", {}), indent=1))
    print(f"wrote {out_dir / (args.name + '.json')} in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
