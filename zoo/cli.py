"""The ``zoo`` command.

    zoo list [PATTERN] [--family F] [--pretrained]     models, families, params, shipped weights
    zoo info NAME                                      paper, config, params, tags, eval command
    zoo demo                                           a short tour of every family
    zoo eval|train|bench SUBCOMMAND ...                filled by the families
    zoo assimilate ...                                 (weather)

Each family (and the kernel and layer libraries) may ship ``<package>/commands.py`` with
``register(top, groups)`` adding argparse sub-commands whose handler is ``func(args)``, and an
optional ``demo(args)``. Those modules import only argparse at import time; the work imports
live inside the handlers, so ``zoo --help`` stays fast.

A user mistake (bad argument, unknown model, missing file) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Callable, Sequence

from zoo.progress import get_logger, set_quiet

COMMAND_MODULES = (
    "zoo.kernels.commands",
    "zoo.layers.commands",
    "zoo.layers.routing_commands",
    "zoo.vision.commands",
    "zoo.text.commands",
    "zoo.llm.commands",
    "zoo.weather.commands",
)
GROUPS = {
    "eval": "evaluate a model (accuracy, error, metrics)",
    "train": "train a model with the zoo's recipes",
    "bench": "GPU benchmarks against peers",
}


class UsageError(ValueError):
    """A mistake in how a command was called."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _command_modules() -> list:
    mods = []
    for name in COMMAND_MODULES:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            if err.name not in (name, name.rsplit(".", 1)[0]):
                raise
    return mods


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else (f"{n / 1e3:.1f}K" if n >= 1000 else str(n))


def cmd_list(args: argparse.Namespace) -> int:
    from zoo import registry

    names = registry.list_models(args.pattern, family=args.family, pretrained=args.pretrained)
    rows = []
    for name in names:
        entry, tag = registry.get_entry(name)
        info = registry.model_info(name) if args.params else None
        rows.append(
            {
                "name": name,
                "family": entry.family,
                "params": info["params"] if info else None,
                "pretrained": list(entry.tags) if tag is None else [tag],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no models match {args.pattern!r}")
        return 0
    width = max(len(r["name"]) for r in rows) + 2
    header = f"{'name':<{width}}{'family':<10}" + (f"{'params':>9}  " if args.params else "") + "pretrained"
    print(header)
    print("-" * len(header))
    for r in rows:
        params = f"{_fmt_params(r['params']):>9}  " if args.params else ""
        print(f"{r['name']:<{width}}{r['family']:<10}{params}{', '.join(r['pretrained']) or '-'}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from zoo import registry

    info = registry.model_info(args.name)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"{info['name']}  ({info['family']})")
    if info["paper"]["title"]:
        print(f"  paper:   {info['paper']['title']} (arXiv {info['paper']['arxiv']})")
    if info["description"]:
        print(f"  about:   {info['description']}")
    print(f"  params:  {_fmt_params(info['params'])}")
    print("  config:  " + ", ".join(f"{k}={v!r}" for k, v in info["config"].items()))
    for tag, p in info["pretrained"].items():
        metrics = ", ".join(f"{k} {v}" for k, v in p["metrics"].items())
        print(
            f"  weights: {info['arch']}.{tag}  dataset {p['dataset']}  {metrics}  sha256 {p['sha256'][:12]}"
        )
        if p["command"]:
            print(f"           trained by: {p['command']}")
    if info["eval"]:
        print(f"  eval:    {info['eval']}")
    return 0


def _part_name(module: str) -> str:
    """``zoo.vision.commands`` -> ``vision``; ``zoo.layers.routing_commands`` -> ``routing``."""
    parent, _, last = module.rpartition(".")
    return parent.rpartition(".")[2] if last == "commands" else last.removesuffix("_commands")


def cmd_demo(args: argparse.Namespace) -> int:
    log = get_logger("zoo.demo")
    demos: list[tuple[str, Callable]] = [
        (_part_name(m.__name__), m.demo) for m in _command_modules() if hasattr(m, "demo")
    ]
    if args.only:
        unknown = sorted(set(args.only) - {n for n, _ in demos})
        if unknown:
            raise UsageError(f"--only: unknown part(s) {unknown}; available: {[n for n, _ in demos]}")
        demos = [(n, f) for n, f in demos if n in args.only]
    print(f"attnzoo demo: {len(demos)} parts ({', '.join(n for n, _ in demos)})")
    for name, fn in demos:
        print(f"\n== {name} ==")
        start = time.perf_counter()
        fn(args)
        log.info("%s done in %.1f s", name, time.perf_counter() - start)
    return 0


def run_bench_script(name: str, argv: Sequence[str] | None) -> int:
    """Run ``main(argv)`` of ``bench/<name>.py`` from the source checkout (``zoo bench`` sub-commands).

    ``argv`` is what followed the sub-command; a leading ``--`` is dropped.
    """
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"bench {name}: {script} ships with the source checkout, not the installed package"
        )
    spec = importlib.util.spec_from_file_location(f"zoo_bench_{name}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    argv = list(argv or [])
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return int(module.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    from zoo import __version__

    parser = _Parser(prog="zoo", description="attnzoo: efficient attention models, kernels and evaluations.")
    parser.add_argument("--version", action="version", version=f"attnzoo {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info messages")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = top.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'favit*'")
    p.add_argument("--family", help="only this family (vision, text, llm, weather)")
    p.add_argument("--pretrained", action="store_true", help="list shipped weights as arch.tag")
    p.add_argument("--params", action="store_true", help="count parameters (builds each model on 'meta')")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = top.add_parser("info", help="details of one model")
    p.add_argument("name", help="arch or arch.tag")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = top.add_parser("demo", help="a short tour of every family on embedded defaults")
    p.add_argument("--only", nargs="+", help="run only these parts")
    p.set_defaults(func=cmd_demo)

    groups = {}
    for group, text in GROUPS.items():
        gp = top.add_parser(group, help=text)
        groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=_Parser)
        gp.set_defaults(func=lambda a, gp=gp: (gp.print_help(), 2)[1])

    for module in _command_modules():
        if hasattr(module, "register"):
            module.register(top, groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = " ".join(["zoo", *(argv if argv is not None else sys.argv[1:])])
    if args.quiet:
        set_quiet(True)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        sys.stderr.write(f"zoo {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("zoo: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
