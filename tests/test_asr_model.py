"""Tests for the ASR task: tokenizer, Conformer-Transducer LightningModule and decoders."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch import nn

torchaudio = pytest.importorskip("torchaudio")

from lightning_fedprune.asr.conformer_transducer import PRESETS, ConformerTransducer  # noqa: E402
from lightning_fedprune.asr.decoding import ctc_greedy_decode, rnnt_beam_search, rnnt_greedy_search  # noqa: E402
from lightning_fedprune.asr.tokenizer import CharTokenizer  # noqa: E402

SMALL = dict(d_model=32, num_layers=1, num_heads=2, ffn_dim=64, conv_kernel_size=3, pred_dim=32,
             joint_dim=32, dropout=0.0, n_mels=20, subsampling_channels=8, log_examples=2)
WORDS = "the cat sat on a mat dog ran far".split()


def make_batch(b=4, t=40, n_mels=20, seed=0, words=6):
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    lengths[0] = t
    return {
        "features": torch.randn(b, t, n_mels, generator=g),
        "feature_lengths": lengths,
        "texts": [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, words))) for _ in range(b)],
        "speakers": [f"spk{i % 2}" for i in range(b)],
        "ids": [f"utt{i}" for i in range(b)],
    }


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_blank_last():
    tok = CharTokenizer()
    assert tok.vocab_size == 29 and tok.blank_id == tok.vocab_size - 1
    text = "it's a test of the tokenizer"
    ids = tok.encode(text)
    assert tok.blank_id not in ids and max(ids) < tok.blank_id
    assert tok.decode(ids) == text
    assert tok.encode("  Hello,\tWORLD!! 42 ") == tok.encode("hello world")
    assert tok.normalize("Don\u2019t  stop-me") == "don't stop me"
    assert tok.decode(ids[:3] + [tok.blank_id] + ids[3:]) == text  # blanks are skipped
    assert tok.encode("") == [] and tok.decode([]) == ""


# --------------------------------------------------------------------------- scripted decoders
class ScriptedPredictor(nn.Module):
    """Output = number of non-blank tokens fed so far (batch-first state, like the real one)."""

    def __init__(self, blank):
        super().__init__()
        self.blank = blank

    def forward(self, input, lengths, state=None):  # noqa: A002
        count = torch.zeros(input.shape[0], 1) if state is None else state[0][0]
        counts = count + (input != self.blank).float().cumsum(1)  # (B, U)
        return counts.unsqueeze(-1), lengths, [[counts[:, -1:]]]


class ScriptedJoiner(nn.Module):
    """Encoder frame = (t, utterance index). Having emitted ``u`` tokens at frame ``t``, the joiner
    strongly prefers ``seq[u]`` while ``u < emitted_by[t]`` and the blank otherwise."""

    def __init__(self, scripts, vocab, blank, peak=10.0):
        super().__init__()
        self.vocab, self.blank, self.peak = vocab, blank, peak
        n_utt, n_t = len(scripts), max(len(s) for s in scripts)
        seq_max = max(1, max(sum(len(f) for f in s) for s in scripts))
        self.seq = torch.full((n_utt, seq_max + 8), blank, dtype=torch.long)
        self.emitted_by = torch.zeros(n_utt, n_t, dtype=torch.long)
        for i, frames in enumerate(scripts):
            flat = [tok for f in frames for tok in f]
            self.seq[i, : len(flat)] = torch.tensor(flat, dtype=torch.long)
            c = 0
            for t, f in enumerate(frames):
                c += len(f)
                self.emitted_by[i, t] = c

    def forward(self, source_encodings, source_lengths, target_encodings, target_lengths):
        t = source_encodings[..., 0].long().unsqueeze(2)  # (B, T, 1)
        utt = source_encodings[..., 1].long().unsqueeze(2)  # (B, T, 1)
        u = target_encodings[..., 0].long().unsqueeze(1)  # (B', 1, U)
        u = u.clamp(max=self.seq.shape[1] - 1)
        tok = torch.where(u < self.emitted_by[utt, t], self.seq[utt, u], torch.full_like(u, self.blank))
        logits = torch.nn.functional.one_hot(tok, self.vocab).float() * self.peak
        return logits, source_lengths, target_lengths


def scripted_encoder_out(scripts):
    T = max(len(s) for s in scripts)
    enc = torch.zeros(len(scripts), T, 2)
    enc[:, :, 0] = torch.arange(T).float()
    enc[:, :, 1] = torch.arange(len(scripts)).float().unsqueeze(1)
    return enc, torch.tensor([len(s) for s in scripts])


SCRIPTS = [
    [[3], [], [4, 5], [], [0, 6]],  # 5 frames
    [[], [7, 7], [2]],  # 3 frames (padded to 5 in the batch)
    [[], [], []],  # emits nothing
]
EXPECTED = [[3, 4, 5, 0, 6], [7, 7, 2], []]


def test_greedy_search_follows_script():
    V = 29
    blank = V - 1
    pred, joiner = ScriptedPredictor(blank), ScriptedJoiner(SCRIPTS, V, blank)
    enc, lengths = scripted_encoder_out(SCRIPTS)
    assert rnnt_greedy_search(pred, joiner, enc, lengths, blank, max_symbols_per_frame=5) == EXPECTED
    # frames beyond an utterance's length are ignored
    assert rnnt_greedy_search(pred, joiner, enc, torch.tensor([3, 3, 3]), blank)[0] == [3, 4, 5]


def test_greedy_search_max_symbols_per_frame():
    V, blank = 29, 28
    scripts = [[[1, 2, 3]], [[1, 2, 3], [], []]]
    pred, joiner = ScriptedPredictor(blank), ScriptedJoiner(scripts, V, blank)
    enc, lengths = scripted_encoder_out(scripts)
    # one frame only: at most 2 symbols; with more frames the delayed symbol comes one frame later
    assert rnnt_greedy_search(pred, joiner, enc, lengths, blank, max_symbols_per_frame=2) == [[1, 2], [1, 2, 3]]
    assert rnnt_greedy_search(pred, joiner, enc, lengths, blank, max_symbols_per_frame=1) == [[1], [1, 2, 3]]


def test_greedy_search_any_blank_id():
    V, blank = 29, 0  # greedy search itself does not care where the blank is
    scripts = [[[3], [4, 5]]]
    pred, joiner = ScriptedPredictor(blank), ScriptedJoiner(scripts, V, blank)
    enc, lengths = scripted_encoder_out(scripts)
    assert rnnt_greedy_search(pred, joiner, enc, lengths, blank) == [[3, 4, 5]]


def test_beam_search_matches_greedy_on_peaked_model():
    V = 29
    blank = V - 1
    pred, joiner = ScriptedPredictor(blank), ScriptedJoiner(SCRIPTS, V, blank)
    enc, lengths = scripted_encoder_out(SCRIPTS)
    greedy = rnnt_greedy_search(pred, joiner, enc, lengths, blank)
    for beam in (1, 4):
        assert rnnt_beam_search(pred, joiner, enc, lengths, blank, beam_size=beam) == greedy == EXPECTED
    # RNNTBeamSearch hard-codes blank = last id: any other blank must be refused
    with pytest.raises(ValueError, match="blank"):
        rnnt_beam_search(ScriptedPredictor(0), ScriptedJoiner(SCRIPTS, V, 0), enc, lengths, 0)


def test_beam_search_on_real_modules():
    """The task's own predictor/joiner through RNNTBeamSearch (blank-last end to end)."""
    torch.manual_seed(0)
    m = ConformerTransducer(**SMALL).eval()
    with torch.no_grad():
        enc, lengths = m(torch.randn(2, 24, 20), torch.tensor([24, 16]))
        beam = m.decode_encoder(enc, lengths, "beam")
        assert len(beam) == 2 and all(0 <= t < m.blank_id for h in beam for t in h)
        m.joiner.out.weight.mul_(0.01)
        m.joiner.out.bias.zero_()
        m.joiner.out.bias[m.blank_id] = 8.0  # a peaked "say nothing" model: both decoders agree
        assert m.decode_encoder(enc, lengths, "greedy") == m.decode_encoder(enc, lengths, "beam") == [[], []]
        m.joiner.out.bias[m.blank_id] = -8.0  # blank never wins: every frame hits the symbol limit
        g = m.decode_encoder(enc, lengths, "greedy")
        assert [len(h) for h in g] == [m.hparams.max_symbols_per_frame * int(n) for n in lengths]


