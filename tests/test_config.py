"""The config tree: defaults, the TOML file, environment overrides and clear refusals."""

from pathlib import Path

import pytest

from chorus.cli import defaults_toml
from chorus.config import ConfigError, load_config


def test_defaults_are_the_embedded_default() -> None:
    cfg = load_config(env={})
    assert cfg.embedded
    assert (cfg.gateway.host, cfg.gateway.port) == ("127.0.0.1", 8080)
    assert cfg.history_path == Path(".chorus/history.sqlite3")


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "chorus.toml"
    f.write_text('[gateway]\nport = 9000\nallowed_origins = ["https://a.example"]\n')
    cfg = load_config(f, env={"CHORUS_GATEWAY__FLUSH_INTERVAL_MS": "20"})
    assert cfg.gateway.port == 9000
    assert cfg.gateway.allowed_origins == ("https://a.example",)
    assert cfg.gateway.flush_interval_ms == 20
    cfg = load_config(f, env={"CHORUS_GATEWAY__PORT": "9100"}, gateway__port=9200)
    assert cfg.gateway.port == 9100  # the environment wins over the file and the flags' defaults


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[gateway]\nport = 70000\n", {}, "gateway.port: must be between 0 and 65535"),
        ('[gateway]\nport = "x"\n', {}, "gateway.port: expected int, got 'x'"),
        ("[gateway]\nprot = 1\n", {}, "gateway.prot: unknown key"),
        ("", {"CHORUS_AUTH__ANONYMOUS_READ": "maybe"}, "auth.anonymous_read (from CHORUS_AUTH__ANONYMOUS_READ)"),
        ('[kafka]\nbootstrap = "k:9092"\n[redis]\nurl = "redis://r"\n', {}, "auth.key: set a key of your own"),
        ("[gateway\n", {}, "chorus.toml"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    f = tmp_path / "chorus.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(f, env=env)


def test_generated_reference_loads_back(tmp_path: Path) -> None:
    f = tmp_path / "defaults.toml"
    f.write_text(defaults_toml())
    assert load_config(f, env={}) == load_config(env={})
