"""LivePortrait Live — the one entry point.

    python launch.py                      # the web app on http://127.0.0.1:7860 (official weights)
    python launch.py render --source IMG --driving VIDEO -o OUT.mp4
    python launch.py bench --device cpu   # baseline vs optimised engine, JSON + table
    python launch.py bench serve          # many live sessions: the batching scheduler vs one lock, JSON + table
    python launch.py bench live           # one live session's frame, stage by stage, per codec set-up
    python launch.py --host 0.0.0.0 --https-self-signed   # for other machines too (docs/deploy.md)
    python launch.py loadtest --url http://127.0.0.1:7860/ --clients 8 --minutes 5   # see docs/reliability.md
"""
import argparse
import importlib
import logging
import sys


class Parser(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit status 2 (argparse's usage block would bury the reason)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def common(p: argparse.ArgumentParser, sub: bool = False) -> None:
    """The options every command takes. In a sub-command they default to "not given", so an option before the
    sub-command (`launch.py --device cpu render ...`) is not overwritten by the sub-command's default."""
    d = {"default": argparse.SUPPRESS} if sub else {}
    p.add_argument("--weights", **({"default": None} | d),
                   help="directory of the official LivePortrait weights (default: $LP_WEIGHTS, then the cache dir); "
                        "'recipe' = untrained deterministic weights for development")
    p.add_argument("--config", choices=["full", "tiny"], **({"default": "full"} | d),
                   help="network size; 'tiny' (same classes, few channels) only with --weights recipe")
    p.add_argument("--device", **({"default": None} | d), help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--no-download", action="store_true", **d, help="never try to download missing weights")
    from stream.face import add_face_arguments  # numpy and OpenCV only; mediapipe loads when a face is tracked
    add_face_arguments(p, **d)


# Sub-command -> (module, one-line help). A module gives add_arguments(parser) and run(args), and is imported only
# when its command runs, so each command needs only its own stack: `bench` runs without the web or face stack.
# The web app (no sub-command) is web.app.
COMMANDS = {
    "render": ("stream.render", "animate a portrait with a driving video file into an MP4"),
    "bench": ("model.bench", "benchmark: a naive per-frame port against the engine, JSON + table"),
    "loadtest": ("web.loadtest", "load and soak a running server with real WebRTC clients (loopback only)"),
}
SERVE = ("stream.serve_bench", "benchmark: many live sessions, the batching scheduler against one lock, JSON + table")
LIVE = ("stream.live_bench", "benchmark: one live frame stage by stage, per portrait size and codec, JSON + table")


def main(argv: list[str] | None = None) -> int:
    from model.engine import ConfigError
    from model.weights import WeightsError

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    serve = command == "bench" and argv[argv.index("bench") + 1:argv.index("bench") + 2] == ["serve"]
    live = command == "bench" and argv[argv.index("bench") + 1:argv.index("bench") + 2] == ["live"]
    module = importlib.import_module(SERVE[0] if serve else LIVE[0] if live else COMMANDS[command][0] if command
                                     else "web.app")
    parser = Parser(prog="launch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common(parser)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for name, (_, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        common(p, sub=True)
        if name == "bench" and command == "bench":  # `bench serve`/`live` need the face stack: their own modules
            benches = p.add_subparsers(dest="bench_command", parser_class=Parser)
            q = benches.add_parser("serve", help=SERVE[1], description=SERVE[1])
            r = benches.add_parser("live", help=LIVE[1], description=LIVE[1])
            common(q, sub=True)
            common(r, sub=True)
            p = q if serve else r if live else p
        if name == command:
            module.add_arguments(p)
    if command is None:
        module.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return module.run(args) or 0
    except WeightsError as e:
        print(f"\n{e}\n", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
