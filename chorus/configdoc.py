"""The config reference, generated from the config tree (``chorus config --reference``).

``docs/config.md`` is this module's output; tests/test_ops.py fails when it is stale, so a
key added to chorus/config.py with its ``doc(...)`` text shows up in the reference by running
``chorus config --reference > docs/config.md``. The same rows feed ``chorus config
--defaults`` (a commented TOML file), so the two never disagree.
"""

from __future__ import annotations

from typing import Any

from chorus.config import env_name, iter_defaults

__all__ = ["env_name", "reference_markdown", "toml_value"]

INTRO = """\
# Configuration reference

Generated from `chorus/config.py` by `chorus config --reference > docs/config.md`; do not edit
by hand (a test fails when this file is stale).

Every role reads one TOML file (`--config FILE`); every key has a default, so the embedded
default needs no file at all. `chorus config --defaults` prints a commented file with every key
below. An environment variable `CHORUS_<SECTION>__<KEY>` overrides a key of the file (shown
in each row; a list of strings is comma-separated, other lists and tables are JSON, booleans
`true`/`false`/`1`/`0`), and a command-line flag (`--host`, `--port`, `--data-dir`) overrides
both. A `CHORUS_*` variable that names no key is an error (with the nearest key's name).

Values are strictly typed (`port = "8080"` is a string and is refused, like `port = true`) and
checked at start-up; every problem is reported at once, each naming its key, e.g. `chorus: config
key gateway.port: must be between 0 and 65535`. `chorus config --config FILE` checks a file
(and loads the moderation model it names) without starting anything.
"""


def toml_value(value: Any) -> str:
    """A default as it is written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """The whole reference: one table per section, keys in the order of chorus/config.py."""
    out = [INTRO]
    section: str | None = None
    for key, default, text in iter_defaults():
        head = key.rpartition(".")[0]
        if head != section:
            section = head
            title = f"`[{head}]`" if head else "Top level"
            out += ["", f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
        name = key.rpartition(".")[2]
        out.append(f"| `{name}`<br>`{env_name(key)}` | `{_cell(toml_value(default))}` | {_cell(text)} |")
    return "\n".join(out) + "\n"
