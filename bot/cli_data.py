"""The data commands of ``vtuber-bot``: transcripts (export, replay), traces, and one
viewer's data (forget, export)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bot.config import AppConfig
from bot.paths import DataPaths
from bot.runtime import open_store
from engine.persona import load_persona


def print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False, indent=2, default=str))


async def _stored_transcript(args: argparse.Namespace, config: AppConfig,
                             paths: DataPaths) -> list[dict[str, Any]]:
    from bot.replay import export_transcript

    persona = load_persona(config.vtuber.persona)
    async with open_store(config, paths) as store:
        return await export_transcript(store, persona.id, persona.moods.baseline,
                                       platform=args.platform, user=args.user,
                                       channel=args.channel, since=args.since)


async def cmd_export_transcript(args: argparse.Namespace, config: AppConfig,
                                paths: DataPaths) -> int:
    lines = await _stored_transcript(args, config, paths)
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    await _write_out(text, args.out, f"{len(lines)} lines")
    return 0


async def _write_out(text: str, out: str | None, what: str) -> None:
    """To ``out`` (saying so on stderr), or to stdout."""
    if out:
        await asyncio.to_thread(Path(out).write_text, text, "utf-8")
        print(f"wrote {what} to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


async def cmd_replay(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    import tempfile

    from bot.replay import TranscriptError, format_report, read_transcript, replay

    if args.from_db:
        events = await _stored_transcript(args, config, paths)
        path = Path(tempfile.mkdtemp(prefix="vtuber-transcript-")) / "from-db.jsonl"
        path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events),
                        "utf-8")
        events = read_transcript(path)
    elif args.file:
        events = await asyncio.to_thread(read_transcript, Path(args.file))
    else:
        raise TranscriptError("replay: give a transcript FILE or --from-db")
    target = Path(args.db_dir) if args.db_dir else Path(tempfile.mkdtemp(prefix="vtuber-replay-"))
    replay_config = config.model_copy(deep=True)
    replay_config.store.url = None  # always replay into a SQLite file, never the source
    replay_config.secrets = config.secrets.model_copy(update={"database_url": None})

    def progress(done: int, total: int, message: Any) -> None:
        print(f"replay: {done}/{total} {message.platform}:{message.user} {message.status} "
              f"in {message.latency_s * 1000:.0f} ms", file=sys.stderr, flush=True)

    report = await replay(events, replay_config, DataPaths(target.resolve(), paths.cache_dir),
                          on_message=progress)
    if args.json:
        print_json(report.as_dict())
    else:
        print(format_report(report))
        print(f"replayed into {target}")
    return 0 if report.ok else 1


async def cmd_trace(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    from bot.stats import reply_trace

    async with open_store(config, paths) as store:
        found = await reply_trace(store, args.message_id)
    if found is None:
        print(f"error: no reply with a trace for message {args.message_id}", file=sys.stderr)
        return 1
    print_json(found)
    return 0


async def cmd_forget(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    """Delete everything stored about one viewer (and the identities linked to them)."""
    async with open_store(config, paths) as store:
        user_id = await store.find_user(args.platform, args.user)
        if user_id is None:
            print(f"nothing stored about {args.platform}:{args.user}")
            return 0
        question = (f"Delete everything stored about {args.platform}:{args.user}, linked "
                    "identities included?")
        if not args.yes and not await asyncio.to_thread(_confirmed, question):
            print("error: not confirmed; nothing deleted (pass --yes to skip the question)",
                  file=sys.stderr)
            return 1
        counts = await store.delete_user_data(user_id)
    print(f"deleted {args.platform}:{args.user}: "
          + ", ".join(f"{n} {table}" for table, n in counts.items() if n))
    return 0


def _confirmed(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [y/N] ").strip().casefold() in ("y", "yes")


async def cmd_export(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    """Everything stored about one viewer, as JSON (a data-access request)."""
    async with open_store(config, paths) as store:
        user_id = await store.find_user(args.platform, args.user)
        data = None if user_id is None else await store.export_user_data(user_id)
    if data is None:
        print(f"error: nothing stored about {args.platform}:{args.user}", file=sys.stderr)
        return 1
    text = json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n"
    await _write_out(text, args.out, f"{args.platform}:{args.user}'s data")
    return 0
