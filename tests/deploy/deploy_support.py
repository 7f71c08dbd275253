"""Helpers for the deployment checks, and the generator of the two files that
must not drift from their sources:

- ``k8s/policies/*.rego``: a copy of the ``policies/`` modules, because kustomize
  refuses files outside its root (symlinks included);
- ``docs/configuration.md``: the configuration reference, from the CLI's own
  option table and argument parser.

Regenerate both after changing ``policies/`` or an option::

    .venv/bin/python tests/deploy/deploy_support.py --write
    .venv/bin/python tests/deploy/deploy_support.py --check   # exit 1 when stale
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from identityd.cli import main as cli_main
from identityd.cli.options import ENV_PREFIX, OPTIONS, Option
from identityd.policy.sources import load_policy_dir
from identityd.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
K8S_PATCH = K8S / "patch"
K8S_POLICIES = K8S / "policies"
POLICIES = REPO / "policies"
CONFIG_DOC = REPO / "docs" / "configuration.md"
OPERATOR_GUIDE = REPO / "docs" / "operator-guide.md"
SYSTEM_NAMESPACE = "identityd-system"
POLICY_LABEL = ("openpolicyagent.org/policy", "rego")
# Set by scripts/ci-deploy-checks.sh: a missing kubectl is then a failure, not a skip.
REQUIRE_KUBECTL_ENV = "IDENTITYD_REQUIRE_KUBECTL"
REGENERATE = "run `.venv/bin/python tests/deploy/deploy_support.py --write`"

Obj = dict[str, Any]


# ---------------------------------------------------------------- rendering


class KubectlMissing(Exception):
    pass


def kubectl() -> str:
    """The kubectl to render with: $KUBECTL, else the one on PATH."""
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        raise KubectlMissing(
            "kubectl not found (Debian: apt-get install kubernetes-client; "
            "scripts/ci-deploy-checks.sh installs it)"
        )
    return found


def render(kustomization: Path) -> list[Obj]:
    """`kubectl kustomize DIR`, parsed; raises with kubectl's stderr on failure."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def load_yaml_file(path: Path) -> list[Obj]:
    """The objects of a manifest file as written (no kustomize)."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def find(objs: Sequence[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objs if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: Sequence[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objs, kind, name)
    if len(found) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def all_containers(workload: Obj) -> Iterator[Obj]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def container(workload: Obj, name: str) -> Obj:
    for c in all_containers(workload):
        if c["name"] == name:
            return c
    raise LookupError(f"no container {name!r} in {workload['metadata']['name']}")


def flag_values(args: Sequence[str], flag: str) -> list[str]:
    """Values of ``--flag=value`` arguments (the manifests use only that form)."""
    prefix = flag + "="
    return [a[len(prefix) :] for a in args if a.startswith(prefix)]


# ---------------------------------------------------------------- policies


def policy_files() -> dict[str, str]:
    """``{ConfigMap key: Rego source}`` for every module identityd loads from
    ``policies/`` (same loader, so the test cases folder is left out)."""
    files: dict[str, str] = {}
    for module_id, source in load_policy_dir(POLICIES).items():
        key = PurePosixPath(module_id).name
        if key in files:
            raise ValueError(f"two policy modules named {key}: ConfigMap keys must be unique")
        files[key] = source
    return files


def policy_copy_problems(copy: Path = K8S_POLICIES) -> list[str]:
    """How the copy (k8s/policies/) differs from policies/ (empty when in sync)."""
    want = policy_files()
    have = {p.name: p.read_text(encoding="utf-8") for p in sorted(copy.glob("*"))}
    problems = [f"{k} is missing from the copy" for k in sorted(set(want) - set(have))]
    problems += [f"{k} is in the copy only" for k in sorted(set(have) - set(want))]
    problems += [
        f"{k} differs from policies/" for k in sorted(set(want) & set(have)) if want[k] != have[k]
    ]
    return problems


# The configMapGenerator's file list in k8s/kustomization.yaml: one
# "      - policies/<name>" line per module, rewritten in place (comments kept).
_GENERATOR_FILES = re.compile(r"(?m)^(?:      - policies/[^\n]+\n)+")


def kustomization_with_policies(text: str) -> str:
    lines = "".join(f"      - policies/{name}\n" for name in sorted(policy_files()))
    updated, count = _GENERATOR_FILES.subn(lines, text)
    if count != 1:
        raise ValueError("k8s/kustomization.yaml: expected one list of policies/ files")
    return updated


def write_policy_copy() -> None:
    want = policy_files()
    K8S_POLICIES.mkdir(exist_ok=True)
    for stale in K8S_POLICIES.glob("*"):
        if stale.name not in want:
            stale.unlink()
    for key, source in want.items():
        (K8S_POLICIES / key).write_text(source, encoding="utf-8")
    kustomization = K8S / "kustomization.yaml"
    text = kustomization.read_text(encoding="utf-8")
    kustomization.write_text(kustomization_with_policies(text), encoding="utf-8")


# ---------------------------------------------------------------- configuration reference


def cli_parser() -> argparse.ArgumentParser:
    # The real parser of the `identityd` command (private name in cli/main.py).
    return cli_main.build_parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def subcommand_parser(*path: str) -> argparse.ArgumentParser | None:
    parser: argparse.ArgumentParser | None = cli_parser()
    for name in path:
        parser = subcommands(parser).get(name) if parser is not None else None
    return parser


def _settings_field(target: str) -> dataclasses.Field[Any]:
    cls: Any = Settings
    *sections, name = target.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise LookupError(f"Settings has no field {target}")


def _literal(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list):
        return f"`{','.join(str(v) for v in value)}`" if value else "(none)"
    return f"`{value}`"


def _option_default(opt: Option) -> str:
    f = _settings_field(opt.target)
    if f.default is not dataclasses.MISSING:
        return _literal(f.default)
    return "computed (see description)"


_TYPE_NAMES = {"str": "string", "int": "integer", "float": "number", "_bool": "boolean"}


def _value_kind(type_: Any, choices: Sequence[str] | None, repeat: bool) -> str:
    if choices:
        kind = " \\| ".join(f"`{c}`" for c in choices)
    else:
        name = getattr(type_, "__name__", "string") if type_ is not None else "str"
        kind = _TYPE_NAMES.get(name, name.lstrip("_"))
    return kind + (", repeatable" if repeat else "")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _option_rows() -> list[str]:
    rows = [
        "| flag | environment variable | config key | value | default | description |",
        "|---|---|---|---|---|---|",
    ]
    for opt in OPTIONS:
        rows.append(
            f"| `{opt.flag}` | `{opt.env}` | `{opt.key}` "
            f"| {_value_kind(opt.type, opt.choices, opt.repeat)} "
            f"| {_option_default(opt)} | {_cell(opt.help)} |"
        )
    return rows


def _action_rows(parser: argparse.ArgumentParser, skip: set[str]) -> list[str]:
    rows: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if set(action.option_strings) & skip:
            continue
        name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        if action.nargs == 0:
            kind = "switch"
        else:
            repeat = isinstance(action, argparse._AppendAction)
            kind = _value_kind(action.type, action.choices, repeat)  # type: ignore[arg-type]
        if action.required:
            default = "required"
        elif action.default in (None, False, argparse.SUPPRESS):
            default = "(unset)"
        else:
            default = _literal(action.default)
        rows.append(f"| {name} | {kind} | {default} | {_cell(action.help or '')} |")
    return rows


def _command_sections(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> list[str]:
    table_flags = {o.flag for o in OPTIONS} | {"--config"}
    lines: list[str] = []
    for name, sub in subcommands(parser).items():
        here = (*path, name)
        flags = {s for a in sub._actions for s in a.option_strings}
        takes_table = table_flags <= flags
        rows = _action_rows(sub, table_flags if takes_table else set())
        nested = subcommands(sub)
        if rows or not nested:
            lines += ["", f"### `identityd {' '.join(here)}`", ""]
            if takes_table:
                lines += (
                    ["Takes every server option above, and:", ""]
                    if rows
                    else ["Takes every server option above."]
                )
            elif not rows:
                lines += ["No options."]
            if rows:
                lines += ["| option | value | default | description |", "|---|---|---|---|"]
                lines += rows
        lines += _command_sections(sub, here)
    return lines


def configuration_doc() -> str:
    """docs/configuration.md, generated from the CLI's option table and parser."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `tests/deploy/deploy_support.py --write` from",
        "     identityd.cli.options.OPTIONS and the `identityd` argument parser.",
        "     Do not edit: tests/deploy fails when this file and the CLI differ. -->",
        "",
        "`identityd serve` (and `identityd decide`, which runs one request through",
        "the same pipeline) read each option below from, highest precedence first:",
        "",
        "1. the command-line flag;",
        f"2. the environment variable (`{ENV_PREFIX}` + the flag in capitals, `-` → `_`);",
        "3. the key in the `--config` file (YAML, or JSON when the name ends in",
        "   `.json`), spelt like the flag without `--` or with `_` for `-`;",
        "4. the default.",
        "",
        "Repeatable options take the flag several times, a comma-separated list in",
        "the environment, and a list (or a comma-separated string) in the file. An",
        "unknown key in the file is an error.",
        "",
        f"`--config FILE` (environment `{ENV_PREFIX}CONFIG`) names that file.",
        "",
        "## Server options",
        "",
        *_option_rows(),
        "",
        "## Other environment variables",
        "",
        "| variable | meaning |",
        "|---|---|",
        "| `PROMETHEUS_MULTIPROC_DIR` | with `--workers` > 1, where the workers keep"
        " their metric values (default: a new temporary directory) |",
        "",
        "## Commands",
        *_command_sections(cli_parser(), ()),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the files")
    mode.add_argument("--check", action="store_true", help="exit 1 when a file is stale")
    args = parser.parse_args(argv)
    if args.write:
        write_policy_copy()
        CONFIG_DOC.write_text(configuration_doc(), encoding="utf-8")
        print(f"wrote {K8S_POLICIES.relative_to(REPO)}/ and {CONFIG_DOC.relative_to(REPO)}")
        return 0
    problems = policy_copy_problems()
    kustomization = (K8S / "kustomization.yaml").read_text(encoding="utf-8")
    if kustomization_with_policies(kustomization) != kustomization:
        problems.append("k8s/kustomization.yaml does not list every policy module")
    if CONFIG_DOC.read_text(encoding="utf-8") != configuration_doc():
        problems.append(f"{CONFIG_DOC.relative_to(REPO)} is stale")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
