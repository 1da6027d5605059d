"""The ``chorus`` command: ``run`` (all roles), one subcommand per role, ``token``, ``config``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from chorus.config import Config, ConfigError, iter_defaults, load_config

__all__ = ["main"]


def _add_config_args(p: argparse.ArgumentParser, listen: bool = False) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: built-in defaults)")
    p.add_argument("--data-dir", help="directory for the embedded default's files (default .chorus)")
    if listen:
        p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=int, help="port to listen on (default 8080)")


def _config_from(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "host", None):
        overrides["gateway__host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["gateway__port"] = args.port
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return load_config(args.config, **overrides)


def _run_roles(args: argparse.Namespace, roles: frozenset[str]) -> int:
    import uvloop

    from chorus.app import run_app

    config = _config_from(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(run_app(config, roles))
    return 0


def _token(args: argparse.Namespace) -> int:
    from chorus.auth import mint_token

    config = _config_from(args)
    scopes = args.scope or ["read"]
    print(mint_token(config.auth, args.user, args.name or args.user, scopes, args.role, args.ttl))
    return 0


def _format_toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_format_toml(v) for v in value) + "]"
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
    config = _config_from(args)
    print(f"config OK ({'embedded default' if config.embedded else 'kafka + redis'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description="Live comments for live video.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run every role in one process (the embedded default needs nothing else)")
    _add_config_args(p, listen=True)
    p.set_defaults(func=lambda a: _run_roles(a, frozenset({"gateway", "coordinator", "archiver"})))
    p = sub.add_parser("gateway", help="the WebSocket edge (needs Kafka and Redis)")
    _add_config_args(p, listen=True)
    p.set_defaults(func=lambda a: _run_roles(a, frozenset({"gateway"})))
    for role, text in (("coordinator", "Kafka to Redis Pub/Sub"), ("archiver", "Kafka to the history store")):
        p = sub.add_parser(role, help=text)
        _add_config_args(p)
        p.set_defaults(func=lambda a, r=role: _run_roles(a, frozenset({r})))
    p = sub.add_parser("token", help="mint a JWT with the configured key")
    _add_config_args(p)
    p.add_argument("--user", required=True, help="user id (the `sub` claim)")
    p.add_argument("--name", help="display name (default: the user id)")
    p.add_argument("--scope", action="append", choices=["read", "write"], help="repeatable; default read")
    p.add_argument("--role", default="viewer", choices=["viewer", "moderator", "broadcaster"])
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default auth.token_ttl_s)")
    p.set_defaults(func=_token)
    p = sub.add_parser("config", help="check a config file, or print every key with its default")
    _add_config_args(p)
    p.add_argument("--defaults", action="store_true", help="print a commented file of defaults")
    p.set_defaults(func=_config_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"chorus: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
