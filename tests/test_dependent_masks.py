"""Pruning groups (the selector) and dependent masks (links between layers), against hand-written references."""

import dataclasses

import pytest
import torch
from torch import nn

from lightning_fedprune.asr.conformer_transducer import ConformerTransducer
from lightning_fedprune.callbacks import SparsityRampCallback
from lightning_fedprune.pruning.patterns import compute_mask, groups_from_mask
from lightning_fedprune.pruning.plan import PruningPlan, Ramp, Selection
from lightning_fedprune.pruning.state import PruningState
from lightning_fedprune.pruning.structure import Link, Structure, derive_masks, removed_features, structure_of, wire_pattern

SMALL = dict(preset="tiny", d_model=32, num_heads=4, ffn_dim=48, num_layers=2, conv_kernel_size=5, pred_dim=24,
             joint_dim=20, n_mels=20, subsampling_channels=8, ctc_weight=0.3)


def _shapes(module: nn.Module) -> dict:
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


# ------------------------------------------------------------------ derive_masks against references
def test_ffn_link_removes_the_rows_and_bias_entries_of_dead_hidden_units():
    w2 = torch.ones(3, 6, dtype=torch.bool)
    w2[:, [1, 4]] = False  # hidden units 1 and 4 are pruned
    w2[0, 2] = False  # a partly pruned column is not a removed unit
    shapes = {"fc1.weight": (6, 5), "fc1.bias": (6,), "fc2.weight": (3, 6)}
    out = derive_masks({"fc2.weight": w2}, [Link(("fc1.weight", "fc1.bias"), ("fc2.weight",))], shapes)
    ref_rows = torch.tensor([True, False, True, True, False, True])
    assert torch.equal(out["fc1.weight"], ref_rows[:, None].expand(6, 5))
    assert torch.equal(out["fc1.bias"], ref_rows)
    assert out["fc2.weight"] is w2 or torch.equal(out["fc2.weight"], w2)  # its own mask already removes them
    assert set(out) == set(shapes)


def test_lstm_link_removes_every_gate_row_and_forces_every_reader():
    H, I = 4, 3
    hh = torch.ones(4 * H, H, dtype=torch.bool)
    hh[:, 2] = False  # unit 2's recurrent column
    shapes = {"ih": (4 * H, I), "hh": (4 * H, H), "bih": (4 * H,), "bhh": (4 * H,), "proj": (5, H)}
    link = Link(("ih", "hh", "bih", "bhh"), ("hh", "proj"), gates=4)
    out = derive_masks({"hh": hh}, [link], shapes)
    dead_rows = torch.tensor([r % H == 2 for r in range(4 * H)])
    for name in ("ih", "bih", "bhh"):
        assert torch.equal(out[name], (~dead_rows).reshape(-1, *([1] * (len(shapes[name]) - 1))).expand(shapes[name]))
    ref_hh = torch.ones(4 * H, H, dtype=torch.bool)
    ref_hh[:, 2] = False
    ref_hh[dead_rows] = False
    assert torch.equal(out["hh"], ref_hh)
    ref_proj = torch.ones(5, H, dtype=torch.bool)
    ref_proj[:, 2] = False  # the joiner's pred_proj reads unit 2: forced with it
    assert torch.equal(out["proj"], ref_proj)
    assert wire_pattern(out["hh"], "column") == "unstructured" and wire_pattern(out["ih"]) == "row"
    assert wire_pattern(out["proj"]) == "column"


def test_a_feature_is_removed_only_when_every_masked_reader_prunes_it():
    a = torch.ones(2, 4, dtype=torch.bool)
    a[:, [0, 1]] = False
    b = torch.ones(3, 4, dtype=torch.bool)
    b[:, [1, 2]] = False
    link = Link(("p.weight",), ("a", "b"))
    assert removed_features(link, {"a": a, "b": b}).tolist() == [False, True, False, False]
    assert removed_features(link, {}) is None
    out = derive_masks({"a": a, "b": b}, [link], {"p.weight": (4, 7), "a": (2, 4), "b": (3, 4)})
    assert out["p.weight"].all(1).tolist() == [True, False, True, True]
    assert torch.equal(out["a"], a) and torch.equal(out["b"], b)  # already pruned there


def test_links_read_only_primary_masks_so_their_order_does_not_matter():
    torch.manual_seed(0)
    model = ConformerTransducer(**SMALL)
    structure = structure_of(model)
    params = dict(model.named_parameters())
    primary = {n: compute_mask(params[n].detach(), "column", 0.5) for _, names in structure.groups for n in names}
    shapes = _shapes(model)
    a = derive_masks(primary, structure.links, shapes)
    b = derive_masks(primary, structure.links[::-1], shapes)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # every masked tensor is exactly its own mask AND the rows/columns of removed features
    for link in structure.links:
        removed = removed_features(link, primary)
        for c in link.consumers:
            assert not a[c].reshape(a[c].shape[0], a[c].shape[1], -1)[:, removed].any()
        rows = removed.repeat(link.gates)
        for p in link.producers:
            assert not a[p][rows].any()


