"""The G4 knobs: exactly the five ``remote_*`` keys, from extra config or ``KVTIER_REMOTE_*``,
checked at start with messages that name the knob and never show a password."""

from __future__ import annotations

import pytest

from kvtier.config import KvTierConfig, ModelConfig
from kvtier.settings import KvTierSettings, SettingsError, load_settings
from kvtier.storage.remote import RemoteConfig

MODEL = ModelConfig(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64)


def remote_config_from(settings: KvTierSettings) -> RemoteConfig | None:
    """The G4 part of the one configuration root these knobs build."""
    return KvTierConfig.from_settings(settings, MODEL).remote


def test_defaults_leave_g4_off() -> None:
    s = load_settings({}, environ={})
    assert s.remote_url is None and remote_config_from(s) is None
    assert (s.remote_ttl_s, s.remote_timeout_ms, s.remote_max_write_queue_mb) == (0, 100, 256.0)


def test_extra_config_and_environment() -> None:
    env = {"KVTIER_REMOTE_URL": "rediss://cache:6380/2", "KVTIER_REMOTE_PASSWORD": "pw",
           "KVTIER_REMOTE_TTL_S": "3600", "KVTIER_REMOTE_TIMEOUT_MS": "250",
           "KVTIER_REMOTE_MAX_WRITE_QUEUE_MB": "64"}  # fmt: skip
    s = load_settings({}, environ=env)
    cfg = remote_config_from(s)
    assert cfg is not None
    assert (cfg.url, cfg.password, cfg.ttl_s, cfg.timeout_ms) == (
        "rediss://cache:6380/2", "pw", 3600, 250,
    )  # fmt: skip
    assert cfg.endpoint.tls and cfg.endpoint.db == 2 and s.remote_max_write_queue_mb == 64
    assert "pw" not in repr(s)
    s = load_settings({"remote_url": "redis+cluster://n1:7000"}, environ=env)
    assert s.remote_url == "redis+cluster://n1:7000" and remote_config_from(s) is not None


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"remote_url": "memcached://h:1"}, "remote_url"),
        ({"remote_url": "redis+cluster://h:1/3"}, "database number"),
        ({"remote_timeout_ms": 0}, "remote_timeout_ms"),
        ({"remote_ttl_s": -1}, "remote_ttl_s"),
        ({"remote_max_write_queue_mb": "lots"}, "remote_max_write_queue_mb"),
        ({"remote_passwd": "x"}, "unknown"),
    ],
)
def test_bad_values_are_refused_naming_the_knob(extra: dict[str, object], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        load_settings(extra, environ={})


def test_a_password_in_a_bad_url_is_not_shown() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({"remote_url": "redis://:hunter2@h:1/x"}, environ={})
    assert "hunter2" not in str(err.value)
