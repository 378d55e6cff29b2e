"""The repository's own documents link only to files it ships (a clone has no ``../shared``)."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURE = os.path.join(ROOT, "docs", "architecture.md")


def test_architecture_document_names_only_shipped_files():
    text = open(ARCHITECTURE, encoding="utf-8").read()
    assert "../shared" not in text and "DESIGN.md" not in text
    paths = set(re.findall(r"`((?:lightning_xai|examples|docs|tests|benchmarks)?/?[\w./-]+\.(?:py|md|yaml))`", text))
    assert paths, "the document names the modules it describes"
    for path in paths:
        candidates = [os.path.join(ROOT, path), os.path.join(ROOT, "lightning_xai", path)]
        assert any(os.path.exists(c) for c in candidates), f"docs/architecture.md names {path}, which is not shipped"
    # the shared plumbing modules it documents exist
    for module in ("checks.py", "distributed.py", "batch.py", "namespace.py"):
        assert f"lightning_xai/{module}" in text and os.path.exists(os.path.join(ROOT, "lightning_xai", module))


def test_viz_and_cli_docstrings_do_not_point_outside_the_repository():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "lightning_xai", "viz")):
        for name in files:
            if name.endswith(".py"):
                offenders.append(os.path.join(folder, name))
    offenders.append(os.path.join(ROOT, "lightning_xai", "cli.py"))
    bad = [p for p in offenders if re.search(r"\.\./shared|DESIGN\.md", open(p, encoding="utf-8").read())]
    assert not bad, bad