def test_ctc_greedy_collapse():
    blank = 4
    seq = torch.tensor([[0, 0, 4, 0, 1, 1, 4, 4, 2, 3], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4]])
    logits = torch.nn.functional.one_hot(seq, 5).float()
    assert ctc_greedy_decode(logits, torch.tensor([10, 10]), blank) == [[0, 0, 1, 2, 3], []]
    assert ctc_greedy_decode(logits, torch.tensor([6, 3]), blank) == [[0, 0, 1], []]
    assert ctc_greedy_decode(logits, None, blank)[0] == [0, 0, 1, 2, 3]


# --------------------------------------------------------------------------- WER
def test_wer_matches_jiwer():
    jiwer = pytest.importorskip("jiwer")
    from torchmetrics.text import WordErrorRate

    refs = ["the cat sat on the mat", "hello world", "a b c d", "it's fine", "one"]
    hyps = ["the cat sat on mat", "hello word", "", "it's fine", "one two three"]
    metric = WordErrorRate()
    # two updates, as in two validation batches: the metric must aggregate like corpus WER
    metric.update(hyps[:2], refs[:2])
    metric.update(hyps[2:], refs[2:])
    assert float(metric.compute()) == pytest.approx(jiwer.wer(refs, hyps), abs=1e-6)
    for r, h in zip(refs, hyps):
        m = WordErrorRate()
        m.update([h], [r])
        assert float(m.compute()) == pytest.approx(jiwer.wer(r, h), abs=1e-6)


