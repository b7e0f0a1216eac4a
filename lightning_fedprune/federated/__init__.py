"""The federated engine: the round (``module``), local training (``client``), where clients run
(``executors``), how the server aggregates (``strategy``), what travels (``protocol``, ``wire``),
client data (``data``), checkpoints (``checkpoint``) and the federated hooks (``hooks``).

The public names are re-exported by :mod:`lightning_fedprune`.
"""
