"""When to stop training early: the EMA pseudo-Dice stopped improving, or an energy or time budget is spent.

nnU-Net trains its full schedule (1000 epochs) whatever happens. A `StoppingPolicy` looks at the end of every epoch
at what nnU-Net itself tracks (its EMA of the online pseudo-Dice, the quantity that picks `checkpoint_best.pth`) and
at what the meter measured, and says whether to stop. Unset = never stop early: nnU-Net's behaviour, unchanged.

A plateau is not looked for in the first `min_epochs` epochs (default: a tenth of the schedule). nnU-Net's EMA
starts at the first epoch's pseudo-Dice and early epochs often dip below it (a measured Hippocampus run: 0.066 at
epoch 0, 0.04 at epoch 5, 0.12 at epoch 10), so without a warm-up patience 5 stopped that run at epoch 5, before
it had learnt anything.

A plateau does not stop training at once: the learning rate is first annealed towards 0 over `cooldown` epochs
(default: `patience`; see schedule.py), because a run cut off at nnU-Net's half-annealed learning rate loses the Dice
the end of the schedule adds (measured on Hippocampus without it: -0.013 validation Dice at a 45 % time saving).
The run then stops with reason "plateau"; `cooldown = 0` stops at the plateau itself.

Budgets are checked ahead: training stops after the epoch once the remaining budget cannot pay for another epoch
of the mean measured cost, so a budget is not overrun by a whole epoch (nnU-Net's final validation comes on top).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from nnunet_green.contract import SettingsError, env_name

J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class StoppingPolicy:
    patience: int | None = None       # epochs without an EMA pseudo-Dice gain > min_delta
    min_delta: float = 0.0
    budget_kwh: float | None = None
    budget_hours: float | None = None
    min_epochs: int = 0               # no plateau stop before this many epochs
    cooldown: int = 0                 # epochs of learning-rate annealing between a plateau and the stop

    @classmethod
    def from_settings(cls, settings, num_epochs: int | None = None) -> "StoppingPolicy":
        """The policy of the nnUNet_green_* settings for a schedule of `num_epochs` (sets the default warm-up)."""
        min_epochs = settings.min_epochs
        if min_epochs is None:
            min_epochs = (num_epochs or 0) // 10
        cooldown = settings.cooldown if settings.cooldown is not None else (settings.patience or 0)
        return cls(patience=settings.patience, min_delta=settings.min_delta, budget_kwh=settings.budget_kwh,
                   budget_hours=settings.budget_hours, min_epochs=min_epochs, cooldown=cooldown)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.patience, self.budget_kwh, self.budget_hours))

    def describe(self) -> str:
        parts = []
        if self.patience is not None:
            parts.append(f"plateau: {self.patience} epochs without an EMA pseudo-Dice gain > {self.min_delta:g}"
                         + (f", not before epoch {self.min_epochs}" if self.min_epochs else "")
                         + (f", then {self.cooldown} cool-down epochs" if self.cooldown else ""))
        if self.budget_kwh is not None:
            parts.append(f"energy budget {self.budget_kwh:g} kWh")
        if self.budget_hours is not None:
            parts.append(f"time budget {self.budget_hours:g} h")
        return "; ".join(parts) or "none (full schedule)"

    def check_start(self, energy_source: str, energy_available: bool) -> None:
        """Refuse an energy budget that cannot be measured before any epoch runs."""
        if self.budget_kwh is not None and not energy_available:
            raise SettingsError(
                f"{env_name('budget_kwh')}={self.budget_kwh:g} needs an energy measurement, but this run has none "
                f"(energy source: {energy_source}; no NVML GPU counter or readable RAPL). Use "
                f"{env_name('budget_hours')} for a time budget, or set {env_name('cpu_watts')} for a labelled "
                f"estimate.")

    def decide(self, epochs: list[dict], ema_pseudo_dice: list[float],
               cooling_since: dict | None = None) -> dict | None:
        """The stop record after the last finished epoch, or None to train on.

        `epochs`: this run's per-epoch meter rows so far ('epoch', 'epoch_s', 'energy_j'); `ema_pseudo_dice`:
        nnU-Net's EMA pseudo-Dice of every epoch, index = epoch (its logger's list); `cooling_since`: the plateau
        record that started a cool-down, if one runs. A plateau record with `cooldown_epochs` > 0 and no
        `cooldown_from` asks the trainer to start the cool-down after this epoch, not to stop."""
        if not epochs:
            return None
        epoch = int(epochs[-1]["epoch"])
        time_s = sum(r["epoch_s"] for r in epochs)
        energies = [r.get("energy_j") for r in epochs]
        energy_j = None if any(e is None for e in energies) else sum(energies)
        record = {"epoch": epoch, "time_s": time_s, "energy_j": energy_j}

        if cooling_since is not None:
            if epoch - cooling_since["epoch"] >= cooling_since["cooldown_epochs"]:
                return {**cooling_since, **record, "plateau_epoch": cooling_since["epoch"],
                        "cooldown_from": cooling_since["epoch"] + 1}
        elif self.patience is not None and epoch >= self.min_epochs:
            best_epoch, best = _best(ema_pseudo_dice, self.min_delta)
            if best_epoch is not None and len(ema_pseudo_dice) - 1 - best_epoch >= self.patience:
                return {"reason": "plateau", **record, "best_epoch": best_epoch,
                        "best_ema_pseudo_dice": best, "patience": self.patience, "min_delta": self.min_delta,
                        "min_epochs": self.min_epochs, "cooldown_epochs": self.cooldown}
        n = len(epochs)
        if self.budget_hours is not None:
            budget_s = self.budget_hours * 3600
            if time_s + time_s / n > budget_s:
                return {"reason": "time_budget", **record, "budget_hours": self.budget_hours}
        if self.budget_kwh is not None and energy_j is not None:
            budget_j = self.budget_kwh * J_PER_KWH
            if energy_j + energy_j / n > budget_j:
                return {"reason": "energy_budget", **record, "budget_kwh": self.budget_kwh}
        return None


def starts_cool_down(decision: dict | None) -> bool:
    """Whether `decide`'s record is a plateau that asks for the cool-down, rather than a stop."""
    return (decision is not None and decision["reason"] == "plateau" and decision.get("cooldown_epochs", 0) > 0
            and "cooldown_from" not in decision)


