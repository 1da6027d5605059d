"""The embedded default's signing key when it listens beyond loopback.

The embedded default signs tokens with a development key that is public (it is in this
repository), which is harmless on 127.0.0.1 and an open door anywhere else: whoever reaches
the port could mint a moderator token and pin, delete and time out users. So ``chorus run``
bound to any other address generates a random key once, keeps it in ``<data_dir>/auth.key``
(mode 0600, created exclusively), and signs with it; ``chorus token --data-dir`` of the same
directory reads the same file, and so does a later run on loopback (tokens stay valid).
``/dev/token`` still signs a viewer in by display name, and never with a role or scope beyond
posting. A key set in the config (``auth.key``) is always used as it is.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
import stat
from pathlib import Path

from chorus.config import DEV_KEY, Config, ConfigError

__all__ = ["KEY_FILE", "is_loopback", "key_path", "needs_own_key", "with_local_key"]

KEY_FILE = "auth.key"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1, localhost."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything


def needs_own_key(config: Config) -> bool:
    """The embedded default with the public development key, listening beyond loopback."""
    return config.embedded and config.auth.key == DEV_KEY and not is_loopback(config.gateway.host)


def key_path(config: Config) -> Path:
    return Path(config.data_dir) / KEY_FILE


def with_local_key(config: Config, create: bool) -> tuple[Config, Path | None]:
    """``config`` signing with ``<data_dir>/auth.key`` when it uses the development key on the
    embedded default and that file exists (or ``create`` is set: then it is made). Returns the
    file used, if any."""
    if not config.embedded or config.auth.key != DEV_KEY:
        return config, None
    path = key_path(config)
    if not path.exists():
        if not create:
            return config, None
        _create_key_file(path)
    key = _read_key_file(path)
    return dataclasses.replace(config, auth=dataclasses.replace(config.auth, key=key)), path


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)  # 384 bits
    try:  # O_EXCL: two processes starting at once never overwrite each other's key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")


def _read_key_file(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"key file {path}: readable by others (mode {stat.S_IMODE(mode):04o}); "
                          f"run `chmod 600 {path}`")
    key = path.read_text().strip()
    if len(key) < 32:
        raise ConfigError(f"key file {path}: the key must be at least 32 characters; delete the file to make a new one")
    return key
