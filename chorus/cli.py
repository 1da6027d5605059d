"""The ``chorus`` command: ``run`` (all roles), one subcommand per role, ``token``, ``config``,
and the operator's ``mode``, ``ban`` and ``unban`` (they change a deployment's state in Redis)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from chorus.config import Config, ConfigError, iter_defaults, load_config
from chorus.errors import ChorusError

__all__ = ["main"]


def _add_config_args(p: argparse.ArgumentParser, listen: bool = False) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: built-in defaults)")
    p.add_argument("--data-dir", help="directory for the embedded default's files (default .chorus)")
    if listen:
        p.add_argument("--host", help="address to listen on (default 127.0.0.1; beyond loopback the embedded default "
                                      "signs tokens with a random key it keeps in DATA_DIR/auth.key)")
        p.add_argument("--port", type=int, help="port to listen on (default 8080)")


def _config_from(args: argparse.Namespace, listening: bool = False) -> Config:
    """The config of file, environment and flags (flags win), signing with the data dir's own key
    when the embedded default has one (chorus/localkey.py); ``listening`` (``chorus run``) makes
    that key when the gateway listens beyond loopback."""
    from chorus.localkey import needs_own_key, with_local_key

    overrides: dict[str, Any] = {}
    if getattr(args, "host", None):
        overrides["gateway__host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["gateway__port"] = args.port
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    config = load_config(args.config, **overrides)
    create = listening and needs_own_key(config)
    config, key_file = with_local_key(config, create)
    if create and key_file is not None:
        print(f"chorus: listening on {config.gateway.host}, beyond loopback: tokens are signed with the random key "
              f"in {key_file} (not the public development key), /dev/token signs in by name only, and "
              f"`chorus token --data-dir {config.data_dir}` mints with the same key", file=sys.stderr)
    return config


def _run_roles(args: argparse.Namespace, roles: frozenset[str]) -> int:
    import uvloop

    from chorus.app import run_app
    from chorus.ops import configure_logging

    config = _config_from(args, listening="gateway" in roles)
    configure_logging(config)
    uvloop.run(run_app(config, roles))
    return 0


def _all_roles() -> frozenset[str]:
    from chorus.app import ALL_ROLES

    return ALL_ROLES


def _token(args: argparse.Namespace) -> int:
    from chorus.auth import mint_token

    if args.ttl is not None and args.ttl <= 0:
        print(f"chorus: --ttl must be a positive number of seconds, got {args.ttl}", file=sys.stderr)
        return 2
    config = _config_from(args)
    scopes = args.scope or ["read"]
    print(mint_token(config.auth, args.user, args.name or args.user, scopes, args.role, args.ttl, args.stream,
                     args.verified))
    return 0


def _operator(args: argparse.Namespace, action: Callable[[Config], Coroutine[Any, Any, str]]) -> int:
    """Run an operator command against the deployment's Redis and print what it did."""
    from chorus.gateway.http import STREAM_ID
    from chorus.ingest.limits import ALL_STREAMS

    config = _config_from(args)
    if not config.redis.url:
        print(f"chorus {args.command}: works on a deployment with Redis (set redis.url), and this config is the "
              "embedded default, whose state lives inside its `chorus run` process. There, use the moderator API "
              "of the running process with a moderator token (`chorus token --user ID --role moderator`), e.g. "
              f"POST /mod/streams/STREAM/{_MOD_API_PATH[args.command]}", file=sys.stderr)
        return 2
    if not (STREAM_ID.match(args.stream) or (args.stream == ALL_STREAMS and args.command != "mode")):
        print(f"chorus: bad stream id {args.stream!r}", file=sys.stderr)
        return 2
    print(asyncio.run(action(config)))
    return 0


# The moderator API request (gateway/modapi.py) doing what each operator command does.
_MOD_API_PATH = {"mode": "slow_mode {\"seconds\": N}", "ban": "users/USER/ban (or /timeout {\"seconds\": N})",
                 "unban": "users/USER/unban"}


async def _set_mode(config: Config, stream: str, slow_mode_seconds: int) -> str:
    from chorus.broker import RedisBroker, RedisStreamState, StreamMode, set_stream_mode

    state = RedisStreamState(config.redis.url, config.redis.channel_prefix)
    broker = RedisBroker(config.redis.url, config.redis.channel_prefix, sharded=config.redis.sharded_pubsub)
    try:
        await set_stream_mode(state, broker, stream, StreamMode(slow_mode_seconds=slow_mode_seconds))
    finally:
        await state.close()
        await broker.stop()
    return f"stream {stream}: slow mode " + (f"{slow_mode_seconds} s" if slow_mode_seconds else "off")