def test_link_shapes_are_checked_naming_the_link():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(5, 3)

        def pruning_links(self):
            return [Link(("fc1.weight", "fc1.bias"), ("fc2.weight",))]

    with pytest.raises(ValueError, match=r"producer 'fc1.weight' has 6 rows; a link of 5 features"):
        structure_of(Bad())
    with pytest.raises(ValueError, match=r"`Link.producers` must be a sequence of names"):
        Link("fc1.weight", ("fc2.weight",))
    with pytest.raises(ValueError, match=r"at least one producer and one consumer"):
        Link((), ("fc2.weight",))


def test_wire_pattern_keeps_the_own_pattern_when_it_still_describes_the_mask():
    m = compute_mask(torch.randn(6, 8), "half_column", 0.5)
    assert wire_pattern(m, "half_column") == "half_column"
    m[:, 0] = False  # both halves of column 0 pruned: still half columns
    assert wire_pattern(m, "half_column") == "half_column"
    m[0] = False  # a whole row too: no pattern but the bitmask
    assert wire_pattern(m, "half_column") == "unstructured"


# ------------------------------------------------------------------ the selector
def _named_shapes(model):
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_groups_select_the_tasks_groups_and_union_with_parameters():
    model = ConformerTransducer(**SMALL)
    structure = structure_of(model)
    shapes = _named_shapes(model)
    sel = Selection("column", groups=("ffn", "joiner"), structure=structure)
    names = sel.resolve(shapes)
    assert names == [n for n, _ in shapes if n in set(structure.members("ffn")) | {"joiner.out.weight"}]
    assert all(n.endswith("sequential.4.weight") for n in names[:-1])
    sel = dataclasses.replace(sel, parameters=r"ctc_head\.weight", exclude=r".*layers\.0\..*")
    names = sel.resolve(shapes)
    assert "ctc_head.weight" in names and not any(".layers.0." in n for n in names)
    everything = Selection("column", groups=tuple(structure.group_names), structure=structure).resolve(shapes)
    assert set(everything) == {n for _, ns in structure.groups for n in ns}


def test_group_errors_name_the_argument_and_list_the_groups():
    model = ConformerTransducer(**SMALL)
    shapes = _named_shapes(model)
    sel = Selection("column", groups=("ffn", "decoder"), structure=structure_of(model))
    with pytest.raises(ValueError, match=r"`groups` has \['decoder'\].*its groups are \['ffn', 'attention', 'conv', "
                                         r"'predictor', 'joiner'\]"):
        sel.resolve(shapes)
    plain = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"`groups=\['ffn'\]` needs a task that names its pruning groups"):
        Selection("column", groups=("ffn",), structure=structure_of(plain)).resolve(_named_shapes(plain))
    ctc = ConformerTransducer(**{**SMALL, "ctc_weight": 0.0}, loss="ctc")
    with pytest.raises(ValueError, match=r"`groups` has \['predictor'\].*\['ffn', 'attention', 'conv'\]"):
        Selection("column", groups=("predictor",), structure=structure_of(ctc)).resolve(_named_shapes(ctc))


@pytest.mark.parametrize("groups,match", [
    ("ffn", r"`groups` must be a non-empty list of group names"),
    ([], r"`groups` must be a non-empty list"),
    (["ffn", ""], r"`groups\[1\]` must be a non-empty string"),
    (["ffn", "ffn"], r"`groups` must be a list without repeated names"),
])
def test_ramp_checks_groups_at_construction(groups, match):
    with pytest.raises(ValueError, match=match):
        SparsityRampCallback(groups=groups)


def test_the_ramp_records_groups_in_its_config_only_when_given():
    plan = PruningPlan(Ramp(0.3), Selection("column"))
    assert "groups" not in plan.config()["SparsityRampCallback"]  # a configuration from before groups reads the same
    plan = PruningPlan(Ramp(0.3), Selection("column", groups=("ffn",), structure=Structure((("ffn", ("a",)),))))
    cfg = plan.config()["SparsityRampCallback"]
    assert cfg["groups"] == ["ffn"] and "structure" not in cfg
    assert SparsityRampCallback(groups=["ffn"]).groups == ("ffn",)


# ------------------------------------------------------------------ the pruning state
def _state(model, groups=None, parameters=None, pattern="column"):
    state = PruningState()
    sel = Selection(pattern, groups=groups, parameters=parameters, structure=structure_of(model))
    state.apply_plan(PruningPlan(Ramp(0.5), sel), _named_shapes(model))
    return state


