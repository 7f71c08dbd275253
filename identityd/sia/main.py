"""`identityd sia`: the agent's command line (the CLI wires :func:`add_arguments` and
:func:`sia_main`; the local stack calls :func:`agent_once`).

Exit codes follow `identityd`'s: 0 certificate written (or loop stopped), 2 bad
configuration, 3 refused by the CA (its reason printed), 4 CA unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from identityd.errors import ConfigError, Denied, IdentitydError, Unavailable
from identityd.sia.agent import Agent, Issued
from identityd.sia.config import AgentConfig, add_arguments, config_from_args

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_UNAVAILABLE = 0, 2, 3, 4

__all__ = ["add_arguments", "agent_once", "sia_main"]


def describe(issued: Issued) -> str:
    facts = issued.facts
    verb = "refreshed" if issued.kind == "refresh" else "registered"
    return (
        f"{verb}: certificate for {facts.common_name} (instance {issued.plan.instance_id}, "
        f"serial {facts.serial:x}) valid until {facts.not_after.isoformat()}, "
        f"written to {issued.directory.parent}"
    )


def outcome(exc: IdentitydError) -> tuple[int, str]:
    """Exit code and one-line message for a failure."""
    if isinstance(exc, Denied):
        return EXIT_REFUSED, f"refused by the CA: {exc.detail or exc.code}"
    if isinstance(exc, Unavailable):
        return EXIT_UNAVAILABLE, f"CA unavailable: {exc}"
    return EXIT_USAGE, str(exc)


async def _once(config: AgentConfig) -> tuple[int, str]:
    try:
        issued = await Agent(config).run_once()
    except IdentitydError as exc:
        return outcome(exc)
    return EXIT_OK, describe(issued)


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as a value instead of printing and exiting the process."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError("CONFIG_ERROR", message)


async def agent_once(argv: Sequence[str], env: Mapping[str, str]) -> tuple[int, str]:
    """Run the agent once as ``identityd sia --once <argv>`` would, in a pod whose
    downward-API environment is ``env``; return the exit code and its message."""
    parser = _Parser(prog="identityd sia")
    add_arguments(parser)
    try:
        config = config_from_args(parser.parse_args([*argv, "--once"]), env)
    except ConfigError as exc:
        return EXIT_USAGE, str(exc)
    return await _once(config)


async def _loop(config: AgentConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Agent(config).run(stop)
    return EXIT_OK


def sia_main(args: argparse.Namespace) -> int:
    """Entry point for ``identityd sia`` (``args`` from a parser given :func:`add_arguments`)."""
    level = logging.getLevelNamesMapping().get(str(args.log_level).upper())
    if level is None:
        print(f"identityd sia: --log-level: unknown level {args.log_level!r}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args, os.environ)
    except ConfigError as exc:
        print(f"identityd sia: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if not config.once:
            return asyncio.run(_loop(config))
        code, message = asyncio.run(_once(config))
    except KeyboardInterrupt:
        return 130
    print(f"identityd sia: {message}", file=sys.stderr if code else sys.stdout)
    return code
