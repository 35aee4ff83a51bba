"""The ``vtuber-bot`` command line (also ``python -m bot``).

Exit codes (BSD sysexits where one fits): 0 ok, 1 operational error (store, model), 2 usage,
69 adapter, platform or LLM server unavailable, 70 a bug, 73 data dir cannot be created, 75 another
runtime holds the data dir, the SQLite file or the runtime role, 77 credentials rejected, 78 bad
config or missing secret,
130 interrupted before start-up finished.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import make_url

from bot.cli_data import (
    cmd_export,
    cmd_export_transcript,
    cmd_forget,
    cmd_replay,
    cmd_trace,
    print_json,
)
from bot.cli_parser import build_parser
from bot.commands.format import StatsSummary
from bot.config import AppConfig, check_secrets, load_config
from bot.errors import EXIT_CONFIG, EXIT_SOFTWARE, EXIT_UNAVAILABLE, BotError, ConfigError
from bot.instance_lock import EXIT_TEMPFAIL, instance_lock, sqlite_store_lock
from bot.logging_setup import configure_logging
from bot.paths import DataPaths
from bot.recovery import runtime_role
from bot.registry import load_adapter_class
from bot.runtime import Runtime, build_adapters, open_runtime, open_store, store_url
from engine.errors import BackendUnavailableError, EngineConfigError, EngineError
from engine.persona import PersonaError, load_persona
from engine.secret_scan import SecretMask
from memory.errors import StoreError
from memory.store.roles import RoleTakenError

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace, AppConfig, DataPaths], Coroutine[Any, Any, int]]


def _banner(runtime: Runtime) -> str:
    persona = runtime.engine.persona
    return f"{persona.names.zh} ({persona.names.en}) — {persona.disclosure}"


async def cmd_chat(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    adapter_class = load_adapter_class("console")
    role = runtime_role(config, ["console"], paths.data_dir)
    async with open_runtime(config, paths, role=role, freeze_heap=True) as runtime:
        adapter = adapter_class(
            config, user=args.user, once=args.once, speaker=runtime.engine.persona.names.zh,
            banner=_banner(runtime), services=runtime,
        )
        await runtime.run_adapters([adapter])
    outcome = adapter.once_outcome
    if outcome is not None and outcome.status != "answered":
        # A script calling `chat --once` must be able to tell a fallback from an answer.
        print(f"error: the message ended {outcome.status} ({outcome.reason})", file=sys.stderr)
        return 1
    return 0


def _run_selection(args: argparse.Namespace, config: AppConfig) -> list[str]:
    """The adapters this process runs (``--adapters``), with the shard options applied."""
    names = config.adapters.enabled_names()
    if not names:
        raise ConfigError(["adapters: no adapter is enabled; set adapters.<name>.enabled: true "
                           "for console, discord or twitch"])
    if args.adapters:
        if missing := [n for n in args.adapters if n not in names]:
            raise ConfigError([f"--adapters: {', '.join(missing)} not enabled in the config "
                               f"(enabled: {', '.join(names)})"])
        names = [n for n in names if n in args.adapters]
    shard_options = {
        "discord": (args.shard_ids, args.shard_count, "--shard-ids/--shard-count"),
        "twitch": (args.twitch_shard_ids, args.twitch_shard_count,
                   "--twitch-shard-ids/--twitch-shard-count")}
    for platform, (ids, count, flags) in shard_options.items():
        if ids is None and count is None:
            continue
        section = getattr(config.adapters, platform)
        sharded = section.model_copy(update={"shard_ids": ids, "shard_count": count})
        try:
            type(sharded).model_validate(sharded.model_dump())
        except ValidationError as exc:
            raise ConfigError([f"{flags}: {e['msg']}" for e in exc.errors()]) from None
        setattr(config.adapters, platform, sharded)
    return names


def _reloaded(args: argparse.Namespace) -> AppConfig:
    """The config file again, with this process's command-line choices applied (so they
    do not read as changes that need a restart)."""
    config = load_config(args.config)
    _run_selection(args, config)
    return config


async def cmd_run(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    names = _run_selection(args, config)
    from bot.operator import RuntimeView, binding_problems, operator_server

    check_secrets(config, names)
    if problems := binding_problems(config):
        raise ConfigError(problems)
    # A missing extra, a wrong token or an unknown channel fails before the model loads.
    classes = [load_adapter_class(name) for name in names]
    await asyncio.gather(*(adapter.check_credentials(config) for adapter in classes
                           if hasattr(adapter, "check_credentials")))
    role = runtime_role(config, names, paths.data_dir)
    async with open_runtime(config, paths, role=role, freeze_heap=True) as runtime:
        options = {"console": {"speaker": runtime.engine.persona.names.zh,
                               "banner": _banner(runtime), "services": runtime},
                   "discord": {"services": runtime}, "twitch": {"services": runtime}}
        adapters = build_adapters(config, names, **options)
        runtime.reload_config = lambda: _reloaded(args)  # for SIGHUP
        log.info("running adapters: %s", ", ".join(names))
        async with operator_server(config, RuntimeView(runtime, adapters)):
            await runtime.run_adapters(adapters)
    return 0


async def cmd_stats(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    from bot.commands import format_stats
    from bot.stats import user_chart, user_stats

    persona = load_persona(config.vtuber.persona)
    async with open_store(config, paths) as store:
        stats = await user_stats(store, persona, args.platform, args.user)
        chart = await user_chart(store, persona, args.platform, args.user) if args.chart else None
    summary = StatsSummary(conversation_count=0, current_mood=persona.moods.baseline,
                           intimacy_level=0.0, intimacy_tier=persona.tier_for(0).name,
                           intimacy_trend="steady")
    payload: dict[str, Any] = {"platform": args.platform, "platform_user_id": args.user,
                               "persona_id": persona.id, **summary, **(stats or {}),
                               "known": stats is not None}
    if chart is not None:
        await asyncio.to_thread(Path(args.chart).write_bytes, chart)
    if args.json:
        print_json(payload)
    else:
        print(f"{args.platform}:{args.user} — {format_stats(stats or summary)}")
    return 0


async def cmd_migrate(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    from memory.migrate import current_revisions, upgrade_to_head
    from memory.urls import mask_url

    url = store_url(config, paths)
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    await upgrade_to_head(url)
    print(f"{mask_url(url)} is at revision {', '.join(await current_revisions(url))}")
    return 0


async def cmd_diagnose(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    from engine.system_info import diagnose_system

    diagnosis = diagnose_system()
    diagnosis["issues"] = [*_config_file_problems(config), *diagnosis["issues"]]
    report = {**diagnosis, "config": config.masked_dump(), "data_dir": str(paths.data_dir),
              # What the engine is given (secrets are never dumped).
              "engine_config": config.engine_config().model_dump(mode="json")}
    # Issues exit 1, so a script or a deploy check can stop on them; recommendations do not.
    found = EXIT_DIAGNOSED_ISSUES if diagnosis["issues"] else 0
    if args.json:
        print_json(report)
        return found
    print(f"data dir: {paths.data_dir}")
    print("issues:" if diagnosis["issues"] else "issues: none")
    for issue in diagnosis["issues"]:
        print(f"  - {issue}")
    print("recommendations:" if diagnosis["recommendations"] else "recommendations: none")
    for item in diagnosis["recommendations"]:
        print(f"  - {item}")
    return found


def _config_file_problems(config: AppConfig) -> list[str]:
    """What `run` would refuse at start-up about files: model paths and the persona, checked
    without loading a model."""
    from engine.model_loader import model_path_problems

    models = config.models
    problems = model_path_problems(models.llm.backend, models.llm.model_path,
                                   models.llm.gguf_file, models.embedding.model_path,
                                   models.embedding.enabled)
    try:
        load_persona(config.vtuber.persona)
    except PersonaError as exc:
        problems.extend(str(exc).splitlines())
    return problems


async def cmd_gpu_status(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    from engine.gpu_manager import discover_devices, gpu_status, plan_placement

    devices = discover_devices()
    status = gpu_status(devices)
    placement = plan_placement(devices, config.models.llm.device).as_dict()
    if args.json:
        print_json({**status, "placement": placement})
        return 0
    print(f"GPUs: {status['gpu_count']}  total {status['total_memory_gb']} GiB, "
          f"available {status['available_memory_gb']} GiB")
    for device in status["devices"]:
        print(f"  cuda:{device['index']} {device['name']}: {device['used_memory_gb']} / "
              f"{device['total_memory_gb']} GiB used")
    print(f"LLM on {placement['llm_device']}, embedder on {placement['embedder_device']}")
    return 0


def cmd_persona(args: argparse.Namespace) -> int:
    """File work only (no store, no model), so it runs without an event loop."""
    if args.persona_command == "check":
        persona = load_persona(args.file)
        print(f"ok: {args.file} defines {persona.id} ({persona.names.zh}), "
              f"{len(persona.moods.states)} moods, {len(persona.intimacy.tiers)} intimacy tiers")
        return 0
    return _import_card(args)


def _import_card(args: argparse.Namespace) -> int:
    """A Character Card V2/V3 to a persona file, its lorebook to knowledge files beside it."""
    import yaml

    from engine.character_card import import_card, read_card

    card = Path(args.card)
    if not card.is_file():
        raise PersonaError(f"{card}: file not found")
    imported = import_card(read_card(card))
    out = Path(args.out) if args.out is not None else None
    if out is not None and out.exists() and not args.force:
        raise PersonaError(f"{out} exists; pass --force to overwrite it")
    data, notes = imported.data, list(imported.notes)
    if imported.knowledge and out is None:
        notes.append(f"character_book: {len(imported.knowledge)} entries not written; "
                     "give --out to get them as knowledge files next to the persona")
    elif imported.knowledge and out is not None:
        folder = out.parent / f"{out.stem}-knowledge"
        folder.mkdir(parents=True, exist_ok=True)
        for name, body in imported.knowledge.items():
            (folder / name).write_text(body, encoding="utf-8")
        data["knowledge_dir"] = folder.name  # relative to the persona file
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=100)
    if out is None:
        sys.stdout.write(text)
        return 0
    out.write_text(text, encoding="utf-8")
    knowledge = (f" and {len(imported.knowledge)} knowledge entries in "
                 f"{out.stem}-knowledge/" if imported.knowledge else "")
    print(f"wrote {out} (persona {data['id']}){knowledge}; check it with: "
          f"vtuber-bot persona check {out}")
    return 0


COMMANDS: dict[str, Command] = {
    "forget": cmd_forget,
    "export": cmd_export,
    "replay": cmd_replay,
    "export-transcript": cmd_export_transcript,
    "trace": cmd_trace,
    "chat": cmd_chat,
    "run": cmd_run,
    "stats": cmd_stats,
    "migrate": cmd_migrate,
    "diagnose": cmd_diagnose,
    "gpu-status": cmd_gpu_status,
}


RUNTIME_SWITCH_INTERVAL_S = 0.001
EXIT_DIAGNOSED_ISSUES = 1


@contextlib.contextmanager
def _runtime_locks(config: AppConfig, paths: DataPaths) -> Iterator[None]:
    """One runtime per data dir and per SQLite store: two would both answer every message
    (PostgreSQL serves several processes)."""
    with instance_lock(paths.data_dir), contextlib.ExitStack() as stack:
        url = make_url(store_url(config, paths))
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            stack.enter_context(sqlite_store_lock(Path(url.database).resolve()))
        yield


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(args.log_level or config.logging.level, config.secrets.values(),
                      config.logging.format)
    paths = DataPaths.resolve(args.data_dir)
    log.info("data dir: %s", paths.data_dir)
    mask = SecretMask(config.secrets.values())
    try:
        return _run_command(args, config, paths)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `vtuber-bot trace 2 | head`: the reader left early
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - each kind gets its line and exit code below
        lines, code = _failure(exc)
        for line in lines:  # not through logging: masked here (a 401 may quote a key)
            print(mask(line), file=sys.stderr)
        return code


def _run_command(args: argparse.Namespace, config: AppConfig, paths: DataPaths) -> int:
    if args.command == "persona":
        return cmd_persona(args)
    if args.command not in ("diagnose", "gpu-status"):
        paths.ensure()
    if args.command in ("chat", "run"):
        # The store thread and the decode loop each wait for the GIL every time they
        # want it back, up to the switch interval (5 ms by default) while the event loop
        # runs: at 1 ms the decode loop's time-to-first-token p95 at 4 msg/s was 0.33 s
        # instead of 1.5 s in one pair of runs (docs/performance-history.md).
        sys.setswitchinterval(RUNTIME_SWITCH_INTERVAL_S)
    with (_runtime_locks(config, paths) if args.command in ("chat", "run")
          else contextlib.nullcontext()):
        return asyncio.run(COMMANDS[args.command](args, config, paths))


def _failure(exc: Exception) -> tuple[list[str], int]:
    """What to print for a command that failed, and its exit code."""
    if isinstance(exc, ConfigError):
        return [f"config error: {line}" for line in exc.problems], exc.exit_code
    if isinstance(exc, BotError):
        return [f"error: {exc}"], exc.exit_code
    if isinstance(exc, EngineConfigError):
        return [f"config error: {line}" for line in exc.problems], EXIT_CONFIG
    if isinstance(exc, PersonaError):
        return [f"persona error: {line}" for line in str(exc).splitlines()], EXIT_CONFIG
    if isinstance(exc, RoleTakenError):  # another process does this one's work: like a lock
        return [f"error: {exc}"], EXIT_TEMPFAIL
    if isinstance(exc, BackendUnavailableError):  # the LLM server: retry later
        return [f"error: {exc}"], EXIT_UNAVAILABLE
    if isinstance(exc, StoreError | EngineError):
        return [f"error: {exc}"], 1
    # A bug: its traceback goes through the masking log formatter.
    log.error("unexpected error (a bug: please report it with this traceback)", exc_info=exc)
    return [], EXIT_SOFTWARE
