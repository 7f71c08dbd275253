"""`identityd policy test [DIR]`: run the policy test cases (data) through the engine's
normal decision query and report each; exit 1 on any failure, 2 if the set will not load."""

from __future__ import annotations

import asyncio
from pathlib import Path

from identityd.errors import ConfigError
from identityd.policy.cases import format_report, load_cases, run_cases
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.sources import load_policy_dir


async def _run(directory: Path, verbose: bool) -> int:
    modules = load_policy_dir(directory)
    cases = load_cases(directory / "tests")
    engine = EmbeddedEngine()
    try:
        await engine.load(modules)
        results = await run_cases(engine, cases)
    finally:
        await engine.aclose()
    print(f"engine embedded (regopy): {len(modules)} modules, {len(results)} cases")
    print(format_report(results, verbose=verbose))
    return 0 if all(r.passed for r in results) else 1


def policy_test(directory: str, *, verbose: bool = False) -> int:
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError("CONFIG_ERROR", f"{directory}: not a directory")
    return asyncio.run(_run(path, verbose))
