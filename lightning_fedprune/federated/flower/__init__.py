"""Flower as an executor: the same run on Flower's simulation engine or on real SuperNodes.

* :mod:`.executor` — :class:`FlowerExecutor`, the server side (inside a Flower ServerApp);
* :mod:`.messages` — what travels: the record layout of jobs and replies, the reply checks, message sizes;
* :mod:`.node` — the node side (inside a Flower ClientApp, or a persistent node worker).

Needs the optional ``flower`` extra (``flwr[simulation]``); this package imports without it, and
``FlowerExecutor()`` says how to install it. The Flower app itself is ``examples/flower``; see
docs/flower.md.
"""

from lightning_fedprune.federated.flower.executor import FlowerExecutor

__all__ = ["FlowerExecutor"]
