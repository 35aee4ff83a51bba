"""The ``vtuber-bot`` argument parser. Global options (``--config``, ``--data-dir``,
``--log-level``) are accepted before or after the sub-command, so
``make run ARGS="--config x.yaml"`` works."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from bot import __version__

PLATFORMS = ("console", "discord", "twitch")


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--config", metavar="PATH", default=default,
                        help="YAML config (default: ./config.yaml if present, else built-in)")
    parser.add_argument("--data-dir", metavar="DIR", default=default,
                        help="where the SQLite file and model cache live "
                             "(default: $VTUBER_DATA_DIR or the per-user data dir)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        default=default, help="override logging.level from the config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtuber-bot",
        description="Run an LLM VTuber persona on Discord, Twitch or the console.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, None)
    # The same options on every sub-command; SUPPRESS leaves the value given before the
    # sub-command alone when it is not repeated after it.
    shared = argparse.ArgumentParser(add_help=False)
    _global_options(shared, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_runtime_commands(sub, shared)
    _add_data_commands(sub, shared)
    _add_persona_commands(sub, shared)
    return parser


if TYPE_CHECKING:  # what add_subparsers() returns (generic only for type checkers)
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _add_runtime_commands(sub: Subparsers, shared: argparse.ArgumentParser) -> None:
    chat = sub.add_parser("chat", parents=[shared], help="talk to the persona in this terminal")
    chat.add_argument("--once", metavar="TEXT", help="answer one message and exit")
    chat.add_argument("--user", metavar="NAME", help="who you are (default: adapters.console.user)")

    stats = sub.add_parser("stats", parents=[shared],
                           help="a user's conversation count, mood and intimacy")
    stats.add_argument("--platform", required=True, choices=PLATFORMS)
    stats.add_argument("--user", required=True, help="platform user id (console: the name)")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.add_argument("--chart", metavar="PNG", help="also write an intimacy/mood chart here")

    run = sub.add_parser("run", parents=[shared], help="start the adapters enabled in the config")
    run.add_argument("--adapters", type=_names, metavar="NAMES",
                     help="only these of the enabled adapters (comma-separated), e.g. "
                          "one process per platform on one PostgreSQL")
    run.add_argument("--shard-ids", type=_shard_ids, metavar="IDS",
                     help="Discord: the shards this process runs, e.g. 0,1 (needs --shard-count)")
    run.add_argument("--shard-count", type=int, metavar="N",
                     help="Discord: how many shards all processes run together")
    run.add_argument("--twitch-shard-ids", type=_shard_ids, metavar="IDS",
                     help="Twitch: the conduit shards this process holds, e.g. 0 (needs "
                          "--twitch-shard-count)")
    run.add_argument("--twitch-shard-count", type=int, metavar="N",
                     help="Twitch: how many shards the conduit has, over all processes")
    sub.add_parser("migrate", parents=[shared],
                   help="upgrade the database schema to the newest revision")

    diagnose = sub.add_parser("diagnose", parents=[shared],
                              help="system diagnosis with recommendations")
    diagnose.add_argument("--json", action="store_true")

    gpu = sub.add_parser("gpu-status", parents=[shared],
                         help="GPUs, memory and the placement plan")
    gpu.add_argument("--json", action="store_true")


def _add_data_commands(sub: Subparsers, shared: argparse.ArgumentParser) -> None:
    replay = sub.add_parser("replay", parents=[shared],
                            help="re-run a transcript through the full pipeline")
    replay.add_argument("file", nargs="?", help="transcript JSONL (or --from-db)")
    replay.add_argument("--from-db", action="store_true",
                        help="replay conversations stored in this data dir's database")
    _add_transcript_filters(replay)
    replay.add_argument("--db-dir", metavar="DIR",
                        help="database to replay into (default: a fresh temporary one)")
    replay.add_argument("--json", action="store_true")

    export = sub.add_parser("export-transcript", parents=[shared],
                            help="write stored conversations as JSONL")
    _add_transcript_filters(export)
    export.add_argument("--out", metavar="FILE", help="default: stdout")

    trace = sub.add_parser("trace", parents=[shared], help="show the stored trace of a reply")
    trace.add_argument("message_id", type=int, help="a reply's id, or the id of its question")

    for name, what in (("forget", "delete everything stored about one viewer"),
                       ("export", "write everything stored about one viewer as JSON")):
        viewer = sub.add_parser(name, parents=[shared], help=what)
        viewer.add_argument("--platform", required=True, choices=PLATFORMS)
        viewer.add_argument("--user", required=True, help="platform user id (console: the name)")
        if name == "forget":
            viewer.add_argument("--yes", action="store_true", help="do not ask to confirm")
        else:
            viewer.add_argument("--out", metavar="FILE", help="default: stdout")


def _add_persona_commands(sub: Subparsers, shared: argparse.ArgumentParser) -> None:
    persona = sub.add_parser("persona", parents=[shared], help="check or import persona files")
    persona_sub = persona.add_subparsers(dest="persona_command", required=True, metavar="ACTION")
    check = persona_sub.add_parser("check", help="validate a persona YAML file")
    check.add_argument("file")
    imported = persona_sub.add_parser(
        "import", help="convert a Character Card V2/V3 (JSON or PNG) to a persona file"
    )
    imported.add_argument("card")
    imported.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    imported.add_argument("--force", action="store_true", help="overwrite --out if it exists")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def since_time(text: str) -> datetime:
    """``--since``: an ISO-8601 time (UTC unless it says otherwise) or a duration back from
    now (``30m``, ``24h``, ``7d``)."""
    duration = _DURATION.match(text.strip())
    if duration:
        amount = float(duration.group(1))
        return datetime.now(UTC) - timedelta(**{_UNITS[duration.group(2)]: amount})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO-8601 time (2026-11-27, 2026-11-27T18:00+08:00) nor a "
            "duration (30m, 24h, 7d)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _add_transcript_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--platform", choices=PLATFORMS)
    parser.add_argument("--user", help="platform user id")
    parser.add_argument("--channel")
    parser.add_argument("--since", metavar="WHEN", type=since_time,
                        help="only messages at or after this time: ISO-8601 (UTC unless "
                             "given) or a duration back from now (30m, 24h, 7d)")


def _names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(PLATFORMS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected names from {', '.join(PLATFORMS)}, got {value!r}")
    return names


def _shard_ids(value: str) -> list[int]:
    try:
        ids = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected shard numbers like 0,1, got {value!r}") from None
    if not ids or ids[0] < 0:
        raise argparse.ArgumentTypeError(f"expected shard numbers like 0,1, got {value!r}")
    return ids
