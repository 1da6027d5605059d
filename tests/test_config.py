"""The config tree: defaults, the TOML file, environment overrides and clear refusals."""

from pathlib import Path

import pytest

from chorus.cli import _config_from, build_parser, defaults_toml
from chorus.config import ConfigError, load_config


def test_defaults_are_the_embedded_default() -> None:
    cfg = load_config(env={})
    assert cfg.embedded
    assert (cfg.gateway.host, cfg.gateway.port) == ("127.0.0.1", 8080)
    assert cfg.history_path == Path(".chorus/history.sqlite3")


def test_file_then_environment_then_command_line(tmp_path: Path) -> None:
    f = tmp_path / "chorus.toml"
    f.write_text('[gateway]\nport = 9000\nallowed_origins = ["https://a.example"]\n')
    cfg = load_config(f, env={"CHORUS_GATEWAY__FLUSH_INTERVAL_MS": "20"})
    assert cfg.gateway.port == 9000
    assert cfg.gateway.allowed_origins == ("https://a.example",)
    assert cfg.gateway.flush_interval_ms == 20
    assert load_config(f, env={"CHORUS_GATEWAY__PORT": "9100"}).gateway.port == 9100  # env over the file
    cfg = load_config(f, env={"CHORUS_GATEWAY__PORT": "9100"}, gateway__port=9200)
    assert cfg.gateway.port == 9200  # the command line over both


