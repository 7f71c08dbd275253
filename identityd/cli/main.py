"""`identityd` command line: serve, decide, policy test, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from identityd import __version__
from identityd.cli.options import add_options, settings_from_args
from identityd.errors import ConfigError

EXIT_OK, EXIT_USAGE, EXIT_DENY, EXIT_UNAVAILABLE = 0, 2, 3, 4


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also read by the deployment and documentation checks)."""
    parser = argparse.ArgumentParser(prog="identityd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"identityd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the callback server")
    add_options(serve)

    decide = sub.add_parser("decide", help="offline dry run of one callback: print the decision")
    decide.add_argument(
        "--request", required=True, help="InstanceConfirmation JSON file (- = stdin)"
    )
    decide.add_argument("--kind", choices=("instance", "refresh"), default="instance")
    decide.add_argument(
        "--at", type=float, default=None, help="evaluate as of this Unix time (default: now)"
    )
    add_options(decide)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    ptest = policy_sub.add_parser("test", help="run the policy test cases of a directory")
    ptest.add_argument("directory", nargs="?", default="policies")
    ptest.add_argument("-v", "--verbose", action="store_true", help="show passing cases too")

    demo = sub.add_parser("demo", help="run the whole flow on loopback and print each decision")
    demo.add_argument("--policies", default=None, help="policy directory (default: bundled)")

    from identityd.devca.server import add_arguments as devca_arguments
    from identityd.sia.main import add_arguments as sia_arguments

    sia_arguments(
        sub.add_parser(
            "sia",
            help="the identity agent: key, CSR, certificate (init container --once, or sidecar)",
        )
    )
    devca_arguments(
        sub.add_parser(
            "dev-ca", help="a DEVELOPMENT CA speaking ZTS's register API (not for production)"
        )
    )
    return parser



def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from identityd.cli.serve import serve

            return serve(settings_from_args(args))
        if args.command == "decide":
            from identityd.cli.decide import decide

            return decide(settings_from_args(args), args.request, args.kind, args.at)
        if args.command == "policy":
            from identityd.cli.policy_test import policy_test

            return policy_test(args.directory, verbose=args.verbose)
        if args.command == "sia":
            from identityd.sia.main import sia_main

            return sia_main(args)
        if args.command == "dev-ca":
            from identityd.devca.server import devca_main

            return devca_main(args)
        if args.command == "demo":
            from identityd.cli.demo import demo

            return demo(args.policies)
    except ConfigError as exc:
        print(f"identityd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
