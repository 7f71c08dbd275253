"""Where policy modules come from, and the load-time guard every engine applies.

A policy set is ``{module_id: rego_source}``. From a directory the module id
is the file's path relative to it (``identityd/decision.rego``), so ids are
stable across machines and sort the same everywhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from identityd.errors import ConfigError, PolicyCompileError

__all__ = ["load_policy_dir", "refuse_with"]

# Case files live next to the modules but are data, not policy.
_TESTS_DIR = "tests"

# One Rego token of interest per match: a comment, a string, a raw string, or
# an identifier. Anything between matches (operators, numbers, spaces) is
# irrelevant to the guard. An unterminated string does not match as a string,
# so its contents are scanned as code: the guard errs towards refusing.
_TOKEN = re.compile(
    r"""
      \#[^\n]*                      # comment to end of line
    | "(?:\\.|[^"\\\n])*"           # string literal with escapes
    | `[^`]*`                       # raw string, no escapes, may span lines
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)


def refuse_with(module_id: str, source: str) -> None:
    """Raise PolicyCompileError if ``source`` uses the keyword ``with``.

    ``with`` can crash the embedded engine's process (REGO_PORTABILITY.md), so
    no engine accepts it: a policy that loads in one engine loads in all.
    Comments, strings and identifiers that merely contain the word are fine.
    """
    for match in _TOKEN.finditer(source):
        if match.group("ident") == "with":
            line = source.count("\n", 0, match.start()) + 1
            raise PolicyCompileError(
                f"line {line}: the keyword 'with' is not allowed (REGO_PORTABILITY.md)",
                module=module_id,
            )


def load_policy_dir(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read every ``*.rego`` file under ``path`` (recursively), sorted by module id.

    Skips the top-level ``tests/`` folder and hidden entries: a ConfigMap mounted
    as a volume holds each file twice, once behind ``..data/``.
    Raises ConfigError when the directory is unreadable or holds no module.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError("POLICY_DIR_UNREADABLE", f"{root}: not a directory")
    modules: dict[str, str] = {}

    def walk_error(exc: OSError) -> None:
        raise ConfigError("POLICY_DIR_UNREADABLE", f"{exc.filename}: {exc.strerror}") from exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (here == root and d == _TESTS_DIR)
        )
        for name in filenames:
            if name.startswith(".") or not name.endswith(".rego"):
                continue
            file = here / name
            module_id = file.relative_to(root).as_posix()
            try:
                modules[module_id] = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError("POLICY_DIR_UNREADABLE", f"{module_id}: {exc}") from exc
    if not modules:
        raise ConfigError("POLICY_DIR_EMPTY", f"{root}: no *.rego files")
    return dict(sorted(modules.items()))
