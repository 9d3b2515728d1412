"""``zoo train text``, ``zoo train text-vocab``, ``zoo eval text``, ``zoo bench ponet`` and the text demo.

PoNet (arXiv 2110.02442) on Long Range Arena style tasks built offline. Only argparse is
imported here; the handlers import torch and the model code when they run.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _train_text(args: argparse.Namespace) -> int:
    from zoo.text.train import TrainConfig, parse_options, train_many

    mixers = [m.strip() for m in args.mixer.split(",") if m.strip()]
    cfg = TrainConfig(
        task=args.task,
        model=args.model or "",
        mixer=mixers[0],
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        eval_every=args.eval_every,
        weight_decay=args.weight_decay,
        eval_batches=args.eval_batches,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        num_workers=args.workers,
        max_minutes=args.max_minutes,
        resume=args.resume,
        tag=args.tag,
        command=_command_line(args),
        task_options=parse_options(args.task_option),
        model_options=parse_options(args.model_option),
    )
    train_many(cfg, mixers)
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """``zoo train text ...`` with the options that were given (recorded in results and tags)."""
    words = ["zoo", "train", "text"]
    for key, value in vars(args).items():
        if key in ("func", "command", "subcommand", "quiet") or value in (None, False, []):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _train_vocab(args: argparse.Namespace) -> int:
    from zoo.text.tokenizer import build_wordpiece_vocab

    max_bytes = None if args.max_mb is None else int(args.max_mb * 2**20)
    path = build_wordpiece_vocab(args.out, vocab_size=args.vocab_size, max_bytes=max_bytes)
    print(path)
    return 0


def _eval_text(args: argparse.Namespace) -> int:
    from zoo.text.eval import evaluate_model
    from zoo.text.train import parse_options

    result = evaluate_model(
        args.model,
        task=args.task,
        split=args.split,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        device=args.device,
        limit=args.limit,
        amp=not args.no_amp,
        task_options=parse_options(args.task_option),
        model_options=parse_options(args.model_option),
        out=args.out,
    )
    print(
        f"{result['model']} on {result['task']['task']}/{result['split']}: "
        f"accuracy {100 * result['acc']:.2f}% over {result['examples']} examples (loss {result['loss']:.4f})"
    )
    return 0


def _bench_ponet(args: argparse.Namespace) -> int:
    from zoo.cli import run_bench_script

    return run_bench_script("ponet", args.bench_args)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument(
        "--task-option",
        nargs="*",
        metavar="KEY=VALUE",
        help="task options, e.g. num_train=1000 closing_brackets=true",
    )
    p.add_argument(
        "--model-option",
        nargs="*",
        metavar="KEY=VALUE",
        help="model config overrides, e.g. num_hidden_layers=4",
    )


def register(top: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    tasks = ("listops", "image", "text", "retrieval", "pathfinder")
    p = groups["train"].add_parser(
        "text",
        help="PoNet / SDPA / FNet encoders on LRA-style tasks built offline (results JSON, resumable)",
        description="Train on an LRA-style task (zoo.text.lra); several --mixer values run one after another "
        "with the same recipe (equal budget) and a summary table.",
    )
    p.add_argument("--task", choices=tasks, default="listops")
    p.add_argument("--model", help="registered model (default: the task's ponet_lra_* model)")
    p.add_argument("--mixer", default="ponet", help="ponet, sdpa, fnet or a comma-separated list")
    p.add_argument("--out", default="runs/text", help="output folder (checkpoints, results.json)")
    p.add_argument("--steps", type=int, help="training steps (task preset otherwise)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, help="linear warm-up steps")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default: all)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    p.add_argument("--max-minutes", type=float, help="stop each run after this many minutes (recorded)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<task>_<mixer>/checkpoint.pt")
    p.add_argument("--tag", help="also write <arch>.<TAG>.safetensors and a text_tags.json entry")
    _common(p)
    p.set_defaults(func=_train_text)

    p = groups["train"].add_parser(
        "text-vocab",
        help="build the offline WordPiece vocabulary (KJV + GCIDE) for the PoNet tokenizer",
        description="Train a BERT-uncased-style WordPiece vocabulary from offline text into $ZOO_CACHE.",
    )
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--max-mb", type=float, help="use at most this many MB of text")
    p.add_argument("--out", help="vocab.txt path or folder (default: $ZOO_CACHE/text/wordpiece-uncased-SIZE)")
    p.set_defaults(func=_train_vocab)

    p = groups["eval"].add_parser(
        "text",
        help="accuracy of a text model on an LRA-style task split",
        description="Evaluate a registered text model (shipped tag, --checkpoint, or random init) on a task split.",
    )
    p.add_argument("--model", required=True, help="arch or arch.tag, e.g. ponet_lra_listops")
    p.add_argument("--task", choices=tasks, help="default: the task the model was made for")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--checkpoint", help="weights file (e.g. best.safetensors from zoo train text)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--out", help="write the result as JSON here")
    _common(p)
    p.set_defaults(func=_eval_text)

    p = groups["bench"].add_parser(
        "ponet",
        help="PoNet layer vs SDPA and FNet layers, and the mixing step vs upstream's (bench/ponet.py)",
        description="Runs bench/ponet.py; arguments after `--` go to it (see its --help).",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of bench/ponet.py")
    p.set_defaults(func=_bench_ponet)


def demo(args: argparse.Namespace) -> None:
    """PoNet on a sentence pair: tokenizer, segments, the mixer's fast vs plain path, a tiny pretraining model."""
    import tempfile

    import torch

    import zoo
    from zoo.layers.ponet import segment_ids_from_separators
    from zoo.text.tokenizer import build_wordpiece_vocab, encode, load_tokenizer

    first, second = "Pooling replaces attention.", "Each token sees its segment and its neighbours."
    with tempfile.TemporaryDirectory() as tmp:
        vocab = build_wordpiece_vocab(tmp, vocab_size=160, texts=[first, second] * 4, min_frequency=1)
        tokenizer = load_tokenizer(vocab)
        batch = encode(tokenizer, [first], [second])
    ids = batch["input_ids"]
    pieces = [tokenizer.id_to_token(int(t)) for t in ids[0]]
    segments = segment_ids_from_separators((ids == 101) | (ids == 102))[0].tolist()
    print("tokens:  ", " ".join(pieces))
    print("segments:", " ".join(map(str, segments)))

    torch.manual_seed(0)
    model = zoo.create(
        "ponet_base_uncased",
        vocab_size=160,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    ).eval()
    mixer = model.ponet.encoder.layer[0].attention.self
    x = torch.randn(1, ids.shape[1], 64)
    special = (ids == 101) | (ids == 102)
    seg = segment_ids_from_separators(special)
    fast = mixer(x, batch["attention_mask"].bool(), seg, special_mask=special)
    mixer.fused = False
    plain = mixer(x, batch["attention_mask"].bool(), seg, special_mask=special)
    mixer.fused = True
    print(f"PoNetMixer fast path vs plain reference: max |diff| = {(fast - plain).abs().max():.2e}")
    with torch.no_grad():
        out = model(**batch)
    top = out.prediction_logits[0].argmax(-1)
    print(
        f"ponet_base_uncased (2 x 64, random weights): MLM logits {tuple(out.prediction_logits.shape)}, "
        f"sentence-structure logits {tuple(out.seq_relationship_logits.shape)}; first predicted pieces: "
        + " ".join(tokenizer.id_to_token(int(t)) for t in top[:6])
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m zoo.text.commands train text ...``: the text commands alone (same syntax as ``zoo``),
    without importing the other families' command modules."""
    from zoo.cli import GROUPS, _Parser
    from zoo.progress import set_quiet

    parser = _Parser(prog="python -m zoo.text.commands")
    parser.add_argument("-q", "--quiet", action="store_true")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups = {
        g: top.add_parser(g, help=text).add_subparsers(dest="subcommand", parser_class=_Parser)
        for g, text in GROUPS.items()
    }
    register(top, groups)
    args = parser.parse_args(argv)
    if args.quiet:
        set_quiet(True)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"{parser.prog}: error: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
