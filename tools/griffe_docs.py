"""Griffe extension for the API page: reST roles in docstrings become links or code.

The docstrings are written to read well in ``help()`` and editors, with roles
such as ``:class:`RingDilatedAttention```; mkdocstrings renders Markdown, so a role
whose target is on the API page becomes an autorefs link and any other one plain
code. Documented objects are the ``:::`` lines of ``docs/api.md``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dilated_attention_pytorch"
ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def _documented() -> set[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    return {line[4:].strip() for line in text.splitlines() if line.startswith("::: ")}


DOCUMENTED = _documented()


def _target(name: str) -> str | None:
    """The documented object a role names, or None."""
    parts = name.lstrip(".").split(".")
    if parts[0] == PACKAGE:
        parts = parts[1:]
    # the public name: dilated_attention_pytorch.X, or a member X.y of it
    for start in range(len(parts)):
        head = f"{PACKAGE}.{parts[start]}"
        if head in DOCUMENTED:
            rest = parts[start + 1 :]
            if any(p.startswith("_") for p in rest):
                return None
            return ".".join([head, *rest])
    return None


def convert_roles(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        short, name = m.group(1), m.group(2)
        shown = name.lstrip(".").split(".")[-1] if short else name.lstrip(".")
        target = _target(name)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"

    return ROLE.sub(repl, text)


class DocsExtension(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert_roles(obj.docstring.value)