# --------------------------------------------------------------------------- the module
def test_presets_and_parameter_names():
    tiny = ConformerTransducer(preset="tiny")
    n_tiny = tiny.num_parameters()
    assert 2.5e6 < n_tiny < 4.5e6
    with torch.device("meta"):  # count without allocating 0.5 GB
        paper = ConformerTransducer(preset="paper")
    n_paper = paper.num_parameters()
    assert 1.1e8 < n_paper < 1.3e8
    assert len(paper.encoder.conformer.conformer_layers) == PRESETS["paper"]["num_layers"] == 17
    names = dict(tiny.named_parameters())
    for n in ["encoder.subsampling.conv.0.weight", "encoder.conformer.conformer_layers.0.ffn1.sequential.1.weight",
              "encoder.conformer.conformer_layers.3.self_attn.out_proj.weight", "predictor.lstm.weight_ih_l0",
              "joiner.out.weight"]:
        assert n in names
    assert not any("running_mean" in n for n, _ in tiny.named_buffers())  # GroupNorm by default
    ctc = ConformerTransducer(preset="tiny", loss="ctc")
    assert not hasattr(ctc, "predictor") and ctc.num_parameters() < n_tiny
    with pytest.raises(ValueError):
        ConformerTransducer(preset="huge")


def lean_loop(model, batch, steps):
    """What a federated client does: no Trainer, just training_step + configure_optimizers."""
    cfg = model.configure_optimizers()
    opt = cfg["optimizer"] if isinstance(cfg, dict) else cfg
    sched = cfg["lr_scheduler"]["scheduler"] if isinstance(cfg, dict) else None
    model.train()
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = model.training_step(batch, i)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach().item())
    return losses


