"""Griffe extension for the API reference (mkdocs.yml): the docstrings' Sphinx roles as cross-references.

The package's docstrings name other objects the Sphinx way (:class:`~pkg.Name`, :func:`pkg.fn`,
:meth:`name`, ...). mkdocstrings renders Markdown, where such a role would show as literal text. This
extension rewrites every role into an *optional* mkdocs-autorefs reference: a link when the target
is rendered somewhere in the site, plain code otherwise (no warning), with relative names resolved
in the scope of the docstring's object, as Sphinx resolves them.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):`(?P<tilde>~?)(?P<target>[^`<>]+?)`")


def _resolve(obj: griffe.Object, target: str) -> str:
    target = target.lstrip(".")
    if "." in target and target.split(".")[0] in {"lightning_fedprune", "lightning", "torch", "torchaudio", "flwr"}:
        return target
    scope: Any = obj
    while scope is not None:
        try:
            return scope.resolve(target)
        except Exception:  # griffe raises NameResolutionError (or an alias error) when it is not in this scope
            scope = scope.parent
    return target


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring into optional autorefs."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None or ":`" not in docstring.value:
            return

        def replace(match: re.Match[str]) -> str:
            target = match["target"].strip()
            identifier = _resolve(obj, target)
            title = target.rsplit(".", 1)[-1] if match["tilde"] else target
            return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

        docstring.value = ROLE.sub(replace, docstring.value)
