"""A policy set as OPA's REST API can take it: one module per package.

OPA compiles each ``PUT /v1/policies/{id}`` together with the modules it already
holds and refuses a module that calls a function or reads a rule defined in a
module not pushed yet (open-policy-agent/opa#207). Modules of one package that use
each other's rules, as the default policies do both ways, cannot be pushed one at a
time in any order. So the modules of a package are pushed as one: the package and
the union of their imports at the top, then each module's text with its own
``package`` and ``import`` lines commented out in place, so that no row moves. A
row OPA reports in the merged text maps back to the module and row it came from.

Pure: text in, text out. The embedded engine takes the modules as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from identityd.errors import PolicyCompileError

__all__ = ["MergedPackage", "merge_by_package"]

_PACKAGE = re.compile(r"^\s*package\s+(\S+?)\s*(?:#.*)?$")
_IMPORT = re.compile(r"^\s*import\s+(\S+?)(?:\s+as\s+([A-Za-z_][A-Za-z0-9_]*))?\s*(?:#.*)?$")
_SKIPPED = re.compile(r"^\s*(?:#.*)?$")  # blank or a comment
# A package path as a policy id; any other (quoted parts) gets a numbered id.
_PLAIN_PACKAGE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")
# Imports that name no document: several modules may carry them.
_KEYWORD_IMPORTS = re.compile(r"^(?:rego\.v1|future\.keywords(?:\.\w+)?)$")


@dataclass(frozen=True, slots=True)
class _Part:
    module_id: str
    first_row: int  # the merged row of the module's row 1
    rows: int


@dataclass(frozen=True, slots=True)
class MergedPackage:
    """The modules of one package as one OPA policy."""

    policy_id: str
    package: str
    source: str
    parts: tuple[_Part, ...]

    @property
    def module_ids(self) -> tuple[str, ...]:
        return tuple(part.module_id for part in self.parts)

    def locate(self, row: int) -> tuple[str, int] | None:
        """(module id, row in that module) of a row of the merged text; None for the
        header rows, which no module wrote."""
        for part in self.parts:
            if part.first_row <= row < part.first_row + part.rows:
                return part.module_id, row - part.first_row + 1
        return None


@dataclass(frozen=True, slots=True)
class _Header:
    package: str
    imports: tuple[tuple[str, str | None], ...]  # (path, alias)
    header_rows: frozenset[int]  # 0-based rows of the package and import lines


def merge_by_package(modules: Mapping[str, str]) -> dict[str, MergedPackage]:
    """``{policy_id: MergedPackage}`` for ``{module_id: source}``, in the modules'
    order. PolicyCompileError names the module whose header cannot be merged."""
    headers = {module_id: _header(module_id, source) for module_id, source in modules.items()}
    by_package: dict[str, list[str]] = {}
    for module_id, header in headers.items():
        by_package.setdefault(header.package, []).append(module_id)
    merged: dict[str, MergedPackage] = {}
    for number, (package, module_ids) in enumerate(by_package.items()):
        policy_id = f"package/{package}" if _PLAIN_PACKAGE.match(package) else f"package/{number}"
        merged[policy_id] = _merge(policy_id, package, module_ids, modules, headers)
    return merged


def _merge(
    policy_id: str,
    package: str,
    module_ids: list[str],
    modules: Mapping[str, str],
    headers: Mapping[str, _Header],
) -> MergedPackage:
    imports: dict[str, str] = {}  # import line -> the module that brought it
    aliases: dict[str, tuple[str, str]] = {}  # alias -> (path, module)
    for module_id in module_ids:
        for path, alias in headers[module_id].imports:
            line = f"import {path}" + (f" as {alias}" if alias else "")
            if _KEYWORD_IMPORTS.match(path):
                imports.setdefault(line, module_id)
                continue
            name = alias or path.rsplit(".", 1)[-1]
            known = aliases.setdefault(name, (path, module_id))
            if known[0] != path:
                raise PolicyCompileError(
                    f"import '{name}' names {path} here but {known[0]} in {known[1]}; the "
                    f"modules of package {package} go to OPA as one module, so an import "
                    "name must mean the same in all of them",
                    module=module_id,
                )
            imports.setdefault(line, module_id)
    lines = [f"package {package}", *imports]
    parts: list[_Part] = []
    for module_id in module_ids:
        lines.append(f"# --- module {module_id}")
        own = modules[module_id].split("\n")
        parts.append(_Part(module_id, len(lines) + 1, len(own)))
        skip = headers[module_id].header_rows
        lines.extend(f"# {line}" if row in skip else line for row, line in enumerate(own))
    return MergedPackage(policy_id, package, "\n".join(lines) + "\n", tuple(parts))


def _header(module_id: str, source: str) -> _Header:
    """The package and imports at the top of a module (comments and blank lines may
    come between them); the first other line ends the header."""
    package: str | None = None
    imports: list[tuple[str, str | None]] = []
    rows: set[int] = set()
    for row, line in enumerate(source.split("\n")):
        if _SKIPPED.match(line):
            continue
        if package is None:
            found = _PACKAGE.match(line)
            if found is None:
                break
            package = found.group(1)
        else:
            found = _IMPORT.match(line)
            if found is None:
                break
            imports.append((found.group(1), found.group(2)))
        rows.add(row)
    if package is None:
        raise PolicyCompileError(
            "the module does not start with a package declaration", module=module_id
        )
    return _Header(package, tuple(imports), frozenset(rows))
