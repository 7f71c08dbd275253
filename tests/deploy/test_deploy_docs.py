"""The configuration reference is generated from the CLI and must be current;
the operator guide names every metric identityd exports and every reason code
of the policy contract, and its links resolve."""

from __future__ import annotations

import re

from deploy_support import (
    CONFIG_DOC,
    OPERATOR_GUIDE,
    REGENERATE,
    REPO,
    configuration_doc,
    subcommand_parser,
)

from identityd.cli.options import OPTIONS
from identityd.metrics import Metrics

POLICY_README = REPO / "policies" / "README.md"


def test_configuration_reference_matches_the_cli() -> None:
    assert CONFIG_DOC.read_text(encoding="utf-8") == configuration_doc(), REGENERATE


def test_configuration_reference_names_every_flag_and_variable() -> None:
    doc = configuration_doc()
    for opt in OPTIONS:
        assert f"`{opt.flag}`" in doc and f"`{opt.env}`" in doc, opt.flag


def test_every_serve_flag_comes_from_the_option_table() -> None:
    # A flag added to `serve` outside OPTIONS would have no environment variable.
    serve = subcommand_parser("serve")
    assert serve is not None
    flags = {s for a in serve._actions for s in a.option_strings if s.startswith("--")}
    assert flags == {o.flag for o in OPTIONS} | {"--config", "--help"}


def exported_metrics() -> set[str]:
    """Every family the server registers: the core ones, the watch's and TokenReview's."""
    from identityd.inventory.watch import WatchMetrics
    from identityd.tokens.tokenreview import TokenReviewMetrics

    metrics = Metrics()
    WatchMetrics(metrics.registry)
    TokenReviewMetrics(metrics.registry)
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_the_guide_names_every_metric_and_no_other() -> None:
    guide = OPERATOR_GUIDE.read_text(encoding="utf-8")
    mentioned = {
        re.sub(r"_(bucket|sum|count|created)$", "", m)
        for m in re.findall(r"\bidentityd_[a-z_]+[a-z]", guide)
    }
    assert exported_metrics() == mentioned


def reason_codes() -> set[str]:
    """The code column of every table in policies/README.md."""
    codes = set()
    for line in POLICY_README.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            codes |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    return codes


def test_the_guide_troubleshoots_every_reason_code() -> None:
    guide = OPERATOR_GUIDE.read_text(encoding="utf-8")
    codes = reason_codes()
    assert len(codes) > 30
    missing = sorted(c for c in codes if f"`{c}`" not in guide)
    assert missing == []


def test_the_guide_links_resolve() -> None:
    guide = OPERATOR_GUIDE.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", guide)
    assert "../policies/README.md" in targets and "configuration.md" in targets
    for target in targets:
        assert (OPERATOR_GUIDE.parent / target).exists(), target