def _best(values: list[float], min_delta: float) -> tuple[int | None, float | None]:
    """Epoch index and value of the last real improvement: a value counts only if it beats the best so far by more
    than `min_delta` (NaN epochs never improve)."""
    best_i, best = None, None
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if best is None or v > best + min_delta:
            best_i, best = i, float(v)
    return best_i, best


def replay(policy: StoppingPolicy, ema_pseudo_dice: list[float], epoch_s: list[float]) -> dict:
    """Where `policy`'s plateau rule would have stopped a finished full-schedule run, from its logs alone.

    A run with a policy is the full run, epoch for epoch, until its plateau (same seed on CPU; the cool-down after
    it is what differs), so a full run's EMA pseudo-Dice and epoch times say when each policy detects its plateau,
    when it would stop (plateau + cool-down) and the share of the measured epoch time that saves. What the
    cool-down adds to the Dice needs the run itself."""
    rows: list[dict] = []
    total = sum(epoch_s)
    for epoch, seconds in enumerate(epoch_s):
        rows.append({"epoch": epoch, "epoch_s": seconds, "energy_j": None})
        decision = policy.decide(rows, ema_pseudo_dice[:epoch + 1])
        if decision is not None and decision["reason"] == "plateau":
            stop = min(epoch + policy.cooldown, len(epoch_s) - 1) if starts_cool_down(decision) else epoch
            return {"plateau_epoch": epoch, "best_epoch": decision["best_epoch"], "stop_epoch": stop,
                    "time_saving": 1 - sum(epoch_s[:stop + 1]) / total,
                    "ema_at_plateau": ema_pseudo_dice[epoch],
                    "ema_best_after_plateau": max(ema_pseudo_dice[epoch:])}
    return {"plateau_epoch": None, "best_epoch": None, "stop_epoch": len(epoch_s) - 1, "time_saving": 0.0,
            "ema_at_plateau": None, "ema_best_after_plateau": None}


def full_schedule_estimate(epochs: list[dict], epochs_done: int, num_epochs: int) -> dict:
    """What the whole schedule would have cost, extrapolated from this run's mean epoch (labelled as such)."""
    n = len(epochs)
    mean_s = sum(r["epoch_s"] for r in epochs) / n if n else None
    energies = [r.get("energy_j") for r in epochs]
    mean_j = None if not n or any(e is None for e in energies) else sum(energies) / n
    remaining = max(num_epochs - epochs_done, 0)
    return {
        "method": f"extrapolated: mean of the {n} measured epochs x {num_epochs} scheduled epochs",
        "num_epochs": num_epochs,
        "epochs_saved": remaining,
        "time_s": None if mean_s is None else mean_s * num_epochs,
        "energy_j": None if mean_j is None else mean_j * num_epochs,
        "time_saved_s": None if mean_s is None else mean_s * remaining,
        "energy_saved_j": None if mean_j is None else mean_j * remaining,
    }
