"""Phase (a): sparsity rises from 0 to the target, in one shot or by a schedule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedprune.callbacks._common import fed_module, find_callback, log_round
from lightning_fedprune.pruning.importance import IMPORTANCE, parse_importance
from lightning_fedprune.pruning.patterns import PATTERNS, check_pattern
from lightning_fedprune.pruning.schedules import SCHEDULES, sparsity_at, validate_schedule
from lightning_fedprune.validation import check_choice, check_float, check_int, check_regex

MOMENTUM_SOURCES = ("ema", "server_optimizer")


class SparsityRampCallback(pl.Callback):
    """Phase (a) of Federated Pruning: ramp the sparsity of the chosen parameters from 0 to ``target_sparsity``.

    At the start of a round the server recomputes the masks from importance scores (the
    ``on_fed_round_start`` hook), so the round's clients already receive the pruned model.

    Args:
        target_sparsity: final fraction ``S`` of pruned entries over the prunable parameters, in ``[0, 1)``.
        start_round: first round at which masks are computed (before it the model is dense).
        end_round: round from which the sparsity stays at ``S`` (default: ``start_round``, i.e. one shot).
        schedule: ``"one_shot"``, ``"linear"``, ``"cubic"`` (polynomial, Zhu & Gupta 2017) or ``"step"``.
        power: exponent of the ``cubic`` schedule.
        num_steps: number of increments of the ``step`` schedule.
        every_n_rounds: during the ramp, recompute the masks every this many rounds (the final
            ``end_round`` update always happens).
        pattern: ``"unstructured"``, ``"row"``, ``"column"``, ``"half_row"`` or ``"half_column"``
            (see docs/concepts.md for the 2-D view of >2-D tensors and the half split).
        importance: ``"weight_l1"``, ``"weight_l2"``, ``"gradient_l1"``, ``"gradient_l2"``,
            ``"momentum_l1"``, ``"momentum_l2"`` or ``"weight_x_gradient"``. Gradients and momenta
            are server-side statistics that cost no traffic: the aggregated pseudo-gradient and its
            exponential moving average (or the server optimiser's momentum, see ``momentum_source``).
        parameters: regular expression (``re.fullmatch``) over the task's parameter names
            (``encoder.layers.0.ffn.linear1.weight``); default: every parameter with 2 or more
            dimensions (weights of Linear, Conv, Embedding, attention projections; no biases or norms).
        exclude: optional regular expression of names to leave dense.
        momentum_beta: EMA factor of the pseudo-gradient momentum (``momentum_source="ema"``).
        momentum_source: ``"ema"`` (default) or ``"server_optimizer"`` (``sgdm``'s momentum buffer /
            ``adam``'s first moment).
    """

    def __init__(
        self,
        target_sparsity: float = 0.5,
        start_round: int = 0,
        end_round: int | None = None,
        schedule: str = "cubic",
        power: float = 3.0,
        num_steps: int = 4,
        every_n_rounds: int = 1,
        pattern: str = "unstructured",
        importance: str = "weight_l2",
        parameters: str | None = None,
        exclude: str | None = None,
        momentum_beta: float = 0.9,
        momentum_source: str = "ema",
    ) -> None:
        target_sparsity = check_float(target_sparsity, "target_sparsity", min=0, max=1, max_open=True)
        start_round = check_int(start_round, "start_round", min=0)
        end_round = check_int(end_round, "end_round", min=0, optional=True)
        check_choice(schedule, "schedule", SCHEDULES)
        if end_round is None:
            end_round = start_round
        if end_round < start_round:
            raise ValueError(f"`end_round` ({end_round}) must be >= `start_round` ({start_round}).")
        validate_schedule(target=target_sparsity, start_round=start_round, end_round=end_round, schedule=schedule,
                          power=power, num_steps=num_steps)
        every_n_rounds = check_int(every_n_rounds, "every_n_rounds", min=1)
        check_choice(pattern, "pattern", PATTERNS)
        check_choice(importance, "importance", IMPORTANCE)
        source, _ = parse_importance(importance)
        if source != "weight" and start_round < 1:
            raise ValueError(
                f"`importance={importance!r}` uses server-side gradient statistics, which exist only after a round has "
                f"been aggregated: `start_round` must be >= 1, got {start_round}."
            )
        self._parameters = check_regex(parameters, "parameters")  # compiled once; the strings stay for YAML
        self._exclude = check_regex(exclude, "exclude")
        momentum_beta = check_float(momentum_beta, "momentum_beta", min=0, max=1, max_open=True)
        check_choice(momentum_source, "momentum_source", MOMENTUM_SOURCES)
        self.target_sparsity = target_sparsity
        self.start_round = start_round
        self.end_round = end_round
        self.schedule = schedule
        self.power = power
        self.num_steps = num_steps
        self.every_n_rounds = every_n_rounds
        self.pattern = pattern
        self.importance = importance
        self.parameters = parameters
        self.exclude = exclude
        self.momentum_beta = momentum_beta
        self.momentum_source = momentum_source
        self.targets: list[str] = []
        self._refine: Any = None
        self._freeze: Any = None
        self._round_flips = 0
        self._round_restored = 0
        self._reapply = False

    def config(self) -> dict[str, Any]:
        """The settings, stored in checkpoints and compared on resume; ``targets`` are the parameter
        names the regexes selected (known after ``setup``)."""
        return {
            "target_sparsity": self.target_sparsity, "start_round": self.start_round, "end_round": self.end_round,
            "schedule": self.schedule, "power": self.power, "num_steps": self.num_steps,
            "every_n_rounds": self.every_n_rounds, "pattern": self.pattern, "importance": self.importance,
            "parameters": self.parameters, "exclude": self.exclude, "momentum_beta": self.momentum_beta,
            "momentum_source": self.momentum_source, "targets": list(self.targets),
        }

    # ------------------------------------------------------------------ setup
    def resolve_targets(self, task: torch.nn.Module) -> list[str]:
        """Names of the task's parameters this callback prunes (raises if none match)."""
        selected = [name for name, p in task.named_parameters()
                    if (p.dim() >= 2 if self._parameters is None else self._parameters.fullmatch(name) is not None)]
        what = f"`parameters={self.parameters!r}`" if self.parameters is not None else "the default (tensors with >= 2 dims)"
        sample = ", ".join(n for n, _ in list(task.named_parameters())[:8])
        if not selected:
            raise ValueError(f"{what} matches no parameter of the task. Some parameter names: {sample} ...")
        names = [n for n in selected if self._exclude is None or self._exclude.fullmatch(n) is None]
        if not names:
            raise ValueError(
                f"`exclude={self.exclude!r}` removes every parameter that {what} selects ({', '.join(selected[:8])}"
                f"{' ...' if len(selected) > 8 else ''}): nothing is left to prune."
            )
        return names

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_fedprune.callbacks.adaptive import AdaptiveLayerSparsity
        from lightning_fedprune.callbacks.finetune import FineTuneFreeze
        from lightning_fedprune.callbacks.mask_refinement import MaskRefinementCallback

        fed = fed_module(pl_module, "SparsityRampCallback")
        find_callback(trainer, SparsityRampCallback)
        self.targets = self.resolve_targets(fed.task)
        params = dict(fed.task.named_parameters())
        for name in self.targets:
            check_pattern(self.pattern, params[name].shape, name=name)
        if self.momentum_source == "server_optimizer" and fed.server_optimizer_name == "sgd" \
                and self.importance.startswith("momentum"):
            raise ValueError("`momentum_source='server_optimizer'` needs server_optimizer 'sgdm' or 'adam' (plain 'sgd' has no momentum).")
        self._refine = find_callback(trainer, MaskRefinementCallback)
        self._freeze = find_callback(trainer, FineTuneFreeze)
        adaptive = find_callback(trainer, AdaptiveLayerSparsity)
        if self._freeze is not None and self._freeze.start_round <= self.end_round:
            raise ValueError(
                f"FineTuneFreeze `start_round` ({self._freeze.start_round}) must be after the ramp's `end_round` "
                f"({self.end_round})."
            )
        fed.pruning.configure(self.targets, self.pattern, self.importance, self.momentum_beta, self.momentum_source)
        fed.pruning.allocation = adaptive.allocation_config(self.target_sparsity) if adaptive is not None else None

    # ------------------------------------------------------------------ phases
    def phase_at(self, round: int) -> int:
        """0 dense, 1 ramp, 2 refine, 3 fine-tune (masks fixed)."""
        if self._freeze is not None and round >= self._freeze.start_round:
            return 3
        if round < self.start_round:
            return 0
        if round <= self.end_round:
            return 1
        if self._refine is not None and self._refine.active_at(round, self):
            return 2
        return 3

    def sparsity_at(self, round: int) -> float:
        return sparsity_at(round, target=self.target_sparsity, start_round=self.start_round, end_round=self.end_round,
                           schedule=self.schedule, power=self.power, num_steps=self.num_steps)

    def recompute(self, pl_module: Any, round: int, sparsity: float):
        change = pl_module.pruning.recompute(pl_module.global_params(), sparsity, round,
                                             server_momentum=self._server_momentum(pl_module))
        self._round_flips += change.flips
        self._round_restored += change.restored
        return change

    def _server_momentum(self, pl_module: Any) -> dict[str, torch.Tensor] | None:
        if self.momentum_source != "server_optimizer":
            return None
        opt = pl_module.server_optimizer
        params = pl_module.global_params()
        out = {}
        for name in self.targets:
            st = opt.state.get(params[name], {})
            buf = st.get("momentum_buffer", st.get("exp_avg"))
            if buf is not None:
                out[name] = buf
        return out

    # ------------------------------------------------------------------ resume with a changed configuration
    def reapply_config(self) -> None:
        """Make this callback's settings take effect when training starts (a resume with
        ``resume_config_change="apply"``): the restored pruning state carries the checkpoint's pattern
        and momentum factor, and its masks were computed under the old settings."""
        self._reapply = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not self._reapply:
            return
        self._reapply = False
        state = pl_module.pruning
        if state.frozen or state.permanent:  # mask-shaping changes were refused; the others have no effect now
            return
        state.configure(self.targets, self.pattern, self.importance, self.momentum_beta, self.momentum_source)
        state.patterns = {n: self.pattern for n in self.targets}
        rnd = int(trainer.global_step)
        # before any round-start hook (so before fine-tuning can freeze or make the pruning permanent)
        if state.masks or self.phase_at(rnd) != 0:
            self.recompute(pl_module, rnd, self.sparsity_at(rnd))

    # ------------------------------------------------------------------ federated hooks
    def on_fed_round_start(self, trainer: pl.Trainer, pl_module: Any, round: int, cohort: list[int]) -> None:
        state = pl_module.pruning
        phase = self.phase_at(round)
        state.phase = phase
        state.frozen = phase == 3 and self._freeze is not None
        if phase == 1:
            due = (round - self.start_round) % self.every_n_rounds == 0 or round == self.end_round
            if due:
                self.recompute(pl_module, round, self.sparsity_at(round))
        elif phase in (2, 3) and not state.frozen and state.target_sparsity != self.target_sparsity:
            # after the ramp (e.g. `every_n_rounds` skipped the last step): settle at the target once
            self.recompute(pl_module, round, self.target_sparsity)

    def on_fed_after_aggregate(self, trainer: pl.Trainer, pl_module: Any, summary: Any) -> None:
        state = pl_module.pruning
        need = state.needs_statistics
        if need == "gradient" or (need == "momentum" and state.momentum_source == "ema"):
            state.observe_pseudo_gradient(summary.pseudo_gradient, self.targets)

    def on_fed_round_end(self, trainer: pl.Trainer, pl_module: Any, summary: Any) -> None:
        log_round(pl_module, self._round_flips, self._round_restored)
        self._round_flips = self._round_restored = 0  # reset here: refinement may run before this callback's round start
