"""The Flower app of lightning-fedprune: ``server_app`` (the Trainer and the federated module of a fedprune YAML,
with FlowerExecutor), ``client_app`` (a node's clients, trained by fedprune's client loop), ``node_worker`` (a
SuperNode's persistent worker) and ``task`` (what both build from the YAML). See docs/flower.md."""
