"""LivePortrait Live — the one entry point.

    python launch.py                      # the web app on http://127.0.0.1:7860 (official weights)
    python launch.py render --source IMG --driving VIDEO -o OUT.mp4
    python launch.py bench --device cpu   # baseline vs optimised engine, JSON + table
    python launch.py loadtest --url http://127.0.0.1:7860/ --clients 8 --minutes 5   # see docs/reliability.md
"""
import argparse
import logging
import sys


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None,
                   help="directory of the official LivePortrait weights (default: $LP_WEIGHTS, then the cache dir); "
                        "'recipe' = untrained deterministic weights for development")
    p.add_argument("--config", choices=["full", "tiny"], default="full",
                   help="network size; 'tiny' (same classes, few channels) only with --weights recipe")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--no-download", action="store_true", help="never try to download missing weights")


def main(argv: list[str] | None = None) -> int:
    from model.weights import WeightsError
    from model import bench
    from stream import render
    from web import app, loadtest

    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common(parser)
    app.add_arguments(parser)
    sub = parser.add_subparsers(dest="command")
    for name, module in (("render", render), ("bench", bench), ("loadtest", loadtest)):
        p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        common(p)
        module.add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run = {"render": render.run, "bench": bench.run, "loadtest": loadtest.run}.get(args.command, app.run)
    try:
        return run(args) or 0
    except WeightsError as e:
        print(f"\n{e}\n", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