def test_state_adds_dependent_masks_scored_from_the_targets_only():
    torch.manual_seed(0)
    model = ConformerTransducer(**SMALL)
    state = _state(model, groups=("ffn", "attention", "predictor", "joiner"))
    params = dict(model.named_parameters())
    change = state.recompute(params, 0.5, round=0)
    targets = set(state.targets)
    assert set(state.dependents) == set(state.masks) - targets and state.dependents
    # the targets are scored alone (top-k of their column norms), the links add the rest
    primary = {n: compute_mask(params[n].detach(), "column", 0.5, "l2") for n in state.targets}
    reference = derive_masks(primary, state.links, _shapes(model))
    assert reference.keys() == state.masks.keys() and all(torch.equal(reference[n], state.masks[n]) for n in reference)
    v = "encoder.conformer.conformer_layers.0.self_attn.v_proj"
    out = state.masks["encoder.conformer.conformer_layers.0.self_attn.out_proj.weight"]
    assert torch.equal(state.masks[f"{v}.weight"].all(1), out.any(0)) and torch.equal(state.masks[f"{v}.bias"], out.any(0))
    assert state.patterns[f"{v}.weight"] == "row" and state.patterns["predictor.lstm.weight_hh_l0"] == "unstructured"
    assert state.target_patterns == {n: "column" for n in state.targets}
    for n, m in state.masks.items():  # every mask travels with a pattern that describes it
        groups_from_mask(m, state.patterns[n], n)
    assert change.pruned == sum(int((~m).sum()) for m in state.masks.values())
    assert abs(state.masked_sparsity() - sum(int((~m).sum()) for m in state.masks.values())
               / sum(m.numel() for m in state.masks.values())) < 1e-12
    # prune/sparsity is the targets' own: the plan's 0.5 (the links' rows and columns come on top)
    assert state.sparsity() == 1 - sum(int(primary[n].sum()) for n in state.targets) / sum(
        primary[n].numel() for n in state.targets) and abs(state.sparsity() - 0.5) < 0.01
    assert state.masked_sparsity() > state.sparsity()
    # the sparsity is allocated to the targets; an LSTM unit is a row block and a column of weight_hh
    assert state.layer_sparsity == {n: 0.5 for n in state.targets}
    assert state.actual_layer_sparsity()["predictor.lstm.weight_hh_l0"] == 0.75
    # recomputing at the same weights changes nothing; a state dict round trip keeps everything
    assert state.recompute(params, 0.5, round=1).flips == 0
    other = PruningState()
    other.plan = state.plan
    other.targets = state.targets
    other.load_state_dict(state.state_dict())
    assert other.patterns == state.patterns and other.target_patterns == state.target_patterns
    assert other.sparsity() == state.sparsity()
    assert other.recompute(params, 0.5, round=2).flips == 0


def test_dependent_masks_that_are_no_longer_needed_count_as_restored():
    torch.manual_seed(0)
    model = ConformerTransducer(**SMALL)
    state = _state(model, groups=("ffn",))
    params = dict(model.named_parameters())
    state.recompute(params, 0.5, round=0)
    pruned_before = sum(int((~m).sum()) for m in state.masks.values())
    change = state.recompute(params, 0.0, round=1)
    assert change.restored == pruned_before and change.pruned == 0 and set(state.masks) == set(state.targets)


def test_an_old_checkpoint_without_target_patterns_scores_with_its_patterns():
    state = PruningState()
    state.configure(["w"], "row", "weight_l2")
    sd = state.state_dict()
    sd.pop("target_patterns")
    sd["patterns"] = {"w": "column"}
    state.load_state_dict(sd)
    assert state.target_patterns == {"w": "column"}


def test_dependent_masks_false_prunes_exactly_the_selection():
    torch.manual_seed(0)
    model = ConformerTransducer(**SMALL)
    state = PruningState()
    sel = Selection("column", groups=("ffn", "predictor"), structure=structure_of(model), dependent_masks=False)
    state.apply_plan(PruningPlan(Ramp(0.5), sel), _named_shapes(model))
    state.recompute(dict(model.named_parameters()), 0.5, round=0)
    assert set(state.masks) == set(state.targets) and not state.dependents
    assert state.patterns == {n: "column" for n in state.targets}
    assert state.sparsity() == state.masked_sparsity()
    assert PruningPlan(Ramp(0.5), sel).config()["SparsityRampCallback"]["dependent_masks"] is False
    with pytest.raises(ValueError, match=r"`dependent_masks` must be"):
        SparsityRampCallback(dependent_masks="yes")
