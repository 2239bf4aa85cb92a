"""MkDocs hooks: publish the benchmark results and examples the docs link to.

The pages link to ``../benchmarks/results/...`` and ``../examples/...`` so the
links also work when reading docs/ on a code host; the site gets those files
under ``benchmarks/results/`` and ``examples/`` and the links are rewritten.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = {"benchmarks/results": ("*.png", "*.json", "*.txt"), "examples": ("*.py",)}
LINK = re.compile(r"\]\(\.\./(benchmarks/results/|examples/)")


def on_files(files: Files, config) -> Files:
    for folder, patterns in PUBLISHED.items():
        for pattern in patterns:
            for path in sorted((ROOT / folder).glob(pattern)):
                rel = path.relative_to(ROOT).as_posix()
                files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    return LINK.sub(r"](\1", markdown)