async def _set_ban(config: Config, stream: str, user: str, banned: bool, seconds: float | None) -> str:
    from chorus.ingest.limits import ALL_STREAMS, RedisSanctions, redis_client

    client = redis_client(config.redis.url, 5000)
    told = 0
    try:
        sanctions = RedisSanctions(client, config.redis.channel_prefix)
        await asyncio.to_thread(_record_sanction, config, stream, user, banned, seconds)  # survives Redis restarts
        if banned:
            await sanctions.ban(stream, user, seconds)
            told = await _kick(config, client, stream, user, seconds)
        else:
            await sanctions.unban(stream, user)
    finally:
        await client.aclose()
    where = "every stream" if stream == ALL_STREAMS else f"stream {stream}"
    if not banned:
        return f"user {user}: unbanned from {where}"
    done = f"timed out from {where} for {seconds:g} s" if seconds else f"banned from {where}"
    return f"user {user}: {done}; {told} gateways told to close their connections"


def _record_sanction(config: Config, stream: str, user: str, banned: bool, seconds: float | None) -> None:
    """The ban in the history store too, from which gateways re-seed a Redis that restarted empty."""
    import sqlite3
    import time

    from chorus.ingest.store import SqliteStore, StoreUnavailable

    try:
        store = SqliteStore(config.history_path)
    except (OSError, sqlite3.Error) as exc:
        print(f"chorus: warning: the history store {config.history_path} cannot be opened ({exc}); the ban is "
              "in Redis only and will not survive Redis restarting empty", file=sys.stderr)
        return
    try:
        if banned:
            store.record_sanction(stream, user, None if seconds is None else time.time_ns() // 1_000_000
                                  + int(seconds * 1000), "chorus ban")
        else:
            store.lift_sanction(stream, user)
    except StoreUnavailable as exc:
        print(f"chorus: warning: the history store did not take the ban ({exc}); it is in Redis only",
              file=sys.stderr)
    finally:
        store.close()


async def _kick(config: Config, client: Any, stream: str, user: str, seconds: float | None) -> int:
    """Close the user's open connections on every gateway holding some (the connection registry)."""
    from chorus.broker import RedisBroker
    from chorus.codes import CloseCode
    from chorus.gateway.modapi import publish_kick
    from chorus.gateway.registry import ConnectionRegistry

    gateways = await ConnectionRegistry("cli", client, config.redis.channel_prefix).gateways(user)
    broker = RedisBroker(config.redis.url, config.redis.channel_prefix, sharded=config.redis.sharded_pubsub)
    try:
        code = CloseCode.BANNED if seconds is None else CloseCode.TIMED_OUT
        await publish_kick(broker, gateways, user, stream, code, "banned" if seconds is None else "timed out")
    finally:
        await broker.stop()
    return len(gateways)


def _mode(args: argparse.Namespace) -> int:
    from chorus.codes import MAX_SLOW_MODE_SECONDS

    if not 0 <= args.slow_mode_seconds <= MAX_SLOW_MODE_SECONDS:
        print(f"chorus: --slow-mode-seconds must be 0-{MAX_SLOW_MODE_SECONDS}", file=sys.stderr)
        return 2
    return _operator(args, lambda config: _set_mode(config, args.stream, args.slow_mode_seconds))


def _ban(args: argparse.Namespace) -> int:
    seconds = getattr(args, "seconds", None)
    if seconds is not None and seconds <= 0:
        print("chorus: --seconds must be positive", file=sys.stderr)
        return 2
    banned = args.command == "ban"
    return _operator(args, lambda config: _set_ban(config, args.stream, args.user, banned, seconds))


