"""Every argument the manifests pass to `identityd` is one the real CLI accepts.

The manifests are written for the final shape of issue 6 (cluster watch, OPA,
ConfigMap policies, leader election, the agent). Flags the CLI does not have
yet are listed in PENDING; once the CLI accepts one, the test asks for it to be
removed from PENDING, so the list only shrinks and every flag ends up checked.
"""

from __future__ import annotations

import argparse
import contextlib
import io

from deploy_support import K8S, K8S_PATCH, cli_parser, load_yaml_file, one, subcommand_parser

PENDING: dict[str, set[str]] = {
    "serve": set(),
    "sia": set(),
}


def manifest_commands() -> list[tuple[str, list[str]]]:
    """(where, args) of every container that runs identityd, as written."""
    base = load_yaml_file(K8S / "deployment.yaml")
    patch = load_yaml_file(K8S_PATCH / "sia.yaml")
    found = []
    for objs in (base, patch):
        spec = one(objs, "Deployment")["spec"]["template"]["spec"]
        for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
            if c["image"] == "identityd":
                found.append((c["name"], list(c["args"])))
    return found


def refused(parser: argparse.ArgumentParser | None, arg: str) -> bool:
    """Whether the parser refuses this one ``--flag[=value]`` on its own."""
    if parser is None:
        return True
    flag, has_value, value = arg.partition("=")
    action = parser._option_string_actions.get(flag)
    if action is None:
        return True
    if action.nargs == 0:
        return bool(has_value)
    try:
        converted = action.type(value) if callable(action.type) else value
    except (TypeError, ValueError):
        return True
    return action.choices is not None and converted not in action.choices


def test_manifests_run_identityd_serve_and_sia() -> None:
    commands = {args[0] for _, args in manifest_commands()}
    assert commands == {"serve", "sia"}


def test_manifest_arguments_are_flags_with_inline_values() -> None:
    # One token per flag keeps the check exact and the manifests greppable.
    for where, args in manifest_commands():
        for arg in args[1:]:
            assert arg.startswith("--"), f"{where}: {arg!r}"


def test_every_manifest_flag_is_accepted_or_pending() -> None:
    unknown = []
    for where, (command, *flags) in manifest_commands():
        parser = subcommand_parser(command)
        for arg in flags:
            flag = arg.partition("=")[0]
            if refused(parser, arg) and flag not in PENDING.get(command, set()):
                unknown.append(f"{where}: identityd {command} refuses {arg}")
    assert unknown == []


def test_pending_flags_are_still_pending() -> None:
    landed = []
    for where, (command, *flags) in manifest_commands():
        parser = subcommand_parser(command)
        for arg in flags:
            flag = arg.partition("=")[0]
            if flag in PENDING.get(command, set()) and not refused(parser, arg):
                landed.append(f"{where}: identityd {command} now accepts {arg}")
    assert landed == [], "remove these from PENDING in tests/deploy/test_deploy_cli_flags.py"


def test_the_accepted_arguments_parse_together() -> None:
    for where, (command, *flags) in manifest_commands():
        if subcommand_parser(command) is None:
            continue
        pending = PENDING.get(command, set())
        ready = [a for a in flags if a.partition("=")[0] not in pending]
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                cli_parser().parse_args([command, *ready])
            except SystemExit:
                raise AssertionError(f"{where}: {err.getvalue()}") from None


def test_refused_recognises_bad_flags_and_values() -> None:
    serve = subcommand_parser("serve")
    assert not refused(serve, "--workers=1")
    assert refused(serve, "--workers=one")
    assert refused(serve, "--log-level=LOUD")
    assert refused(serve, "--no-such-flag=1")
    assert refused(None, "--anything")
