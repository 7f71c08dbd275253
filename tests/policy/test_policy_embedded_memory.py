"""Memory per embedded decision, in a fresh process importing things in the server's
order: identityd (which loads regopy's native library first), then aiohttp.

Loaded after the system libstdc++, regopy's own operator new/delete leak 50-200 KB
per evaluation; this guards the import order that prevents it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

PROBE = textwrap.dedent("""
    import identityd, aiohttp, asyncio
    from identityd.policy.embedded import EmbeddedEngine
    from identityd.policy.sources import load_policy_dir
    from identityd.policy.cases import load_cases

    def rss_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1])

    async def main():
        engine = EmbeddedEngine()
        await engine.load(load_policy_dir("policies"))
        cases = load_cases("policies/tests")
        allow = next(c for c in cases if c.expected.allow).input
        deny = next(c for c in cases if not c.expected.allow).input
        for _ in range(200):
            await engine.evaluate(allow)
        before = rss_kb()
        for _ in range(1000):
            await engine.evaluate(allow)
            await engine.evaluate(deny)
        print((rss_kb() - before) / 2000)
        await engine.aclose()

    asyncio.run(main())
""")


def test_decisions_do_not_grow_native_memory_in_server_import_order() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    kb_per_decision = float(out.stdout.strip())
    # Leaking, this is 50-200 KB; healthy, well under 1 KB (allocator noise).
    assert kb_per_decision < 2.0, kb_per_decision
