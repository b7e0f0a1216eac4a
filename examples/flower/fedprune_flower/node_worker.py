"""A SuperNode's persistent fedprune worker: one process that keeps the node's task, data and client runner
across rounds (Flower 1.42's SuperNode starts a new ClientApp process for every message).

    PYTHONPATH=examples/flower python -m fedprune_flower.node_worker --socket /run/fedprune/node0.sock
    flower-supernode ... --node-config 'clients="0-4" worker="/run/fedprune/node0.sock"'

The socket is created for its owner only; start the worker as the user the SuperNode runs as.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedprune_flower.node_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the Unix socket to serve on (node config `worker`)")
    parser.add_argument("--max-idle", type=float, default=3600.0,
                        help="exit after this many seconds without a message (default 3600)")
    args = parser.parse_args(argv)
    from lightning_fedprune.federated.flower.node import FlowerNode, serve

    from fedprune_flower.task import build_client

    serve(FlowerNode(build_client), args.socket, max_idle=args.max_idle)


if __name__ == "__main__":
    main()