def test_rnnt_loss_decreases_in_lean_loop():
    torch.manual_seed(0)
    model = ConformerTransducer(**SMALL, lr=5e-3, warmup_steps=3)
    batch = make_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in particular no "self.log without a Trainer" warning
        losses = lean_loop(model, batch, 20)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses


def test_ctc_loss_decreases_and_decodes():
    torch.manual_seed(0)
    model = ConformerTransducer(**SMALL, loss="ctc", lr=5e-3, spec_augment=True)
    batch = make_batch()
    losses = lean_loop(model, batch, 12)
    assert losses[-1] < losses[0], losses
    model.eval()
    out = model.transcribe(batch["features"], batch["feature_lengths"])
    assert len(out) == 4 and all(isinstance(s, str) for s in out)
    with torch.no_grad():
        model.validation_step(batch, 0)  # no trainer: metric still updated
    assert 0.0 <= float(model.val_wer.compute())
    assert len(model.last_examples) == 2


def test_joint_chunking_matches_full_batch_and_edge_cases():
    torch.manual_seed(0)
    full = ConformerTransducer(**SMALL)
    chunked = ConformerTransducer(**SMALL, joint_chunk_size=2)
    chunked.load_state_dict(full.state_dict())
    batch = make_batch(b=5, seed=1)
    batch["texts"][3] = ""  # an empty transcript
    losses = []
    for m in (full, chunked):
        m.train()
        m.zero_grad()
        loss = m.training_step(batch, 0)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-4)
    for (n, p1), p2 in zip(full.named_parameters(), chunked.parameters()):
        assert torch.allclose(p1.grad, p2.grad, rtol=1e-3, atol=1e-5), n
    # all transcripts empty, very short inputs, padding beyond the longest utterance
    b = make_batch(b=2, t=5)
    b["texts"] = ["", ""]
    b["features"] = torch.nn.functional.pad(b["features"], (0, 0, 0, 3))
    assert torch.isfinite(full.training_step(b, 0))


def test_warmup_schedule_config():
    model = ConformerTransducer(**SMALL, warmup_steps=4)
    cfg = model.configure_optimizers()
    assert cfg["lr_scheduler"]["interval"] == "step"
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(model.hparams.lr / 4) and lrs[-1] == pytest.approx(model.hparams.lr)
    assert isinstance(ConformerTransducer(**SMALL).configure_optimizers(), torch.optim.AdamW)


def test_trainer_fast_dev_run_logs_val_wer(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = ConformerTransducer(**SMALL)
    batches = [make_batch(seed=s) for s in range(2)]
    loader = DataLoader(batches, batch_size=None)  # already collated batches
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader, loader)
    for key in ("train/loss", "val/loss", "val/wer"):
        assert key in trainer.callback_metrics, trainer.callback_metrics.keys()
    assert float(trainer.callback_metrics["val/wer"]) >= 0.0

    # validate with a TensorBoard logger: decoded examples are written as text
    logger = TensorBoardLogger(str(tmp_path), name="asr")
    trainer = L.Trainer(logger=logger, limit_test_batches=1, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    res = trainer.test(model, loader, verbose=False)
    assert "test/wer" in res[0] and "test/loss" in res[0]
    logger.experiment.flush()
    assert list(tmp_path.rglob("events.out.tfevents*"))
    assert len(model.last_examples) == 2


# --------------------------------------------------------------------------- attention with separate projections
def test_self_attention_computes_what_nn_multihead_attention_computes():
    from lightning_fedprune.asr.conformer_transducer import SelfAttention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dropout=0.0)
    ours = SelfAttention.from_multihead(mha)
    x = torch.randn(9, 3, 16)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 3:] = True
    for module in (mha, ours):
        module.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, _ = mha(xa, xa, xa, key_padding_mask=pad, need_weights=False)
    b, weights = ours(xb, xb, xb, key_padding_mask=pad)
    assert weights is None
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    g = torch.randn_like(a)
    (a * g).sum().backward()
    (b * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=0)
    for proj, sl in (("q_proj", slice(0, 16)), ("k_proj", slice(16, 32)), ("v_proj", slice(32, 48))):
        torch.testing.assert_close(getattr(ours, proj).weight.grad, mha.in_proj_weight.grad[sl], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.out_proj.weight.grad, mha.out_proj.weight.grad, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match=r"`embed_dim` \(10\) must be divisible by `num_heads` \(4\)"):
        SelfAttention(10, 4)


