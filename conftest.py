"""Test collection for the whole repository (pytest collects doctests in every module, see pyproject.toml).

Without the optional `flower` extra, the modules that import `flwr` are not collected: the core install's
test suite runs, and the Flower tests skip (they `importorskip("flwr")`).
"""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("flwr") else [
    "lightning_fedprune/federated/flower/messages.py",
    "lightning_fedprune/federated/flower/node.py",
    "tests/flower_helpers.py",
]
