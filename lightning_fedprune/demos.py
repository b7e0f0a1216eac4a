"""Small ready-made tasks and data for tests, benchmarks and the quick start (no download)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lightning_fedprune.validation import check_float, check_int


class GaussianMixtureDataset(Dataset):
    """A seeded classification problem: ``num_classes`` Gaussian blobs in ``dim`` dimensions.

    Samples are ``(x, y)`` tuples; ``targets`` lists the labels (used by Dirichlet partitioning).
    The class centres depend only on ``centers_seed``, so datasets made with different ``seed``
    values (a training and a validation set) are samples of the same problem.

    Args:
        num_samples: number of ``(x, y)`` samples.
        dim: dimension of ``x``.
        num_classes: number of classes (blobs), >= 2.
        noise: standard deviation of the Gaussian noise around each class centre (>= 0; the centres
            are drawn with standard deviation 2 per dimension, so ``noise=2.0`` makes classes overlap).
        seed: seed of the labels and the noise.
        centers_seed: seed of the class centres.
    """

    def __init__(self, num_samples: int = 2000, dim: int = 32, num_classes: int = 10, noise: float = 1.0, seed: int = 0,
                 centers_seed: int = 1234) -> None:
        num_samples = check_int(num_samples, "num_samples", min=1)
        dim = check_int(dim, "dim", min=1)
        num_classes = check_int(num_classes, "num_classes", min=2)
        noise = check_float(noise, "noise", min=0)
        check_int(seed, "seed")
        check_int(centers_seed, "centers_seed")
        g_centers = torch.Generator().manual_seed(centers_seed)
        centers = torch.randn(num_classes, dim, generator=g_centers) * 2.0
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, num_classes, (num_samples,), generator=g)
        self.x = centers[self.targets] + noise * torch.randn(num_samples, dim, generator=g)
        self.num_classes = num_classes
        self.dim = dim

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.targets[i]


class MLPClassifier(pl.LightningModule):
    """An ordinary Lightning classifier: nothing federated in it.

    An MLP ``body`` (``depth`` x ``nn.Linear`` + ReLU) and a linear ``head``; logs ``train/loss``,
    ``val/loss``, ``val/acc`` and ``test/acc``; ``predict_step`` returns the predicted classes.

    Args:
        in_dim: input features.
        hidden: width of every hidden layer.
        num_classes: output classes.
        depth: number of hidden layers (``body.0``, ``body.2``, ... are their ``nn.Linear``; 0: the head
            only).
        lr: SGD learning rate of the (client) optimiser.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
    """

    def __init__(self, in_dim: int = 32, hidden: int = 64, num_classes: int = 10, depth: int = 2, lr: float = 0.1,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__()
        check_int(in_dim, "in_dim", min=1)
        check_int(hidden, "hidden", min=1)
        check_int(num_classes, "num_classes", min=1)
        check_int(depth, "depth", min=0)
        check_float(lr, "lr", min=0, min_open=True)
        check_float(momentum, "momentum", min=0)
        check_float(weight_decay, "weight_decay", min=0)
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

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

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test/acc", (logits.argmax(-1) == y).float().mean())

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                               weight_decay=self.hparams.weight_decay)