def _format_toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_format_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_format_toml(k)} = {_format_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def defaults_toml() -> str:
    """A commented config file with every key at its default."""
    lines = ["# Chorus configuration: every key with its default.", ""]
    section = ""
    for key, default, text in iter_defaults():
        head, _, name = key.rpartition(".")
        if head != section:
            lines += ["", f"[{head}]"]
            section = head
        lines += [f"# {text}", f"{name} = {_format_toml(default)}"]
    return "\n".join(lines) + "\n"


def _config_cmd(args: argparse.Namespace) -> int:
    if args.defaults:
        sys.stdout.write(defaults_toml())
        return 0
    if args.reference:
        from chorus.configdoc import reference_markdown

        sys.stdout.write(reference_markdown())
        return 0
    config = _config_from(args)
    model = _check_model(config)
    print(f"config OK ({'embedded default' if config.embedded else 'kafka + redis'}; {model})")
    return 0


def _check_model(config: Config) -> str:
    """Load the moderation model the config names, as the moderator would at start (a factory
    that does not import fails here, not when the moderator starts)."""
    if not config.moderation.enabled:
        return "moderation off"
    from chorus.ingest.model import load_model

    model = load_model(config.moderation.model)
    return f"moderation model {model.name if model is not None else 'none'} loads"


def _version() -> str:
    from chorus import __version__
    from chorus.native import CODEC_IMPLEMENTATION, HUB_IMPLEMENTATION

    return f"chorus {__version__} (hub {HUB_IMPLEMENTATION}, codec {CODEC_IMPLEMENTATION})"


def _bench(args: argparse.Namespace) -> int:
    """``chorus bench ...`` is ``python -m bench ...`` in the source checkout (bench/ is not in the wheel).
    ``main`` sends every argument after ``bench`` here untouched (``--help`` included)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "__main__.py").exists():
        print("chorus: `chorus bench` runs bench/ of a source checkout; this install has none", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "bench", *args.bench_args], cwd=root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description="Live comments for live video.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run every role in one process (the embedded default needs nothing else)")
    _add_config_args(p, listen=True)
    p.set_defaults(func=lambda a: _run_roles(a, _all_roles()))
    p = sub.add_parser("gateway", help="the WebSocket edge (needs Kafka and Redis)")
    _add_config_args(p, listen=True)
    p.set_defaults(func=lambda a: _run_roles(a, frozenset({"gateway"})))
    for role, text in (("coordinator", "Kafka to Redis Pub/Sub"), ("archiver", "Kafka to the history store"),
                       ("moderator", "moderation off the delivery path: rules, model, reputation")):
        p = sub.add_parser(role, help=text)
        _add_config_args(p)
        p.set_defaults(func=lambda a, r=role: _run_roles(a, frozenset({r})))
    p = sub.add_parser("token", help="mint a JWT with the configured key")
    _add_config_args(p)
    p.add_argument("--user", required=True, help="user id (the `sub` claim)")
    p.add_argument("--name", help="display name (default: the user id)")
    p.add_argument("--scope", action="append", choices=["read", "write", "write:comments", "moderate"],
                   help="repeatable; default read (posting needs write:comments, or write)")
    p.add_argument("--role", default="viewer", choices=["viewer", "moderator", "broadcaster"])
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default auth.token_ttl_s)")
    p.add_argument("--stream", action="append", metavar="STREAM",
                   help="repeatable: the streams a broadcaster owns (or the only ones a moderator may moderate)")
    p.add_argument("--verified", action="store_true",
                   help="a verified account: a badge on its comments, never sampled out on a hot stream")
    p.set_defaults(func=_token)
    p = sub.add_parser("config", help="check a config file (values and the moderation model), or print every key "
                                      "with its default")
    _add_config_args(p)
    p.add_argument("--defaults", action="store_true", help="print a commented file of defaults")
    p.add_argument("--reference", action="store_true", help="print the Markdown reference (docs/config.md)")
    p.set_defaults(func=_config_cmd)
    p = sub.add_parser("mode", help="set a stream's slow mode (needs Redis); live viewers are told")
    _add_config_args(p)
    p.add_argument("stream", metavar="STREAM")
    p.add_argument("--slow-mode-seconds", type=int, required=True, metavar="N",
                   help="one comment per user every N seconds; 0 turns slow mode off (moderators are exempt)")
    p.set_defaults(func=_mode)
    for name, text in (("ban", "ban a user from a stream ('*': every stream), or time them out with --seconds"),
                       ("unban", "lift a ban or time-out")):
        p = sub.add_parser(name, help=text + " (needs Redis)")
        _add_config_args(p)
        p.add_argument("stream", metavar="STREAM")
        p.add_argument("user", metavar="USER", help="user id (the token's `sub`)")
        if name == "ban":
            p.add_argument("--seconds", type=float, metavar="N", help="a time-out of N seconds instead of a ban")
        p.set_defaults(func=_ban)
    p = sub.add_parser("bench", help="run a benchmark scenario (python -m bench ...; see bench/README.md)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="SCENARIO [OPTIONS]")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # every option is the bench's, even --help
        return _bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"chorus: {exc}", file=sys.stderr)
        return 2
    except ChorusError as exc:  # a refusal with its reason (a backend down, a dependency of another shape)
        print(f"chorus: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