def test_the_model_is_initialised_as_the_nn_multihead_attention_version_was():
    """The q/k/v weights are the packed projection's chunks, drawn with the same random numbers: a seeded
    model starts where the same seed started before attention had separate projections."""
    from torchaudio.models import Conformer

    torch.manual_seed(0)
    model = ConformerTransducer(preset="tiny", **{k: v for k, v in SMALL.items()})
    torch.manual_seed(0)
    from lightning_fedprune.asr.conformer_transducer import ConvSubsampling

    ConvSubsampling(SMALL["n_mels"], SMALL["d_model"], SMALL["subsampling_channels"])  # the encoder's first module
    packed = Conformer(input_dim=SMALL["d_model"], num_heads=SMALL["num_heads"], ffn_dim=SMALL["ffn_dim"],
                       num_layers=SMALL["num_layers"], depthwise_conv_kernel_size=SMALL["conv_kernel_size"],
                       dropout=SMALL["dropout"], use_group_norm=True)
    for ours, theirs in zip(model.encoder.conformer.conformer_layers, packed.conformer_layers):
        q, k, v = theirs.self_attn.in_proj_weight.chunk(3)
        assert torch.equal(ours.self_attn.q_proj.weight, q) and torch.equal(ours.self_attn.v_proj.weight, v)
        assert torch.equal(ours.self_attn.k_proj.weight, k)
        assert torch.equal(ours.self_attn.out_proj.weight, theirs.self_attn.out_proj.weight)
        assert torch.equal(ours.ffn2.sequential[4].weight, theirs.ffn2.sequential[4].weight)


def test_a_state_dict_with_the_packed_in_projection_loads():
    torch.manual_seed(0)
    model = ConformerTransducer(preset="tiny", **SMALL)
    old = {}
    for k, v in model.state_dict().items():
        if ".self_attn.q_proj." in k:
            kind = k.rsplit(".", 1)[1]
            prefix = k.split(".self_attn.")[0] + ".self_attn."
            parts = [model.state_dict()[f"{prefix}{p}_proj.{kind}"] for p in "qkv"]
            old[f"{prefix}in_proj_{kind}"] = torch.cat(parts)
        elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        else:
            old[k] = v
    fresh = ConformerTransducer(preset="tiny", **SMALL)
    fresh.load_state_dict(old)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_pruning_groups_cover_the_model_and_every_link_holds():
    from lightning_fedprune.pruning.structure import structure_of

    model = ConformerTransducer(preset="tiny", subsampling_channels=32, pred_dim=256, joint_dim=256, ctc_weight=0.3)
    structure = structure_of(model)  # checks every name and every link's shapes
    assert structure.group_names == ("ffn", "attention", "conv", "predictor", "joiner")
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    masked = {n for _, names in structure.groups for n in names}
    for link in structure.links:
        masked.update(link.producers, link.consumers)
    share = sum(sizes[n] for n in masked) / sum(sizes.values())
    assert share > 0.95  # the main job's model: everything but the front-end, norms, embedding and CTC head
    assert not any(n.startswith(("encoder.subsampling", "ctc_head", "predictor.embedding")) for n in masked)
    group_of = structure.group_of()
    assert group_of["encoder.conformer.conformer_layers.0.ffn1.sequential.1.bias"] == "ffn"
    assert group_of["encoder.conformer.conformer_layers.3.self_attn.v_proj.weight"] == "attention"
    assert group_of["joiner.pred_proj.weight"] in ("predictor", "joiner")
    ctc = ConformerTransducer(preset="tiny", loss="ctc")
    assert structure_of(ctc).group_names == ("ffn", "attention", "conv")
