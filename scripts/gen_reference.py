"""Generates docs/reference.md: every public constructor argument with its default and description.

    python scripts/gen_reference.py            # rewrite docs/reference.md
    python scripts/gen_reference.py --check    # exit 1 if it is out of date (used by the tests)
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

CLASSES = [
    "lightning_fedprune.FederatedLightningModule",
    "lightning_fedprune.FederatedDataModule",
    "lightning_fedprune.callbacks.SparsityRampCallback",
    "lightning_fedprune.callbacks.MaskRefinementCallback",
    "lightning_fedprune.callbacks.AdaptiveLayerSparsity",
    "lightning_fedprune.callbacks.FineTuneFreeze",
    "lightning_fedprune.callbacks.RunSummary",
    "lightning_fedprune.callbacks.PruningImages",
    "lightning_fedprune.callbacks.FederatedProgressBar",
    "lightning_fedprune.ProcessPoolExecutor",
    "lightning_fedprune.federated.flower.FlowerExecutor",
    "lightning_fedprune.baselines.FederatedDropout",
    "lightning_fedprune.baselines.PruneFL",
    "lightning_fedprune.ablation.record.CellRecord",
    "lightning_fedprune.asr.datamodule.ASRDataModule",
    "lightning_fedprune.asr.synthetic.CorpusConfig",
    "lightning_fedprune.asr.conformer_transducer.ConformerTransducer",
]
OUT = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def _load(path: str):
    mod, _, name = path.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def _arg_docs(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Args:`` section (continuation lines joined)."""
    out: dict[str, str] = {}
    m = re.search(r"\n\s*Args:\n(.*?)(\n\s*\n(?=\s*\S+:\n)|\Z)", doc, re.S)
    if not m:
        return out
    current: list[str] = []
    for line in m.group(1).splitlines():
        hit = re.match(r" {4}(\w[\w, /*]*):\s*(.*)", line)
        if hit:
            current = [n.strip() for n in re.split(r"[,/]", hit.group(1)) if n.strip()]
            for n in current:
                out[n] = hit.group(2).strip()
        elif current and line.strip():
            for n in current:
                out[n] += " " + line.strip()
    return out


def render() -> str:
    parts = ["# Reference: every constructor argument", "",
             "Generated from the code by `python scripts/gen_reference.py` (a test checks it is current).",
             "Every argument can be set from YAML (`fedprune fit --config ...`) and the command line.", ""]
    for path in CLASSES:
        cls = _load(path)
        doc = inspect.getdoc(cls) or ""
        summary = doc.split("\n\n")[0].replace("\n", " ")
        parts += [f"## `{path}`", "", summary, "", "| argument | default | meaning |", "|---|---|---|"]
        descr = _arg_docs("\n" + doc)
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            default = "required" if p.default is p.empty else f"`{p.default!r}`"
            text = descr.get(name, "").replace("|", "\\|")
            parts.append(f"| `{name}` | {default} | {text} |")
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")
