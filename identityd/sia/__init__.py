"""The agent (SIA): bound token → key + CSR → ZTS register/refresh → files, kept fresh.

Entry points: :func:`identityd.sia.main.sia_main` / :func:`identityd.sia.main.add_arguments`
for the CLI, :func:`identityd.sia.main.agent_once` for the local stack, and
:class:`identityd.sia.agent.Agent` for code. See docs/agent-and-dev-ca.md.
"""
