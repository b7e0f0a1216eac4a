"""An ordinary Lightning project: a small classifier of scikit-learn's handwritten digits (no download).

    python examples/dropin/centralised.py [--max-steps 1000] [--quiet]

``federated.py`` next to it is this file converted to Federated Pruning; docs/dropin.md shows the diff.
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsClassifier(L.LightningModule):
    def __init__(self, hidden: int = 128, lr: float = 0.05, momentum: float = 0.9):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def digits_datasets():
    """8x8 digit images as 64 features in [0, 1]; a stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x / 16.0, y, test_size=0.25, stratify=y, random_state=0)

    def as_dataset(x, y):
        return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))

    return as_dataset(x_train, y_train), as_dataset(x_val, y_val)


def main():
    parser = argparse.ArgumentParser(description="Train a digits classifier.")
    parser.add_argument("--max-steps", type=int, default=1000, help="optimiser steps")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no model summary")
    args = parser.parse_args()

    L.seed_everything(0)
    torch.set_num_threads(1)  # a tiny model: one CPU thread is the fastest (and steady on a busy machine)
    train_set, val_set = digits_datasets()
    model = DigitsClassifier()
    trainer = L.Trainer(
        max_steps=args.max_steps,
        log_every_n_steps=10,
        enable_progress_bar=not args.quiet,
        enable_model_summary=not args.quiet,
        callbacks=[ModelCheckpoint(save_last=True)],  # also keeps lightning_logs/version_N/checkpoints/last.ckpt
    )
    trainer.fit(model, train_dataloaders=DataLoader(train_set, batch_size=32, shuffle=True),
                val_dataloaders=DataLoader(val_set, batch_size=256))
    metrics = trainer.validate(model, DataLoader(val_set, batch_size=256), verbose=False)[0]
    print(f"final accuracy: {metrics['val/acc']:.4f}")


if __name__ == "__main__":
    main()
