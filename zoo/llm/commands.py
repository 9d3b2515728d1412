"""``zoo`` sub-commands of the LLM family, and its part of ``zoo demo``.

    zoo train lm-data            offline text -> our BPE tokenizer + token files
    zoo train lm                 train the small Llama-style LM (resumable, wall-clock budget)
    zoo eval prefill             sparse prefill vs dense: per layer/head stats, perplexity, needle, synthetic
    zoo train minference-config  MInference's per-head pattern search -> JSON config
    zoo train xattention-thresholds  XAttention's per-head threshold profiling -> JSON config

Only argparse is imported here; the work imports live inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

METHOD_CHOICES = (
    "xattention",
    "pbs",
    "minference_vertical_slash",
    "minference_a_shape",
    "minference_block_sparse",
)


def _key_values(items: list[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_lm_data(args: argparse.Namespace) -> int:
    from zoo.llm.corpus import build_corpus

    meta = build_corpus(
        args.out,
        sources=args.sources,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        max_chars=args.max_chars,
    )
    print(json.dumps(meta, indent=1))
    return 0


def cmd_train_lm(args: argparse.Namespace) -> int:
    from zoo.llm.train import TrainConfig, train_lm

    cfg = TrainConfig(
        data=args.data,
        out=args.out,
        arch=args.arch,
        tag=args.tag,
        minutes=args.minutes,
        max_steps=args.max_steps,
        seq_len=args.seq_len,
        long_seq_len=args.long_seq_len,
        long_fraction=args.long_fraction,
        batch_tokens=args.batch_tokens,
        lr=args.lr,
        needle_prob=args.needle_prob,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        overrides=_key_values(args.set, "--set"),
        init=args.init,
    )
    summary = train_lm(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "config")}, indent=1))
    return 0


def _load_model_and_tokenizer(args: argparse.Namespace):
    import torch

    import zoo
    from zoo.llm.corpus import load_tokenizer
    from zoo.llm.model import load_pretrained_tokenizer

    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if args.checkpoint:
        if not args.tokenizer:
            raise ValueError("--tokenizer: expected the tokenizer.json that goes with --checkpoint")
        tokenizer = load_tokenizer(args.tokenizer)
        model = zoo.create(args.model, checkpoint=args.checkpoint, **_key_values(args.set, "--set"))
    else:
        tokenizer = (
            load_tokenizer(args.tokenizer) if args.tokenizer else load_pretrained_tokenizer(args.model)
        )
        model = zoo.create(args.model, pretrained=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32
    return model.to(device=device, dtype=dtype).eval(), tokenizer, device


def _text_tokens(args: argparse.Namespace, tokenizer) -> list[int]:
    from zoo.llm.corpus import encode_text, load_token_file

    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise FileNotFoundError(f"--text: no such file {path}")
        tokens = encode_text(tokenizer, path.read_text(errors="replace"))
    elif args.data:
        tokens = load_token_file(Path(args.data) / "val.bin")
    else:
        raise ValueError("--text/--data: expected a text file or the token folder of `zoo train lm-data`")
    if not 0 <= args.offset < len(tokens):
        raise ValueError(
            f"--offset: expected a position inside the {len(tokens)} tokens of the text, got {args.offset}"
        )
    return tokens[args.offset :].astype("int64").tolist()


def _methods(args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any]]]:
    from zoo.llm.harness import DEFAULT_METHODS

    methods = {name: (DEFAULT_METHODS[name][0], dict(DEFAULT_METHODS[name][1])) for name in args.methods}
    overrides = json.loads(args.method_config) if args.method_config else {}
    if not isinstance(overrides, dict):
        raise ValueError(
            f"--method-config: expected a JSON object of per-method settings, got {args.method_config!r}"
        )
    for name, cfg in overrides.items():
        if name not in methods:
            if not isinstance(cfg, dict) or "method" not in cfg:
                raise ValueError(
                    f"--method-config: {name!r} is not selected; a new entry needs a 'method' key"
                )
            cfg = dict(cfg)
            methods[name] = (cfg.pop("method"), cfg)
        else:
            methods[name][1].update(cfg)
    if args.minference_config:
        methods["minference_searched"] = ("minference", {"config_path": args.minference_config})
    if args.xattention_config:
        methods["xattention_profiled"] = ("xattention", {"config_path": args.xattention_config})
    return methods


def cmd_eval_prefill(args: argparse.Namespace) -> int:
    import torch

    from zoo.llm.harness import evaluate_lm, evaluate_synthetic, targets

    methods = _methods(args)
    result: dict[str, Any] = {
        "command": getattr(args, "command_line", ""),
        "methods_evaluated": list(methods),
    }
    if not args.synthetic_only:
        model, tokenizer, device = _load_model_and_tokenizer(args)
        tokens = _text_tokens(args, tokenizer)
        if len(tokens) < args.seq_len + 1:
            raise ValueError(
                f"--seq-len: the text has {len(tokens)} tokens, expected more than {args.seq_len}"
            )
        input_ids = torch.tensor([tokens[: args.seq_len]], device=device)
        haystack = tokens[args.seq_len : args.seq_len + args.needle_length] if args.needle_trials else None
        if haystack is not None and len(haystack) < args.needle_length:
            haystack = tokens[: args.needle_length]
        numbers = [10007 + 7919 * i for i in range(max(args.needle_trials, 0))]
        lm = evaluate_lm(
            model,
            input_ids,
            methods,
            tokenizer=tokenizer if args.needle_trials else None,
            needle_haystack=haystack,
            needle_length=args.needle_length,
            needle_depths=args.needle_depths,
            needle_numbers=numbers,
            continuation=args.continuation_tokens,
        )
        lm["model"] = args.checkpoint or args.model
        lm["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        lm["dtype"] = args.dtype if device.type == "cuda" else "fp32"
        lm["targets"] = targets(lm)
        result["lm"] = lm
    if not args.no_synthetic:
        device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        result["synthetic"] = evaluate_synthetic(methods, n=args.synthetic_len, device=device)
    _print_prefill_table(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prefill_eval.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {out / 'prefill_eval.json'}")
    return 0


def _print_prefill_table(result: dict[str, Any]) -> None:
    if "lm" in result:
        lm = result["lm"]
        dense = lm["dense"]
        needle = dense.get("needle", {}).get("accuracy")
        print(
            f"{lm['model']}  {lm['tokens']} tokens  dense ppl {dense['ppl']:.3f}"
            + (f"  needle {needle:.2f}" if needle is not None else "")
        )
        print(
            f"{'method':<28}{'density':>9}{'coverage':>10}{'relL1':>8}{'cosine':>8}{'ppl':>9}{'ratio':>8}"
            f"{'cont.':>8}{'needle':>8}"
        )
        for name, row in lm["methods"].items():
            nd = row.get("needle", {}).get("accuracy")
            print(
                f"{name:<28}{row.get('mean_density', float('nan')):>9.3f}{row.get('mean_coverage', float('nan')):>10.3f}"
                f"{row.get('mean_rel_l1', float('nan')):>8.3f}{row.get('mean_cosine', float('nan')):>8.3f}"
                f"{row['ppl']:>9.3f}{row['ppl_ratio']:>8.4f}{row.get('continuation_ppl_ratio', float('nan')):>8.4f}"
                f"{'' if nd is None else f'{nd:>8.2f}'}"
            )
    if "synthetic" in result:
        syn = result["synthetic"]
        print(f"synthetic planted attention, N={syn['n']}, H={syn['heads']}, Hkv={syn['kv_heads']}")
        print(f"{'method':<28}{'density':>9}{'coverage':>10}{'relL1':>8}{'recall':>8}")
        for name, row in syn["methods"].items():
            print(
                f"{name:<28}{row['density']:>9.3f}{row['coverage']:>10.3f}{row['rel_l1']:>8.3f}{row['planted_recall']:>8.3f}"
            )


def cmd_minference_config(args: argparse.Namespace) -> int:
    import torch

    from zoo.llm.pattern_search import save_pattern_config, search_model_patterns

    model, tokenizer, device = _load_model_and_tokenizer(args)
    tokens = _text_tokens(args, tokenizer)
    if len(tokens) < args.seq_len:
        raise ValueError(f"--seq-len: the text has {len(tokens)} tokens, expected at least {args.seq_len}")
    input_ids = torch.tensor([tokens[: args.seq_len]], device=device)
    config = search_model_patterns(
        model,
        input_ids,
        budget=args.budget,
        block_size=args.block_size,
        model_name=args.checkpoint or args.model,
    )
    path = save_pattern_config(config, args.out)
    print(f"wrote {path}")
    return 0


def _calibration_sequences(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    """``--samples`` windows of ``--seq-len`` tokens spread over the training split (or ``--text``)."""
    from zoo.llm.corpus import load_token_file

    if args.text or not args.data:
        tokens = _text_tokens(args, tokenizer)
    else:
        path = Path(args.data) / "train.bin"
        if not path.is_file():
            raise FileNotFoundError(f"--data: no train.bin in {args.data} (the calibration text)")
        tokens = load_token_file(path)[args.offset :].astype("int64").tolist()
    span = len(tokens) - args.seq_len
    if span < 0:
        raise ValueError(f"--seq-len: the text has {len(tokens)} tokens, expected at least {args.seq_len}")
    starts = [round(span * i / max(args.samples - 1, 1)) for i in range(args.samples)]
    return [tokens[s : s + args.seq_len] for s in starts]


def cmd_xattention_thresholds(args: argparse.Namespace) -> int:
    import torch

    from zoo.llm.threshold_profile import profile_model_thresholds, save_threshold_config

    if args.samples < 1:
        raise ValueError(f"--samples: expected at least 1, got {args.samples}")
    model, tokenizer, device = _load_model_and_tokenizer(args)
    sequences = [torch.tensor([seq], device=device) for seq in _calibration_sequences(args, tokenizer)]
    config = profile_model_thresholds(
        model,
        sequences,
        block_size=args.block_size,
        stride=args.stride,
        coverage=args.coverage,
        model_name=args.checkpoint or args.model,
    )
    path = save_threshold_config(config, args.out)
    table = torch.tensor(config["thresholds"])
    print(
        f"wrote {path}: {config['num_layers']} layers x {config['num_heads']} heads, thresholds mean "
        f"{table.mean():.3f} (min {table.min():.3f}, max {table.max():.3f})"
    )
    return 0


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="zoo_llama_9m.kjv_gcide", help="registered arch or arch.tag (default: %(default)s)"
    )
    p.add_argument(
        "--checkpoint", help="local weights instead of the shipped ones (with --model ARCH and --tokenizer)"
    )
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one shipped with --model)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="architecture overrides for --checkpoint")
    p.add_argument("--data", help="token folder of `zoo train lm-data` (its val.bin is the text)")
    p.add_argument("--text", help="a UTF-8 text file instead of --data")
    p.add_argument(
        "--seq-len", type=int, default=8192, help="tokens per evaluated sequence (default: %(default)s)"
    )
    p.add_argument(
        "--offset", type=int, default=0, help="first token of the text to use (default: %(default)s)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="model dtype on CUDA")


def register(top: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    train, evaluate = groups["train"], groups["eval"]

    p = train.add_parser("lm-data", help="offline text -> byte-level BPE tokenizer + uint16 token files")
    p.add_argument(
        "--out", required=True, help="output folder (tokenizer.json, train.bin, val.bin, meta.json)"
    )
    p.add_argument("--sources", nargs="+", default=["bible", "gcide", "jargon"], help="bible gcide jargon")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--max-chars", type=int, help="truncate each source (quick runs)")
    p.set_defaults(func=cmd_lm_data)

    p = train.add_parser("lm", help="train the small Llama-style LM (resumes from OUT/checkpoint.pt)")
    p.add_argument("--data", required=True, help="token folder of `zoo train lm-data`")
    p.add_argument("--out", required=True, help="output folder: checkpoint, exported weights, metrics")
    p.add_argument("--arch", default="zoo_llama_9m")
    p.add_argument("--tag", default="kjv_gcide")
    p.add_argument(
        "--minutes", type=float, default=7.0, help="training wall-clock budget (default: %(default)s)"
    )
    p.add_argument("--max-steps", type=int, help="budget in steps instead of minutes")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--long-seq-len", type=int, default=8192)
    p.add_argument("--long-fraction", type=float, default=0.25, help="share of the budget at --long-seq-len")
    p.add_argument("--batch-tokens", type=int, default=65536)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--needle-prob", type=float, default=0.5, help="share of windows with a hidden needle")
    p.add_argument("--eval-every", type=float, default=45.0, help="seconds (steps with --max-steps)")
    p.add_argument("--checkpoint-every", type=float, default=60.0, help="seconds (steps with --max-steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--set", nargs="*", metavar="KEY=VALUE", help="architecture overrides, e.g. num_hidden_layers=4"
    )
    p.add_argument(
        "--init", help="weights to continue training from (ignored when OUT/checkpoint.pt resumes)"
    )
    p.set_defaults(func=cmd_train_lm)

    p = evaluate.add_parser(
        "prefill", help="sparse prefill vs dense: density, coverage, error, perplexity, needle"
    )
    _model_arguments(p)
    p.add_argument("--methods", nargs="+", default=list(METHOD_CHOICES), choices=METHOD_CHOICES)
    p.add_argument(
        "--method-config", help='JSON per-method settings, e.g. \'{"xattention": {"threshold": 0.95}}\''
    )
    p.add_argument("--minference-config", help="also evaluate MInference with this searched per-head config")
    p.add_argument(
        "--xattention-config", help="also evaluate XAttention with these profiled per-head thresholds"
    )
    p.add_argument(
        "--continuation-tokens",
        type=int,
        default=None,
        help="tokens scored densely after the method prefilled the rest (default: seq-len / 8)",
    )
    p.add_argument("--needle-trials", type=int, default=2, help="needle numbers (x depths); 0 disables")
    p.add_argument("--needle-length", type=int, default=8192, help="tokens per needle prompt")
    p.add_argument(
        "--needle-depths",
        type=float,
        nargs="+",
        default=[0.1, 0.3, 0.5, 0.7, 0.9],
        help="needle positions (0-1)",
    )
    p.add_argument(
        "--synthetic-len", type=int, default=4096, help="length of the synthetic planted attention"
    )
    p.add_argument("--no-synthetic", action="store_true", help="skip the synthetic patterns")
    p.add_argument("--synthetic-only", action="store_true", help="only the synthetic patterns (no model)")
    p.add_argument("--out", help="folder for prefill_eval.json")
    p.set_defaults(func=cmd_eval_prefill)

    p = train.add_parser("minference-config", help="MInference per-head pattern search -> JSON config")
    _model_arguments(p)
    p.add_argument(
        "--budget", type=float, default=0.3, help="largest density a head may use (default: %(default)s)"
    )
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(func=cmd_minference_config)

    p = train.add_parser(
        "xattention-thresholds", help="XAttention per-head threshold profiling -> JSON config"
    )
    _model_arguments(p)
    p.set_defaults(seq_len=4096)
    p.add_argument(
        "--samples", type=int, default=4, help="calibration windows from train.bin (default: %(default)s)"
    )
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument(
        "--coverage",
        type=float,
        default=0.9,
        help="share of true attention mass each row's needed blocks hold (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(func=cmd_xattention_thresholds)


def demo(args: argparse.Namespace) -> None:
    """Sparse prefill on planted synthetic attention and on the shipped small LM (a tiny random one without it)."""
    import torch

    from zoo.llm.harness import evaluate_synthetic

    torch.manual_seed(0)
    methods = {
        "xattention": ("xattention", {"block_size": 64, "stride": 8}),
        "pbs": ("pbs", {"block_size": 64, "segment_size": 128}),
        "minference_vertical_slash": (
            "minference",
            {"pattern": "vertical_slash", "vertical_size": 64, "slash_size": 128},
        ),
        "minference_a_shape": ("minference", {"pattern": "a_shape", "n_init": 64, "n_local": 256}),
        "minference_block_sparse": ("minference", {"pattern": "block_sparse", "topk": 4}),
    }
    _print_prefill_table({"synthetic": evaluate_synthetic(methods, n=1024, heads=2, kv_heads=1, dim=32)})
    if not _demo_shipped_lm():
        _demo_random_llama()


def _demo_shipped_lm() -> bool:
    """Dense vs XAttention prefill of ``zoo_llama_9m.kjv_gcide`` on 1024 KJV tokens with a hidden needle."""
    import torch

    import zoo
    from zoo.llm.harness import needle_prompts, needle_test
    from zoo.llm.model import load_pretrained_tokenizer
    from zoo.llm.patch import sparse_prefill

    name = "zoo_llama_9m.kjv_gcide"
    try:
        from zoo.datasets import kjv_text

        text = kjv_text(verse_numbers=False)
        model = zoo.create(name, pretrained=True).eval()
        tokenizer = load_pretrained_tokenizer(name)
    except (OSError, ValueError, RuntimeError) as err:  # no KJV package or no shipped weights
        print(f"({name} part skipped: {err})")
        return False
    ids = tokenizer.encode(text[-20000:]).ids[:1024]
    prompts = needle_prompts(tokenizer, ids[512:], 512, [0.2, 0.8], [48151])
    input_ids = torch.tensor([ids])
    densities: list[float] = []

    def perplexity() -> float:
        logits = model(input_ids=input_ids).logits[0, :-1]
        return float(torch.nn.functional.cross_entropy(logits.float(), input_ids[0, 1:]).exp())

    with torch.no_grad():
        dense_ppl, dense_needle = perplexity(), needle_test(model, tokenizer, prompts, "cpu")
        settings = dict(block_size=64, stride=8, threshold=0.9)
        recorder = lambda *a: densities.append(a[4].density(True))  # noqa: E731
        with sparse_prefill(model, "xattention", recorder=recorder, **settings):
            sparse_ppl = perplexity()
            sparse_needle = needle_test(model, tokenizer, prompts, "cpu")
    answers = lambda r: [t["answer"].split()[0] if t["answer"] else "" for t in r["trials"]]  # noqa: E731
    print(
        f"{name}, 1024 KJV tokens: perplexity dense {dense_ppl:.2f}, XAttention (tau 0.9, density "
        f"{sum(densities) / len(densities):.2f}) {sparse_ppl:.2f}; needle 48151 in 512 tokens answered "
        f"{answers(dense_needle)} dense, {answers(sparse_needle)} sparse"
    )
    return True


def _demo_random_llama() -> None:
    import torch

    from zoo.llm.model import build_llama
    from zoo.llm.patch import sparse_prefill

    model = build_llama(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).eval()
    ids = torch.randint(3, 512, (1, 512))
    densities = []
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with sparse_prefill(
            model,
            "xattention",
            block_size=64,
            stride=8,
            threshold=0.5,
            recorder=lambda *a: densities.append(a[4].density(True)),
        ):
            sparse = model(input_ids=ids).logits
            tokens = model.generate(ids[:, :128], max_new_tokens=4, do_sample=False)
    err = float((sparse - dense).abs().max())
    density = sum(densities) / len(densities)
    print(
        f"tiny random Llama (GQA 4/2), 512 tokens: XAttention (tau 0.5) prefill density {density:.2f}, "
        f"max |logit diff| vs dense {err:.3g}; generated {tokens[0, -4:].tolist()}"
    )
