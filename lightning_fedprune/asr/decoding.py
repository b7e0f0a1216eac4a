"""Decoders for the Conformer-Transducer task.

All RNN-T decoders take the prediction and joint networks through the interface of
``torchaudio.models.RNNT``'s components, so they work with the task's own modules and with
hand-built stand-ins in tests:

* ``predictor(input=LongTensor(B, U), lengths=LongTensor(B,), state=None | list[list[Tensor]])``
  -> ``(out (B, U, D), lengths, state)``; every state tensor is **batch-first** (the beam
  search concatenates / slices states along dim 0).
* ``joiner(source_encodings=(B, T, De), source_lengths, target_encodings=(B, U, Dp),
  target_lengths)`` -> ``(logits (B, T, U, V), source_lengths, target_lengths)``; it must
  broadcast a batch of 1 in ``source_encodings`` against a batch of hypotheses.

The blank id is the start-of-sequence symbol of the prediction network and must be the
last vocabulary id (``V - 1``) for :func:`rnnt_beam_search` (``RNNTBeamSearch`` hard-codes
it); :func:`rnnt_greedy_search` accepts any blank id.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["ctc_greedy_decode", "rnnt_greedy_search", "rnnt_beam_search", "strip_blank"]


def strip_blank(tokens, blank: int) -> list[int]:
    return [int(t) for t in tokens if int(t) != blank]


@torch.no_grad()
def ctc_greedy_decode(logits: Tensor, lengths: Optional[Tensor], blank: int) -> list[list[int]]:
    """Best-path CTC decoding: per-frame argmax, collapse repeats, drop blanks.

    ``logits``: (B, T, V) (log-)probabilities or raw scores; ``lengths``: (B,) valid frames.
    """
    best = logits.argmax(dim=-1).cpu()
    B, T = best.shape
    lens = [T] * B if lengths is None else [int(x) for x in lengths.cpu()]
    out: list[list[int]] = []
    for b in range(B):
        seq = best[b, : lens[b]].tolist()
        hyp, prev = [], None
        for tok in seq:
            if tok != prev and tok != blank:
                hyp.append(tok)
            prev = tok
        out.append(hyp)
    return out


def _select_state(mask: Tensor, new: List[List[Tensor]], old: List[List[Tensor]]) -> List[List[Tensor]]:
    res = []
    for n_layer, o_layer in zip(new, old):
        res.append([torch.where(mask.view(-1, *([1] * (n.dim() - 1))), n, o) for n, o in zip(n_layer, o_layer)])
    return res


@torch.no_grad()
def rnnt_greedy_search(
    predictor: nn.Module,
    joiner: nn.Module,
    encoder_out: Tensor,
    encoder_lengths: Tensor,
    blank: int,
    max_symbols_per_frame: int = 5,
) -> list[list[int]]:
    """Batched greedy RNN-T decoding.

    At each encoder frame the joint network is evaluated with the current prediction-network
    output; a non-blank argmax is emitted (and the prediction network advanced, only for the
    utterances that emitted) up to ``max_symbols_per_frame`` times; a blank moves to the next
    frame. Returns one token list (no blanks) per utterance.
    """
    B, T, _ = encoder_out.shape
    device = encoder_out.device
    lengths = encoder_lengths.to(device)
    one = torch.ones(B, dtype=torch.long, device=device)
    tokens = torch.full((B, 1), blank, dtype=torch.long, device=device)
    pred_out, _, state = predictor(input=tokens, lengths=one, state=None)  # (B, 1, Dp)
    hyps: list[list[int]] = [[] for _ in range(B)]
    for t in range(T):
        frame = encoder_out[:, t : t + 1]  # (B, 1, De)
        active = t < lengths
        if not bool(active.any()):
            break
        for _ in range(max_symbols_per_frame):
            logits, _, _ = joiner(
                source_encodings=frame, source_lengths=one, target_encodings=pred_out, target_lengths=one
            )
            best = logits[:, 0, 0].argmax(dim=-1)  # (B,)
            emit = active & (best != blank)
            if not bool(emit.any()):
                break
            for b in emit.nonzero().flatten().tolist():
                hyps[b].append(int(best[b]))
            new_out, _, new_state = predictor(input=best.unsqueeze(1), lengths=one, state=state)
            pred_out = torch.where(emit.view(B, 1, 1), new_out, pred_out)
            state = _select_state(emit, new_state, state)
            active = emit
    return hyps


class _IdentityTranscriber(nn.Module):
    """Lets ``RNNTBeamSearch`` search over precomputed encoder outputs."""

    def forward(self, input: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:  # noqa: A002
        return input, lengths


@torch.no_grad()
def rnnt_beam_search(
    predictor: nn.Module,
    joiner: nn.Module,
    encoder_out: Tensor,
    encoder_lengths: Tensor,
    blank: int,
    beam_size: int = 4,
    max_symbols_per_frame: int = 5,
) -> list[list[int]]:
    """Per-utterance beam search with ``torchaudio.models.RNNTBeamSearch``.

    The predictor/joiner are wrapped in a throw-away ``torchaudio.models.RNNT`` whose
    transcriber is the identity, so the already computed ``encoder_out`` is searched.
    Returns the best hypothesis (no blanks) per utterance.
    """
    from torchaudio.models import RNNT, RNNTBeamSearch

    B = encoder_out.shape[0]
    if B == 0:
        return []
    device = encoder_out.device
    one = torch.ones(1, dtype=torch.long, device=device)
    # RNNTBeamSearch always uses the last vocabulary id as blank: check that it is ours.
    p, _, _ = predictor(input=torch.full((1, 1), blank, dtype=torch.long, device=device), lengths=one, state=None)
    v = joiner(source_encodings=encoder_out[:1, :1], source_lengths=one, target_encodings=p, target_lengths=one)[0]
    if blank != v.shape[-1] - 1:
        raise ValueError(f"RNNTBeamSearch needs blank == vocab_size - 1 = {v.shape[-1] - 1}, got blank={blank}")
    model = RNNT(_IdentityTranscriber(), predictor, joiner)
    search = RNNTBeamSearch(model, blank=blank, step_max_tokens=max_symbols_per_frame)
    hyps: list[list[int]] = []
    for b in range(B):
        n = max(1, int(encoder_lengths[b]))
        nbest = search(encoder_out[b, :n], torch.tensor([n], device=device), beam_size)
        hyps.append(strip_blank(nbest[0][0], blank) if nbest else [])
    return hyps