@pytest.mark.parametrize("role", ["gateway", "run"])
def test_the_port_flag_wins_over_the_environment_and_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              role: str) -> None:
    """`chorus gateway --port 9001` as the CLI parses it: file < CHORUS_* environment < command line."""
    f = tmp_path / "chorus.toml"
    f.write_text('[gateway]\nport = 9000\n')
    base = [role, "--config", str(f), "--data-dir", str(tmp_path / "data")]
    monkeypatch.delenv("CHORUS_GATEWAY__PORT", raising=False)
    assert _config_from(build_parser().parse_args(base)).gateway.port == 9000  # the file over the default
    monkeypatch.setenv("CHORUS_GATEWAY__PORT", "9100")
    assert _config_from(build_parser().parse_args(base)).gateway.port == 9100  # the environment over the file
    assert _config_from(build_parser().parse_args([*base, "--port", "9001"])).gateway.port == 9001  # the flag wins


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[gateway]\nport = 70000\n", {}, "gateway.port: must be between 0 and 65535"),
        ('[gateway]\nport = "x"\n', {}, "gateway.port: expected int, got 'x'"),
        ('[gateway]\nport = "8080"\n', {}, "gateway.port: expected int, got '8080' (a string)"),
        ("[gateway]\nport = true\n", {}, "gateway.port: expected int, got True (a boolean)"),
        ("[gateway]\nport = 80.5\n", {}, "gateway.port: expected int, got 80.5"),
        ('[gateway]\nheartbeat_interval_s = "60"\n', {}, "gateway.heartbeat_interval_s: expected float"),
        ("[gateway]\npermessage_deflate = 1\n", {}, "gateway.permessage_deflate: expected bool"),
        ("[gateway]\nheartbeat_interval_s = 0\n", {}, "gateway.heartbeat_interval_s: must be in (0, 3600]"),
        ("[gateway]\nhandshake_timeout_s = -1.0\n", {}, "gateway.handshake_timeout_s: must be in (0, 600]"),
        ("[gateway]\nbacklog_limit_bytes = -4096\n", {}, "gateway.backlog_limit_bytes: must be >= 4096"),
        ("[gateway]\nrecent_on_welcome = -1\n", {}, "gateway.recent_on_welcome: must be 0-1000"),
        ("[auth]\ntoken_ttl_s = 0\n", {}, "auth.token_ttl_s: must be >= 1"),
        ('[kafka]\ntopic = ""\n', {}, "kafka.topic: must be 1-249"),
        ('log_level = "LOUD"\n', {}, "log_level: must be one of DEBUG, INFO, WARNING, ERROR"),
        ('log_format = "xml"\n', {}, 'log_format: must be "text" or "json"'),
        ('[auth]\nalgorithm = "RS256"\n', {}, "auth.algorithm: must be HS256, HS384 or HS512"),
        ('[kafka]\nbootstrap = "kafka-1"\n[redis]\nurl = "redis://r"\n', {}, "kafka.bootstrap: must be \"host:port\""),
        ('[kafka]\nbootstrap = "k:9092"\n[redis]\nurl = "r:6379"\n', {}, "redis.url: must be a redis://"),
        ('data_dir = ""\n', {}, "data_dir: must name a directory"),
        ("[gateway]\nprot = 1\n", {}, "gateway.prot: unknown key (did you mean gateway.port?)"),
        ("[gatway]\nport = 1\n", {}, "gatway: unknown key (did you mean gateway?)"),
        ("gateway = 3\n", {}, "gateway: expected a table, got 3"),
        ("", {"CHORUS_AUTH__ANONYMOUS_READ": "maybe"}, "auth.anonymous_read (from CHORUS_AUTH__ANONYMOUS_READ)"),
        ("", {"CHORUS_GATEWAY__PORT": "80x"}, "gateway.port (from CHORUS_GATEWAY__PORT): expected int"),
        ("", {"CHORUS_GATEWAY__PROT": "9000"},
         "environment variable CHORUS_GATEWAY__PROT: not a config key (did you mean CHORUS_GATEWAY__PORT?)"),
        ("", {"CHORUS_LOG_LEVL": "DEBUG"},
         "environment variable CHORUS_LOG_LEVL: not a config key (did you mean CHORUS_LOG_LEVEL?)"),
        ('[kafka]\nbootstrap = "k:9092"\n[redis]\nurl = "redis://r"\n', {}, "auth.key: set a key of your own"),
        ("[gateway\n", {}, "chorus.toml"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    f = tmp_path / "chorus.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, env=env)
    assert message in str(err.value)


def test_every_problem_of_a_file_is_listed_at_once(tmp_path: Path) -> None:
    f = tmp_path / "chorus.toml"
    f.write_text('[gateway]\nport = "8080"\nheartbeat_interval_s = 0\nprot = 1\n[limits]\nuser_per_minute = -1\n')
    with pytest.raises(ConfigError) as err:
        load_config(f, env={"CHORUS_VIEWERS__INTERVAL": "5"})
    assert len(err.value.problems) == 5, err.value.problems
    text = str(err.value)
    assert text.startswith("5 problems in the config:")
    for key in ("gateway.port", "gateway.heartbeat_interval_s", "gateway.prot", "limits.user_per_minute",
                "CHORUS_VIEWERS__INTERVAL: not a config key (did you mean CHORUS_VIEWERS__INTERVAL_MS?)"):
        assert key in text


def test_tooling_variables_and_command_line_values_are_accepted() -> None:
    tooling = {"CHORUS_PURE": "1", "CHORUS_TEST_KAFKA": "x", "CHORUS_KAFKA_HEAP": "1g"}  # scripts and tests
    cfg = load_config(env={**tooling, "CHORUS_LOG_LEVEL": "DEBUG"}, gateway__heartbeat_interval_s=1)
    assert cfg.log_level == "DEBUG" and cfg.gateway.heartbeat_interval_s == 1.0
    with pytest.raises(ConfigError, match="CHORUS_KAFKA__BOOTSTRP: not a config key"):
        load_config(env={"CHORUS_KAFKA__BOOTSTRP": "k:9092"})  # two underscores: meant as a key
    with pytest.raises(ConfigError, match=r"gateway\.prot \(from the command line\): unknown key"):
        load_config(env={}, gateway__prot=1)
    with pytest.raises(ConfigError, match=r"gateway\.port \(from the command line\): expected int"):
        load_config(env={}, gateway__port="9000")


def test_generated_reference_loads_back(tmp_path: Path) -> None:
    f = tmp_path / "defaults.toml"
    f.write_text(defaults_toml())
    assert load_config(f, env={}) == load_config(env={})
