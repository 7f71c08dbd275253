"""Options come from flags, IDENTITYD_* variables and --config, in that order."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from identityd.cli.options import OPTIONS, add_options, settings_from_args
from identityd.errors import ConfigError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser)
    return parser.parse_args(argv)


def test_defaults_when_nothing_is_given() -> None:
    s = settings_from_args(parse([]), environ={})
    assert s.identity.provider == "sys.auth.k8s" and s.engine == "embedded"


def test_flag_beats_env_beats_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "provider: from.file\ntrust-domain: file.td\ndns_suffix: [a.example, b.example]\n"
        "max-body-bytes: 1000\n"
    )
    env = {
        "IDENTITYD_PROVIDER": "from.env",
        "IDENTITYD_TRUST_DOMAIN": "env.td",
        "IDENTITYD_AUDIENCE": "one, two",
    }
    s = settings_from_args(parse(["--config", str(cfg), "--provider", "from.flag"]), environ=env)
    assert s.identity.provider == "from.flag"
    assert s.identity.trust_domain == "env.td"
    assert s.identity.dns_suffixes == ("a.example", "b.example")
    assert s.tokens.audiences == ("one", "two")
    assert s.max_body_bytes == 1000


def test_repeatable_flags_accumulate() -> None:
    s = settings_from_args(
        parse(["--dns-suffix", "a", "--dns-suffix", "b", "--allowed-client", "zts.example"]),
        environ={},
    )
    assert s.identity.dns_suffixes == ("a", "b")
    assert s.tls.allowed_clients == ("zts.example",)


def test_json_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"allow-refresh": False, "cert-expiry-minutes": 30}))
    s = settings_from_args(parse(["--config", str(cfg)]), environ={})
    assert s.identity.allow_refresh is False and s.identity.cert_expiry_minutes == 30


@pytest.mark.parametrize(
    ("content", "env"),
    [
        ("nope: 1\n", {}),
        ("- a\n", {}),
        ("max-body-bytes: lots\n", {}),
        ("", {"IDENTITYD_WORKERS": "zero"}),
        ("", {"IDENTITYD_WORKERS": "0"}),
        ("", {"IDENTITYD_ALLOW_REFRESH": "maybe"}),
        ("", {"IDENTITYD_CERT_USAGE": "both"}),
        ("", {"IDENTITYD_TLS_RELOAD_INTERVAL": "-1"}),
        ("", {"IDENTITYD_TLS_RELOAD_INTERVAL": "nan"}),
    ],
)
def test_bad_configuration_is_a_config_error(
    tmp_path: Path, content: str, env: dict[str, str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    with pytest.raises(ConfigError):
        settings_from_args(parse(["--config", str(cfg)]), environ=env)


def test_every_option_has_a_distinct_env_variable_and_target() -> None:
    assert len({o.env for o in OPTIONS}) == len(OPTIONS)
    assert len({o.target for o in OPTIONS}) == len(OPTIONS)
