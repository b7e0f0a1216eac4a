"""Federated data: partitioning a dataset into simulated clients, and the cohort loader.

The Trainer's *training* dataloader does not yield examples: it yields **cohorts** — the client
ids sampled for each round (``{"round": r, "clients": LongTensor}``), so one Trainer step is one
federated round. The examples of a client are served by :meth:`FederatedDataModule.client_loader`
to the client's local loop. Validation and test loaders are ordinary example loaders over the
held-out data, used on the global model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_fedprune.federated.protocol import derive_seed
from lightning_fedprune.validation import check_bool, check_callable, check_choice, check_float, check_int, fail

PartitionName = Literal["iid", "dirichlet", "by_key"]
PARTITIONS: tuple[str, ...] = get_args(PartitionName)


# ---------------------------------------------------------------------------------------------
# partitioners: pure functions from (dataset description, seed) to a list of index arrays
# ---------------------------------------------------------------------------------------------
def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal ``num_samples`` indices into ``num_clients`` near-equal parts.

    >>> [len(p) for p in iid_partition(10, 3, seed=0)]
    [4, 3, 3]
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels: Sequence[int] | np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label-skewed partition: for every class, client shares are drawn from ``Dir(alpha)``.

    Small ``alpha`` (0.1) gives clients with few classes; large ``alpha`` (100) approaches IID.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    owners, indices = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        # client c gets idx[cuts[c-1]:cuts[c]]: as owners, vectorised (a million clients in seconds)
        owners.append(np.repeat(np.arange(num_clients), np.diff(cuts, prepend=0, append=len(idx))))
        indices.append(idx)
    owner, index = np.concatenate(owners), np.concatenate(indices).astype(np.int64)
    order = np.lexsort((index, owner))  # by client, then ascending index
    counts = np.bincount(owner, minlength=num_clients)
    return np.split(index[order], np.cumsum(counts)[:-1])


def key_partition(keys: Sequence[Hashable]) -> tuple[list[np.ndarray], list[Hashable]]:
    """Natural clients: one client per distinct key (e.g. speaker id), in sorted key order."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    try:
        ordered = sorted(groups)
    except TypeError:
        ordered = sorted(groups, key=repr)
    return [np.asarray(groups[k], dtype=np.int64) for k in ordered], ordered


