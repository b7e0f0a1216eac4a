"""Conformer-Transducer (RNN-T) ASR task as an ordinary LightningModule.

Architecture (parameter names, which pruning regexes match, in brackets)::

    features (B, T, n_mels)
      -> per-utterance mean/variance normalisation (optional, no parameters)
      -> SpecAugment (training only, optional, no parameters)
      -> Conv2d(3x3, stride 2) -> ReLU -> Conv2d(3x3, stride 2) -> ReLU -> Linear  [encoder.subsampling.*]
      -> torchaudio.models.Conformer                                              [encoder.conformer.conformer_layers.<i>.*]
         with its self-attention as :class:`SelfAttention`: separate q/k/v/out Linears [self_attn.{q,k,v,out}_proj.*]
    encoder_out (B, T/4, d_model)
      RNN-T: prediction network Embedding -> LSTM                                 [predictor.embedding.*, predictor.lstm.*]
             joint network Linear(enc) + Linear(pred) -> tanh -> Linear(vocab)   [joiner.enc_proj.*, joiner.pred_proj.*, joiner.out.*]
      CTC:   Linear(vocab)                                                        [ctc_head.*]
      RNN-T with ``ctc_weight > 0``: both; the CTC head is an auxiliary training loss only

The blank is the last vocabulary id (see :mod:`.tokenizer`) and is the prediction
network's start symbol. The predictor/joiner follow the component interface of
``torchaudio.models.RNNT``, so ``torchaudio.models.RNNTBeamSearch`` can drive them.

``training_step`` only needs the batch: it works under a ``Trainer`` and when an external
loop (a federated client) calls ``training_step`` + ``configure_optimizers`` itself.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fedprune.pruning.structure import Link
from lightning_fedprune.validation import check_bool, check_choice, check_float, check_int, fail

from .decoding import ctc_greedy_decode, rnnt_beam_search, rnnt_greedy_search
from .tokenizer import CharTokenizer

__all__ = ["PRESETS", "Attend", "ConformerTransducer", "ConvSubsampling", "ConformerEncoder", "Joiner", "Predictor",
           "SelfAttention"]

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: 3.5 M parameters.
    "tiny": dict(
        d_model=144, num_layers=4, num_heads=4, ffn_dim=576, conv_kernel_size=15,
        pred_dim=320, pred_layers=1, joint_dim=320, dropout=0.1,
    ),
    # The article's model (Conformer-L sized, 116.1 M parameters): 17 x 512, 8 heads, FFN 2048,
    # one 640-dim LSTM prediction layer, 2048-dim joint network. The Conformer paper's conv
    # kernel 32 is even; torchaudio needs an odd kernel, so 31.
    "paper": dict(
        d_model=512, num_layers=17, num_heads=8, ffn_dim=2048, conv_kernel_size=31,
        pred_dim=640, pred_layers=1, joint_dim=2048, dropout=0.1,
    ),
}


# ----------------------------------------------------------------------------- modules
def _lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) -> (B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def subsampled_lengths(lengths: Tensor) -> Tensor:
    """Output lengths of two unpadded 3x3 / stride-2 convolutions (x4 subsampling)."""
    lengths = torch.div(lengths - 1, 2, rounding_mode="floor")
    lengths = torch.div(lengths - 1, 2, rounding_mode="floor")
    return lengths.clamp(min=1)


class ConvSubsampling(nn.Module):
    """Standard Conformer front-end: two 3x3 stride-2 Conv2d + ReLU, then a linear projection."""

    MIN_FRAMES = 7

    def __init__(self, n_mels: int, d_model: int, channels: Optional[int] = None) -> None:
        super().__init__()
        channels = channels or d_model
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(),
        )
        f_out = ((n_mels - 1) // 2 - 1) // 2
        self.out = nn.Linear(channels * f_out, d_model)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[1] < self.MIN_FRAMES:  # too short for two unpadded convolutions
            x = F.pad(x, (0, 0, 0, self.MIN_FRAMES - x.shape[1]))
        y = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = y.shape
        y = self.out(y.permute(0, 2, 1, 3).reshape(b, t, c * f))
        return y, subsampled_lengths(lengths).clamp(max=t)


class Attend(nn.Module):
    """The parameter-free core of multi-head attention on projected, time-first inputs:
    ``softmax(q k^T / sqrt(d_head) + padding) -> dropout -> @ v``, heads merged, as ``nn.MultiheadAttention``
    computes it.

    The value features may arrive compact (:meth:`compact_features`, on a client whose value projection
    lost rows): each kept feature still belongs to its head, so the values are placed into ``m`` slots
    per head (``m`` = the most kept by any head, zeros in the unused slots), attended, and the kept features
    taken back out. Queries and keys always have the full width. The attention weights and their dropout
    are the same tensors in both cases, so a compact client draws the same random numbers.
    """

    def __init__(self, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = int(num_heads)
        self.dropout = float(dropout)
        self.value_slots: Optional[Tensor] = None  # compact values: flat slot (head * m + i) of every kept feature
        self.slots_per_head = 0

    def compact_features(self, index: Tensor, width: int) -> "Attend":
        """A copy for values holding only the features ``index`` (ascending) of ``width``."""
        head_dim = width // self.num_heads
        heads = index // head_dim
        counts = torch.bincount(heads, minlength=self.num_heads)
        m = int(counts.max()) if index.numel() else 0
        first = torch.cumsum(counts, 0) - counts  # position of each head's first kept feature in `index`
        rank = torch.arange(index.numel(), device=index.device) - first[heads]
        out = Attend(self.num_heads, self.dropout)
        out.value_slots, out.slots_per_head = heads * m + rank, m
        out.train(self.training)
        return out

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        T, B, D = q.shape
        S, H = k.shape[0], self.num_heads
        dh = D // H
        q = q.reshape(T, B * H, dh).transpose(0, 1)
        k = k.reshape(S, B * H, dh).transpose(0, 1)
        slots = self.value_slots
        if slots is None:
            dv = v.shape[-1] // H
            v = v.reshape(S, B * H, dv).transpose(0, 1)
        else:
            dv = self.slots_per_head
            v = v.new_zeros(S, B, H * dv).index_copy(2, slots, v).reshape(S, B * H, dv).transpose(0, 1)
        scores = torch.bmm(q * (1.0 / math.sqrt(dh)), k.transpose(1, 2))  # (B*H, T, S)
        if key_padding_mask is not None:
            scores = scores.view(B, H, T, S).masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            scores = scores.view(B * H, T, S)
        attn = F.dropout(torch.softmax(scores, dim=-1), p=self.dropout, training=self.training)
        out = torch.bmm(attn, v).transpose(0, 1).reshape(T, B, H * dv)
        return out if slots is None else out.index_select(2, slots)

    def extra_repr(self) -> str:
        compact = "" if self.value_slots is None else f", compact values={self.value_slots.numel()}"
        return f"num_heads={self.num_heads}, dropout={self.dropout}{compact}"


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` Linears.

    A drop-in for ``nn.MultiheadAttention(embed_dim, num_heads, dropout)`` as torchaudio's Conformer layer
    calls it (time-first inputs, ``key_padding_mask``, ``need_weights=False``); it computes the same function
    (``tests/test_asr_model.py`` compares the two with the same weights). Why separate projections: each is a
    pruning target of its own (``nn.MultiheadAttention`` packs q, k and v in one ``in_proj_weight``, whose
    column is an input feature of all three at once), and each is a plain ``nn.Linear`` a client can compact;
    the attention core (:class:`Attend`) takes value features in compact form. A state dict with the packed
    ``in_proj_weight``/``in_proj_bias`` (checkpoints of the ``nn.MultiheadAttention`` version) loads into it.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"`embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads}).")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.attend = Attend(num_heads, dropout)
        with torch.no_grad():  # nn.MultiheadAttention's initialisation: xavier over the packed (3d, d), zero biases
            packed = torch.empty(3 * embed_dim, embed_dim, dtype=self.q_proj.weight.dtype)
            nn.init.xavier_uniform_(packed)
            for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), packed.chunk(3)):
                proj.weight.copy_(w)
            for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
                proj.bias.zero_()

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> "SelfAttention":
        """The same attention with ``mha``'s weights (no new random numbers are drawn: building a model this
        way initialises it exactly as the ``nn.MultiheadAttention`` version did)."""
        if not mha._qkv_same_embed_dim or mha.in_proj_bias is None or mha.batch_first or mha.bias_k is not None:
            raise ValueError("SelfAttention.from_multihead needs a time-first nn.MultiheadAttention with packed, biased "
                             "projections and no bias_k/bias_v")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        d = mha.embed_dim
        out.embed_dim, out.num_heads = d, mha.num_heads
        kw = dict(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.device("meta"):
            projections = [nn.Linear(d, d) for _ in range(4)]
        with torch.no_grad():
            sources = [(w, b) for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3))]
            sources.append((mha.out_proj.weight, mha.out_proj.bias))
            for lin, (w, b) in zip(projections, sources):
                lin.weight = nn.Parameter(w.detach().clone().to(**kw))
                lin.bias = nn.Parameter(b.detach().clone().to(**kw))
        out.q_proj, out.k_proj, out.v_proj, out.out_proj = projections
        out.attend = Attend(mha.num_heads, mha.dropout)
        return out

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None) -> tuple[Tensor, None]:
        if need_weights or attn_mask is not None:
            raise ValueError("SelfAttention supports `key_padding_mask` only (`need_weights=False`, no `attn_mask`), "
                             "as torchaudio's Conformer layer calls it.")
        out = self.attend(self.q_proj(query), self.k_proj(key), self.v_proj(value), key_padding_mask)
        return self.out_proj(out), None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # a checkpoint of the nn.MultiheadAttention version: split its packed projection
        for kind in ("weight", "bias"):
            packed = state_dict.pop(f"{prefix}in_proj_{kind}", None)
            if packed is not None:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), packed.chunk(3)):
                    state_dict.setdefault(f"{prefix}{name}.{kind}", part)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ConformerEncoder(nn.Module):
    """Conv subsampling (x4) + ``torchaudio.models.Conformer`` (self-attention as :class:`SelfAttention`);
    ``forward(input, lengths)``."""

    def __init__(self, n_mels, d_model, num_layers, num_heads, ffn_dim, conv_kernel_size, dropout,
                 use_group_norm=True, subsampling_channels=None) -> None:
        super().__init__()
        from torchaudio.models import Conformer

        self.subsampling = ConvSubsampling(n_mels, d_model, subsampling_channels)
        self.dropout = nn.Dropout(dropout)
        self.conformer = Conformer(
            input_dim=d_model, num_heads=num_heads, ffn_dim=ffn_dim, num_layers=num_layers,
            depthwise_conv_kernel_size=conv_kernel_size, dropout=dropout, use_group_norm=use_group_norm,
        )
        for layer in self.conformer.conformer_layers:
            layer.self_attn = SelfAttention.from_multihead(layer.self_attn)

    def forward(self, input: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:  # noqa: A002
        x, lengths = self.subsampling(input, lengths)
        return self.conformer(self.dropout(x), lengths)


class Predictor(nn.Module):
    """RNN-T prediction network: Embedding -> (multi-layer) LSTM.

    Interface of ``torchaudio.models.RNNT``'s predictor; the state is a list (one per LSTM
    layer) of ``[h, c]`` with batch-first ``(B, H)`` tensors, as ``RNNTBeamSearch`` expects.
    """

    def __init__(self, vocab_size: int, dim: int, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)  # on the embeddings
        self.output_dropout = nn.Dropout(dropout)  # on the LSTM's output (its own module, so a link may list it)
        self.num_layers = num_layers
        self.output_dim = dim

    def forward(self, input: Tensor, lengths: Tensor, state: Optional[list[list[Tensor]]] = None):  # noqa: A002
        x = self.dropout(self.embedding(input))
        hx = None
        if state is not None:
            hx = (torch.stack([s[0] for s in state]), torch.stack([s[1] for s in state]))
        y, (h, c) = self.lstm(x, hx)
        new_state = [[h[i], c[i]] for i in range(self.num_layers)]
        return self.output_dropout(y), lengths, new_state


class Joiner(nn.Module):
    """Joint network: ``out(act(enc_proj(enc)[:, :, None] + pred_proj(pred)[:, None]))``."""

    def __init__(self, enc_dim: int, pred_dim: int, joint_dim: int, vocab_size: int,
                 activation: str = "tanh") -> None:
        super().__init__()
        self.enc_proj = nn.Linear(enc_dim, joint_dim)
        self.pred_proj = nn.Linear(pred_dim, joint_dim)
        self.activation = nn.Tanh() if activation == "tanh" else nn.ReLU()
        self.out = nn.Linear(joint_dim, vocab_size)
        self.output_dim = vocab_size

    def joint(self, enc_projected: Tensor, pred_projected: Tensor) -> Tensor:
        """(B, T, J) x (B, U, J) -> (B, T, U, V) on already projected encodings."""
        return self.out(self.activation(enc_projected.unsqueeze(2) + pred_projected.unsqueeze(1)))

    def forward(self, source_encodings: Tensor, source_lengths: Tensor,
                target_encodings: Tensor, target_lengths: Tensor):
        logits = self.joint(self.enc_proj(source_encodings), self.pred_proj(target_encodings))
        return logits, source_lengths, target_lengths


class _LinearWarmup:
    """Picklable LambdaLR factor: linear warm-up over ``steps`` optimiser steps, then 1."""

    def __init__(self, steps: int) -> None:
        self.steps = max(1, int(steps))

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


# ----------------------------------------------------------------------------- task
class ConformerTransducer(L.LightningModule):
    """Conformer-Transducer (or Conformer-CTC) character ASR task.

    Args:
        preset: ``"tiny"`` (3.5 M parameters, for a CPU) or ``"paper"`` (116.1 M, the article's model:
            17 x 512 Conformer layers); the arguments below that are ``None`` take the preset's value.
        d_model: encoder width (``tiny`` 144, ``paper`` 512).
        num_layers: Conformer layers (``tiny`` 4, ``paper`` 17).
        num_heads: attention heads (``tiny`` 4, ``paper`` 8); must divide ``d_model``.
        ffn_dim: hidden width of the Conformer feed-forward modules (``tiny`` 576, ``paper`` 2048).
        conv_kernel_size: depthwise convolution kernel of the Conformer conv modules, odd (``tiny`` 15,
            ``paper`` 31).
        pred_dim: width of the LSTM prediction network (``tiny`` 320, ``paper`` 640).
        pred_layers: LSTM layers of the prediction network (1 in both presets).
        joint_dim: width of the joint network (``tiny`` 320, ``paper`` 2048).
        dropout: dropout in the encoder and the prediction network (0.1 in both presets).
        n_mels: input feature dimension.
        lr: AdamW learning rate (the client optimiser under federated training).
        weight_decay: AdamW weight decay.
        warmup_steps: linear LR warm-up over that many optimiser steps of the optimiser returned
            by ``configure_optimizers`` (0 = none, plain optimiser is returned).
        loss: ``"rnnt"`` (Transducer) or ``"ctc"`` (CTC head on the encoder, no
            predictor/joiner are built).
        decoder: ``"greedy"`` or ``"beam"`` (``RNNTBeamSearch``; RNN-T only) for val/test.
        beam_size: hypotheses kept by ``decoder="beam"``.
        max_symbols_per_frame: most symbols greedy and beam decoding emit for one encoder frame.
        spec_augment: SpecAugment (2 freq masks, 2 time masks) on training batches.
        input_norm: per-utterance mean/variance normalisation of the features (over valid frames).
        use_group_norm: GroupNorm instead of BatchNorm in the Conformer conv modules (default).
            GroupNorm keeps no running statistics; BatchNorm's running mean and variance are buffers,
            which clients send back and the server averages every round like the weights, so
            evaluation then uses an average of the clients' (speakers') statistics.
        subsampling_channels: Conv2d channels of the front-end (``None`` = d_model).
        joint_chunk_size: compute joint network + RNN-T loss in batch chunks of this many
            utterances with activation checkpointing (for big models: the (B, T, U, joint_dim)
            joint tensor dominates memory). ``None`` = whole batch at once.
        log_examples: number of (reference, hypothesis) pairs to log on the first val/test batch.
        ctc_weight: with ``loss="rnnt"``, add ``ctc_weight`` x an auxiliary CTC loss (a linear CTC
            head on the encoder, both losses summed per utterance and averaged over the batch) to
            the training objective -- the usual remedy for the RNN-T plateau where the prediction
            network has learnt the language model but the encoder is not used yet (icefall and
            ESPnet use 0.1-0.3). Decoding stays RNN-T; the head is unused at inference. 0 = off.
    """

    def __init__(
        self,
        preset: Literal["tiny", "paper"] = "tiny",
        d_model: Optional[int] = None,
        num_layers: Optional[int] = None,
        num_heads: Optional[int] = None,
        ffn_dim: Optional[int] = None,
        conv_kernel_size: Optional[int] = None,
        pred_dim: Optional[int] = None,
        pred_layers: Optional[int] = None,
        joint_dim: Optional[int] = None,
        dropout: Optional[float] = None,
        n_mels: int = 80,
        lr: float = 2e-3,
        weight_decay: float = 1e-3,
        warmup_steps: int = 0,
        loss: Literal["rnnt", "ctc"] = "rnnt",
        decoder: Literal["greedy", "beam"] = "greedy",
        beam_size: int = 4,
        max_symbols_per_frame: int = 5,
        spec_augment: bool = False,
        input_norm: bool = True,
        use_group_norm: bool = True,
        subsampling_channels: Optional[int] = None,
        joint_chunk_size: Optional[int] = None,
        log_examples: int = 3,
        ctc_weight: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice(preset, "preset", sorted(PRESETS))
        sizes = dict(d_model=d_model, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim,
                     conv_kernel_size=conv_kernel_size, pred_dim=pred_dim, pred_layers=pred_layers, joint_dim=joint_dim)
        overrides = {k: check_int(v, k, min=1, optional=True) for k, v in sizes.items()}
        overrides["dropout"] = check_float(dropout, "dropout", min=0, max=1, max_open=True, optional=True)
        cfg = dict(PRESETS[preset])
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        if cfg["d_model"] % cfg["num_heads"]:
            raise ValueError(f"`d_model` ({cfg['d_model']}) must be divisible by `num_heads` ({cfg['num_heads']}).")
        if cfg["conv_kernel_size"] % 2 == 0:
            fail("conv_kernel_size", "odd (the Conformer's depthwise convolution keeps the length)", conv_kernel_size)
        check_int(n_mels, "n_mels", min=7)  # two unpadded 3x3 stride-2 convolutions leave >= 1 frequency bin
        check_float(lr, "lr", min=0, min_open=True)
        check_float(weight_decay, "weight_decay", min=0)
        check_int(warmup_steps, "warmup_steps", min=0)
        check_choice(loss, "loss", ("rnnt", "ctc"))
        check_choice(decoder, "decoder", ("greedy", "beam"))
        if loss == "ctc" and decoder == "beam":
            raise ValueError("`decoder='beam'` is the RNN-T beam search and needs `loss='rnnt'`; use `decoder='greedy'` "
                             "with `loss='ctc'`.")
        check_int(beam_size, "beam_size", min=1)
        check_int(max_symbols_per_frame, "max_symbols_per_frame", min=1)
        for name, flag in (("spec_augment", spec_augment), ("input_norm", input_norm), ("use_group_norm", use_group_norm)):
            check_bool(flag, name)
        check_int(subsampling_channels, "subsampling_channels", min=1, optional=True)
        check_int(joint_chunk_size, "joint_chunk_size", min=1, optional=True)
        check_int(log_examples, "log_examples", min=0)
        check_float(ctc_weight, "ctc_weight", min=0)
        self.save_hyperparameters()
        self.config = cfg

        self.tokenizer = CharTokenizer()
        self.blank_id = self.tokenizer.blank_id
        vocab = self.tokenizer.vocab_size

        self.encoder = ConformerEncoder(
            n_mels, cfg["d_model"], cfg["num_layers"], cfg["num_heads"], cfg["ffn_dim"],
            cfg["conv_kernel_size"], cfg["dropout"], use_group_norm=use_group_norm,
            subsampling_channels=subsampling_channels,
        )
        if loss == "rnnt":
            self.predictor = Predictor(vocab, cfg["pred_dim"], cfg["pred_layers"], cfg["dropout"])
            self.joiner = Joiner(cfg["d_model"], cfg["pred_dim"], cfg["joint_dim"], vocab)
            if ctc_weight > 0:
                self.ctc_head = nn.Linear(cfg["d_model"], vocab)  # auxiliary loss only
        else:
            self.ctc_head = nn.Linear(cfg["d_model"], vocab)

        self.spec_augment_transforms: Optional[nn.Module] = None
        if spec_augment:
            import torchaudio.transforms as TT

            f = max(1, round(27 * n_mels / 80))
            self.spec_augment_transforms = nn.Sequential(
                TT.FrequencyMasking(f, iid_masks=True), TT.FrequencyMasking(f, iid_masks=True),
                TT.TimeMasking(40, iid_masks=True, p=0.1), TT.TimeMasking(40, iid_masks=True, p=0.1),
            )

        from torchmetrics.text import WordErrorRate

        self.val_wer = WordErrorRate()
        self.test_wer = WordErrorRate()
        self.last_examples: list[tuple[str, str]] = []  # (reference, hypothesis) of the last logged batch

    # ------------------------------------------------------------------ helpers
    def _has_trainer(self) -> bool:
        return getattr(self, "_trainer", None) is not None or getattr(self, "_fabric", None) is not None

    def _log(self, *args: Any, **kwargs: Any) -> None:
        if self._has_trainer():
            self.log(*args, **kwargs)

    def tokenize(self, texts: Sequence[str], device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
        """Texts -> zero-padded targets (B, U_max) and lengths (B,), both int64."""
        ids = [self.tokenizer.encode(t) for t in texts]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        targets = torch.zeros(len(ids), int(lengths.max()) if len(ids) else 0, dtype=torch.long)
        for i, x in enumerate(ids):
            if x:
                targets[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        return targets.to(device), lengths.to(device)

    def _normalize_features(self, x: Tensor, lengths: Tensor) -> Tensor:
        mask = _lengths_to_mask(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        n = mask.sum(1, keepdim=True).clamp(min=1.0)
        mean = (x * mask).sum(1, keepdim=True) / n
        var = (((x - mean) * mask) ** 2).sum(1, keepdim=True) / n
        return (x - mean) / torch.sqrt(var + 1e-5) * mask

    def forward(self, features: Tensor, feature_lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Encoder: (B, T, n_mels) features -> (B, T', d_model) encodings and (B,) lengths."""
        if feature_lengths is None:
            feature_lengths = torch.full((features.shape[0],), features.shape[1], dtype=torch.long,
                                         device=features.device)
        feature_lengths = feature_lengths.to(features.device).long()
        features = features[:, : int(feature_lengths.max())]  # the loss needs T' == max(lengths')
        if self.hparams.input_norm:
            features = self._normalize_features(features, feature_lengths)
        if self.training and self.spec_augment_transforms is not None:
            features = self.spec_augment_transforms(features.transpose(1, 2).unsqueeze(1)).squeeze(1).transpose(1, 2)
        return self.encoder(features, feature_lengths)

    # ------------------------------------------------------------------ losses
    def compute_loss(self, enc_out: Tensor, enc_lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> Tensor:
        if self.hparams.loss == "ctc":
            log_probs = F.log_softmax(self.ctc_head(enc_out).float(), dim=-1)
            return F.ctc_loss(log_probs.transpose(0, 1), targets, enc_lengths, target_lengths,
                              blank=self.blank_id, reduction="mean", zero_infinity=True)
        loss = self._rnnt_loss(enc_out, enc_lengths, targets, target_lengths)
        if self.hparams.ctc_weight > 0:  # auxiliary CTC, summed per utterance like the RNN-T loss
            log_probs = F.log_softmax(self.ctc_head(enc_out).float(), dim=-1)
            ctc = F.ctc_loss(log_probs.transpose(0, 1), targets, enc_lengths, target_lengths,
                             blank=self.blank_id, reduction="sum", zero_infinity=True) / max(1, enc_out.shape[0])
            loss = loss + self.hparams.ctc_weight * ctc
        return loss

    def _rnnt_loss(self, enc_out: Tensor, enc_lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> Tensor:
        from torchaudio.functional import rnnt_loss

        B = enc_out.shape[0]
        # rnnt_loss demands targets.shape[1] == max(target_lengths) and T == max(enc_lengths)
        targets = targets[:, : int(target_lengths.max())] if B else targets
        pred_in = torch.cat([torch.full((B, 1), self.blank_id, dtype=torch.long, device=targets.device), targets], 1)
        pred_out, _, _ = self.predictor(input=pred_in, lengths=target_lengths + 1, state=None)
        enc_p = self.joiner.enc_proj(enc_out)
        pred_p = self.joiner.pred_proj(pred_out)

        def chunk_loss(e: Tensor, p: Tensor, el: Tensor, t: Tensor, tl: Tensor) -> Tensor:
            t_max, u_max = int(el.max()), int(tl.max())
            logits = self.joiner.joint(e[:, :t_max], p[:, : u_max + 1])
            return rnnt_loss(logits.float(), t[:, :u_max].int(), el.int(), tl.int(),
                             blank=self.blank_id, reduction="none")

        chunk = self.hparams.joint_chunk_size
        if not chunk or chunk >= B:
            losses = chunk_loss(enc_p, pred_p, enc_lengths, targets, target_lengths)
        else:
            from torch.utils.checkpoint import checkpoint

            parts = []
            for s in range(0, B, chunk):
                sl = slice(s, s + chunk)
                args = (enc_p[sl], pred_p[sl], enc_lengths[sl], targets[sl], target_lengths[sl])
                if torch.is_grad_enabled():
                    parts.append(checkpoint(chunk_loss, *args, use_reentrant=False))
                else:
                    parts.append(chunk_loss(*args))
            losses = torch.cat(parts)
        return losses.mean()

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode_encoder(self, enc_out: Tensor, enc_lengths: Tensor, decoder: Optional[str] = None) -> list[list[int]]:
        """Token ids (no blanks) per utterance from encoder outputs."""
        decoder = decoder or self.hparams.decoder
        if self.hparams.loss == "ctc":
            return ctc_greedy_decode(self.ctc_head(enc_out), enc_lengths, self.blank_id)
        if decoder == "beam":
            return rnnt_beam_search(self.predictor, self.joiner, enc_out, enc_lengths, self.blank_id,
                                    beam_size=self.hparams.beam_size,
                                    max_symbols_per_frame=self.hparams.max_symbols_per_frame)
        return rnnt_greedy_search(self.predictor, self.joiner, enc_out, enc_lengths, self.blank_id,
                                  max_symbols_per_frame=self.hparams.max_symbols_per_frame)

    @torch.no_grad()
    def transcribe(self, features: Tensor, feature_lengths: Optional[Tensor] = None,
                   decoder: Optional[str] = None) -> list[str]:
        """Features (B, T, n_mels) -> transcripts (uses the module's current train/eval mode)."""
        enc_out, enc_lengths = self(features, feature_lengths)
        return [self.tokenizer.decode(h) for h in self.decode_encoder(enc_out, enc_lengths, decoder)]

    # ------------------------------------------------------------------ steps
    def _batch_loss(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        features = batch["features"]
        enc_out, enc_lengths = self(features, batch.get("feature_lengths"))
        targets, target_lengths = self.tokenize(batch["texts"], enc_out.device)
        return self.compute_loss(enc_out, enc_lengths, targets, target_lengths), enc_out, enc_lengths

    def training_step(self, batch: Optional[dict], batch_idx: int = 0) -> Optional[Tensor]:
        if batch is None:  # every item of the batch was unreadable (collate_asr dropped them): skip it
            return None
        loss, _, _ = self._batch_loss(batch)
        self._log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["texts"]))
        return loss

    def _eval_step(self, batch: Optional[dict], batch_idx: int, stage: str) -> Optional[Tensor]:
        if batch is None:  # every item of the batch was unreadable: nothing to score
            return None
        loss, enc_out, enc_lengths = self._batch_loss(batch)
        hyps = [self.tokenizer.decode(h) for h in self.decode_encoder(enc_out, enc_lengths)]
        refs = [self.tokenizer.normalize(t) for t in batch["texts"]]
        metric = self.val_wer if stage == "val" else self.test_wer
        metric.update(hyps, refs)
        bs = len(refs)
        self._log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        self._log(f"{stage}/wer", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        if batch_idx == 0 and self.hparams.log_examples > 0:
            self._log_examples(stage, batch, refs, hyps)
        return loss

    def validation_step(self, batch: Optional[dict], batch_idx: int = 0) -> Optional[Tensor]:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Optional[dict], batch_idx: int = 0) -> Optional[Tensor]:
        return self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: Optional[dict], batch_idx: int = 0) -> list[str]:
        if batch is None:
            return []
        return self.transcribe(batch["features"], batch.get("feature_lengths"))

    def _log_examples(self, stage: str, batch: dict, refs: list[str], hyps: list[str]) -> None:
        n = min(self.hparams.log_examples, len(refs))
        ids = batch.get("ids") or [str(i) for i in range(len(refs))]
        self.last_examples = list(zip(refs[:n], hyps[:n]))
        if not self._has_trainer():
            return
        logger = self.logger
        try:
            from lightning.pytorch.loggers import TensorBoardLogger
        except Exception:  # pragma: no cover
            return
        if isinstance(logger, TensorBoardLogger):
            lines = [f"**{ids[i]}**  \nREF: `{refs[i]}`  \nHYP: `{hyps[i]}`" for i in range(n)]
            logger.experiment.add_text(f"{stage}/examples", "\n\n".join(lines), global_step=self.global_step)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=(0.9, 0.98),
                                weight_decay=self.hparams.weight_decay)
        if not self.hparams.warmup_steps:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _LinearWarmup(self.hparams.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ pruning structure
    def pruning_groups(self) -> dict[str, list[str]]:
        """The pruning groups (``SparsityRampCallback(groups=[...])``): name -> the weights pruned by their
        own masks. With the ``column`` pattern (a column is an input feature) every group removes whole units:

        * ``ffn``: the second Linear of every feed-forward module (``ffn{1,2}.sequential.4``): a column is a
          hidden unit; the first Linear's row and bias entry follow it (:meth:`pruning_links`), so a 30 %
          column sparsity is a 30 % narrower FFN;
        * ``attention``: ``q_proj``, ``k_proj`` (input features of each projection, separately) and
          ``out_proj`` (a column is one value feature of one head; ``v_proj``'s row and bias entry follow);
        * ``conv``: the two pointwise convolutions of every convolution module (input channels);
        * ``predictor`` (RNN-T): the LSTM's recurrent matrices ``weight_hh_l<k>``: a column is a hidden unit;
          its four gate rows in both matrices, its biases and its column in whatever reads it next (the next
          layer, or the joiner's ``pred_proj``) follow, so the LSTM gets fewer units;
        * ``joiner`` (RNN-T): the joint network's output layer ``joiner.out``: a column is a unit of the joint
          layer; ``enc_proj``'s and ``pred_proj``'s rows and bias entries follow.

        Left dense, on purpose: the convolutional front-end (``encoder.subsampling``: every later layer reads
        it, and it is 3 % of the parameters), the depthwise convolutions (one weight per channel), the token
        embedding, the norms, the biases that no link removes, and the CTC head (an auxiliary output layer).
        """
        layers = range(self.config["num_layers"])
        pre = "encoder.conformer.conformer_layers"
        groups = {
            "ffn": [f"{pre}.{i}.ffn{k}.sequential.4.weight" for i in layers for k in (1, 2)],
            "attention": [f"{pre}.{i}.self_attn.{p}_proj.weight" for i in layers for p in ("q", "k", "out")],
            "conv": [f"{pre}.{i}.conv_module.sequential.{j}.weight" for i in layers for j in (0, 5)],
        }
        if self.hparams.loss == "rnnt":
            groups["predictor"] = [f"predictor.lstm.weight_hh_l{k}" for k in range(self.config["pred_layers"])]
            groups["joiner"] = ["joiner.out.weight"]
        return groups

    def pruning_links(self) -> list[Link]:
        """Which layers feed which, feature by feature (the dependent masks; see
        :mod:`lightning_fedprune.pruning.structure`). The dropouts between linked layers (the FFN's hidden
        dropout, the prediction network's output dropout) are listed in ``between``: a compact client draws
        the masked-dense client's random numbers, so both train the very same numbers (for 3-5 % of a
        compact step of the main job's model: the full-width draws)."""
        links = []
        pre = "encoder.conformer.conformer_layers"
        for i in range(self.config["num_layers"]):
            for k in (1, 2):
                ffn = f"{pre}.{i}.ffn{k}.sequential"
                links.append(Link((f"{ffn}.1.weight", f"{ffn}.1.bias"), (f"{ffn}.4.weight",), between=(f"{ffn}.3",)))
            att = f"{pre}.{i}.self_attn"
            links.append(Link((f"{att}.v_proj.weight", f"{att}.v_proj.bias"), (f"{att}.out_proj.weight",),
                              between=(f"{att}.attend",)))
        if self.hparams.loss == "rnnt":
            n = self.config["pred_layers"]
            for k in range(n):
                lstm = [f"predictor.lstm.{w}_l{k}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                last = k == n - 1
                reader = "joiner.pred_proj.weight" if last else f"predictor.lstm.weight_ih_l{k + 1}"
                links.append(Link(tuple(lstm), (lstm[1], reader), gates=4,
                                  between=("predictor.output_dropout",) if last else ()))
            links.append(Link(("joiner.enc_proj.weight", "joiner.enc_proj.bias", "joiner.pred_proj.weight",
                               "joiner.pred_proj.bias"), ("joiner.out.weight",)))
        return links

    # ------------------------------------------------------------------ info
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_frames_out(self, num_frames: int) -> int:
        return int(subsampled_lengths(torch.tensor([num_frames]))[0])