# ---------------------------------------------------------------------------------------------
# the cohort loader
# ---------------------------------------------------------------------------------------------
def sample_cohort(population: np.ndarray, clients_per_round: int, seed: int, round: int) -> torch.Tensor:
    """The cohort of round ``round``: a pure function of ``(seed, round)`` (sorted client ids)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, round, 0xC0))
    pick = torch.randperm(len(population), generator=gen)[:clients_per_round]
    return torch.as_tensor(np.sort(population[pick.numpy()]), dtype=torch.long)


class CohortLoader:
    """Iterable of cohorts, one per round; resumes at the Trainer's ``global_step``.

    The round index is the Trainer's step, so a run resumed from a checkpoint draws exactly the
    cohorts the uninterrupted run would have drawn.
    """

    def __init__(self, population: np.ndarray, clients_per_round: int, seed: int, rounds_per_epoch: int,
                 trainer: pl.Trainer | None = None) -> None:
        self.population = np.asarray(population, dtype=np.int64)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.rounds_per_epoch = rounds_per_epoch
        self.trainer = trainer

    def __len__(self) -> int:
        return self.rounds_per_epoch

    def state_dict(self) -> dict[str, int]:
        """Resumable: the position is the Trainer's ``global_step`` (the next round), saved for the record."""
        return {"next_round": int(self.trainer.global_step) if self.trainer is not None else 0, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            warnings.warn(f"Resuming with cohort seed {self.seed}, the checkpoint used {state['seed']}.", stacklevel=2)

    def __iter__(self):
        start = self.trainer.global_step if self.trainer is not None else 0
        epoch_end = (start // self.rounds_per_epoch + 1) * self.rounds_per_epoch
        for r in range(start, epoch_end):
            yield {"round": r, "clients": sample_cohort(self.population, self.clients_per_round, self.seed, r)}


def _is_dataset(value: Any) -> bool:
    """A torch ``Dataset`` or anything indexable/iterable that is not a string (a path is not a dataset)."""
    if isinstance(value, (str, bytes)):
        return False
    return isinstance(value, Dataset) or hasattr(value, "__getitem__") or hasattr(value, "__iter__")


def _as_key_fn(key: str | Callable[[Any], Hashable]) -> Callable[[Any], Hashable]:
    """``key`` as a function of a sample: a callable as is, a field name as a dict key, an attribute
    or (a digit string) a tuple position."""
    if callable(key):
        return key

    def get(sample: Any) -> Hashable:
        if isinstance(sample, dict):
            if key in sample:
                return sample[key]
        elif hasattr(sample, key):
            return getattr(sample, key)
        elif key.isdigit() and isinstance(sample, (tuple, list)) and int(key) < len(sample):
            return sample[int(key)]
        fields = f" (its keys: {sorted(map(str, sample))[:10]})" if isinstance(sample, dict) else ""
        raise KeyError(f"field {key!r} not found in a sample of type {type(sample).__name__}{fields}")

    return get


def _read_keys(dataset: Dataset, key: str | Callable[[Any], Hashable], arg: str) -> list[Hashable]:
    """``key`` applied to every training sample; a failure names ``arg`` and the sample's index."""
    fn = _as_key_fn(key)
    shown = f"`{arg}={key!r}`" if isinstance(key, str) else f"`{arg}` ({getattr(key, '__name__', type(key).__name__)})"
    out = []
    for i in range(len(dataset)):
        try:
            out.append(fn(dataset[i]))
        except Exception as err:
            raise ValueError(f"{shown} failed on training sample {i}: {type(err).__name__}: {err}") from err
    return out


class FederatedDataModule(pl.LightningDataModule):
    """Splits a training dataset into simulated clients and serves cohorts and client data.

    Args:
        train_dataset: any map-style dataset of training examples.
        val_dataset: held-out examples on which the pruned global model is validated (during ``fit``
            and by ``trainer.validate``); ``None``: no validation.
        test_dataset: held-out examples on which ``trainer.test`` evaluates the pruned global model.
        predict_dataset: examples whose predictions ``trainer.predict`` computes with the pruned
            global model (needed for ``predict``).
        partition: ``"iid"``, ``"dirichlet"`` (label skew, needs labels and ``alpha``) or
            ``"by_key"`` (one client per distinct key, e.g. speaker id: natural clients).
        num_clients: number of clients for ``iid``/``dirichlet`` (``by_key`` derives it).
        alpha: Dirichlet concentration.
        partition_key: for ``by_key``, a callable ``sample -> key`` or a field name (dict key,
            attribute, or tuple position) — read from ``train_dataset.partition_keys`` instead
            when the dataset provides that list (so partitioning never loads the samples).
        label_key: for ``dirichlet``, a callable or a field name giving the label (default:
            ``dataset.targets`` when present, else the last tuple element).
        batch_size: client (local) batch size.
        eval_batch_size: batch size of the validation/test loaders (default: ``batch_size``).
        min_client_samples: clients with fewer samples are reported (warning + ``small_clients``)
            and not sampled into cohorts; they are never dropped silently. With ``drop_last``,
            clients with fewer than ``batch_size`` samples (no full batch) are treated the same way,
            and it is an error if that leaves no client.
        rounds_per_epoch: rounds in one Trainer epoch (default 1: an epoch is a round, so
            Lightning's per-epoch machinery — ``check_val_every_n_epoch``, ``EarlyStopping``,
            ``ModelCheckpoint(every_n_epochs)``, epoch-interval schedulers on the server — works per
            round). Larger values make one epoch that many rounds.
        collate_fn: collate function for client and evaluation batches.
        shuffle: shuffle each client's data every round (seeded by ``(seed, round, client)``).
        drop_last: drop a client's last incomplete batch (clients without a full batch are then
            not sampled, see ``min_client_samples``).
        seed: partition seed.
    """

    def __init__(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        predict_dataset: Dataset | None = None,
        partition: PartitionName = "iid",
        num_clients: int | None = 10,
        alpha: float = 0.5,
        partition_key: str | Callable[[Any], Hashable] | None = None,
        label_key: str | Callable[[Any], int] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        min_client_samples: int = 1,
        rounds_per_epoch: int | None = None,
        collate_fn: Callable | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice(partition, "partition", PARTITIONS)
        num_clients = check_int(num_clients, "num_clients", min=1, optional=partition == "by_key")
        alpha = check_float(alpha, "alpha", min=0, min_open=True)  # finite: Dir(inf) has no samples
        if partition == "by_key" and partition_key is None and not hasattr(train_dataset, "partition_keys"):
            raise ValueError("`partition='by_key'` needs `partition_key` (or a dataset with a `partition_keys` list).")
        check_callable(partition_key, "partition_key", or_str=True)
        check_callable(label_key, "label_key", or_str=True)
        batch_size = check_int(batch_size, "batch_size", min=1)
        eval_batch_size = check_int(eval_batch_size, "eval_batch_size", min=1, optional=True)
        min_client_samples = check_int(min_client_samples, "min_client_samples", min=1)
        rounds_per_epoch = check_int(rounds_per_epoch, "rounds_per_epoch", min=1, optional=True)
        check_callable(collate_fn, "collate_fn")
        check_bool(shuffle, "shuffle")
        check_bool(drop_last, "drop_last")
        seed = check_int(seed, "seed")
        if not _is_dataset(train_dataset) or not hasattr(train_dataset, "__len__"):
            fail("train_dataset", "a map-style dataset (with __len__ and __getitem__)", train_dataset)
        if len(train_dataset) == 0:
            raise ValueError("`train_dataset` is empty.")
        for name, ds in (("val_dataset", val_dataset), ("test_dataset", test_dataset)):
            if ds is not None and not _is_dataset(ds):
                fail(name, "a dataset or None", ds)
        # the examples
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.test_dataset, self.predict_dataset = test_dataset, predict_dataset
        # how they are split into clients
        self.partition, self._num_clients_arg, self.alpha = partition, num_clients, alpha
        self.partition_key, self.label_key = partition_key, label_key
        self.min_client_samples, self.seed = min_client_samples, seed
        # how clients and evaluation read them
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.collate_fn, self.shuffle, self.drop_last = collate_fn, shuffle, drop_last
        self.rounds_per_epoch = rounds_per_epoch
        self._partitions: list[np.ndarray] | None = None
        self._client_sizes: np.ndarray | None = None
        self.client_keys: list[Hashable] | None = None

    # ------------------------------------------------------------------ partitions
    def _labels(self) -> np.ndarray:
        ds = self.train_dataset
        if self.label_key is None and hasattr(ds, "targets"):
            return np.asarray(ds.targets)
        labels = _read_keys(ds, self.label_key if self.label_key is not None else (lambda s: s[-1]), "label_key")
        for i, label in enumerate(labels):
            if isinstance(label, torch.Tensor) and label.numel() == 1:
                label = label.item()
            try:
                integral = not isinstance(label, (bool, str, bytes)) and int(label) == label
            except (TypeError, ValueError):
                integral = False
            if not integral:
                raise ValueError(f"`label_key` must give an integer class label; training sample {i} gave {label!r}.")
            labels[i] = int(label)
        return np.asarray(labels, dtype=np.int64)

    def _keys(self) -> list[Hashable]:
        ds = self.train_dataset
        if hasattr(ds, "partition_keys") and self.partition_key is None:
            return list(ds.partition_keys)
        return _read_keys(ds, self.partition_key, "partition_key")

    @property
    def partitions(self) -> list[np.ndarray]:
        """Index arrays into ``train_dataset``, one per client (built once, lazily)."""
        if self._partitions is None:
            n = len(self.train_dataset)
            if self.partition == "iid":
                if self._num_clients_arg > n:
                    raise ValueError(f"`num_clients` ({self._num_clients_arg}) exceeds the {n} training samples.")
                parts = iid_partition(n, self._num_clients_arg, self.seed)
            elif self.partition == "dirichlet":
                parts = dirichlet_partition(self._labels(), self._num_clients_arg, self.alpha, self.seed)
            else:
                parts, self.client_keys = key_partition(self._keys())
            sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
            small = np.flatnonzero(sizes < self.min_samples).tolist()
            if len(small) == len(parts) and self._batch_bound:
                raise ValueError(
                    f"Every client has fewer than `batch_size={self.batch_size}` samples and `drop_last=True` drops "
                    f"the last incomplete batch: all {len(parts)} clients have no full batch (the largest has "
                    f"{int(sizes.max(initial=0))} samples) and would fail every round. Lower `batch_size` or set "
                    "`drop_last=False`."
                )
            if small:
                shown = ", ".join(f"{c} ({len(parts[c])})" for c in small[:20])
                more = f" and {len(small) - 20} more" if len(small) > 20 else ""
                why = (f"fewer than `batch_size={self.batch_size}` samples (no full batch with `drop_last=True`)"
                       if self._batch_bound else f"fewer than min_client_samples={self.min_client_samples} samples")
                warnings.warn(f"{len(small)} of {len(parts)} clients have {why} and will not be sampled: {shown}{more}.",
                              stacklevel=2)
            if len(small) == len(parts):
                raise ValueError("Every client partition is empty or below `min_client_samples`: nothing to train on.")
            self._partitions, self._client_sizes = parts, sizes  # only once usable: a second access raises again
        return self._partitions

    @property
    def num_clients(self) -> int:
        return len(self.partitions)

    @property
    def client_sizes(self) -> list[int]:
        """Number of training samples of every client (the FedAvg weights)."""
        return self._sizes().tolist()

    @property
    def min_samples(self) -> int:
        """Fewest training samples a client needs to be sampled: ``min_client_samples``, and with
        ``drop_last`` a full batch (``batch_size``) — a client without one has no batch and would
        fail every round."""
        return max(self.min_client_samples, self.batch_size if self.drop_last else 1)

    @property
    def _batch_bound(self) -> bool:
        """Whether ``batch_size`` with ``drop_last`` (not ``min_client_samples``) sets :attr:`min_samples`."""
        return self.drop_last and self.batch_size > self.min_client_samples

    @property
    def small_clients(self) -> list[int]:
        """Ids of clients with fewer than :attr:`min_samples` samples (reported, never sampled)."""
        return np.flatnonzero(self._sizes() < self.min_samples).tolist()

    @property
    def population(self) -> np.ndarray:
        """Client ids eligible for sampling."""
        return np.flatnonzero(self._sizes() >= self.min_samples).astype(np.int64)

    def _sizes(self) -> np.ndarray:
        """Every client's number of samples (computed once: partitions do not change once built)."""
        parts = self.partitions
        if self._client_sizes is None or len(self._client_sizes) != len(parts):
            self._client_sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        return self._client_sizes

    # ------------------------------------------------------------------ client side
    def client_data(self) -> ClientDataSource:
        """A small picklable view for client processes (datasets + index arrays, no Trainer)."""
        trainer = self.trainer
        on_cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return ClientDataSource(self.train_dataset, self.partitions, self.batch_size, self.collate_fn, self.shuffle,
                                self.drop_last, pin_memory=on_cuda)

    def client_dataset(self, client_id: int) -> Dataset:
        return Subset(self.train_dataset, self.partitions[client_id].tolist())

    def client_size(self, client_id: int) -> int:
        return len(self.partitions[client_id])

    @property
    def max_client_batches(self) -> int:
        """The most local batches one epoch of any sampled client has (bounds a round's optimiser steps)."""
        largest = int(self._sizes().max(initial=0))
        return largest // self.batch_size if self.drop_last else math.ceil(largest / self.batch_size)

    def client_loader(self, client_id: int, seed: int) -> DataLoader:
        """The local training loader of ``client_id``; shuffling is seeded by ``seed`` (round, client)."""
        return self.client_data().client_loader(client_id, seed)

    # ------------------------------------------------------------------ Lightning hooks
    def train_dataloader(self) -> CohortLoader:
        fed = self.trainer.lightning_module if self.trainer is not None else None
        k = getattr(fed, "clients_per_round", None)
        seed = getattr(fed, "seed", self.seed)
        if k is None:
            raise TypeError("FederatedDataModule's training loader yields cohorts; train a FederatedLightningModule with it.")
        pop = self.population
        if k > len(pop):
            raise ValueError(
                f"`clients_per_round` ({k}) is larger than the number of clients available for sampling "
                f"({len(pop)} of {self.num_clients}; see `small_clients`)."
            )
        return CohortLoader(pop, k, seed, self.rounds_per_epoch or 1, trainer=self.trainer)

    def _eval_loader(self, ds: Dataset | None) -> DataLoader | list:
        if ds is None:
            return []
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate_fn)

    def val_dataloader(self):
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self):
        return self._eval_loader(self.test_dataset)

    def predict_dataloader(self):
        if self.predict_dataset is None:
            raise ValueError("`trainer.predict` needs examples: give FederatedDataModule a `predict_dataset`.")
        return self._eval_loader(self.predict_dataset)


@dataclass(frozen=True)
class ClientDataSource:
    """Picklable client-data view: what a client (in this process or a worker) needs to build its loader."""

    dataset: Dataset
    partitions: list[np.ndarray]
    batch_size: int
    collate_fn: Callable | None
    shuffle: bool
    drop_last: bool
    pin_memory: bool = False  # page-locked batches: non-blocking copies to a CUDA device

    def client_size(self, client_id: int) -> int:
        return len(self.partitions[client_id])

    def client_loader(self, client_id: int, seed: int) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(Subset(self.dataset, self.partitions[client_id].tolist()), batch_size=self.batch_size,
                          shuffle=self.shuffle, generator=gen, collate_fn=self.collate_fn, drop_last=self.drop_last,
                          pin_memory=self.pin_memory)
