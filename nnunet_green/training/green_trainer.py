"""`nnUNetTrainerGreen`: nnU-Net's trainer plus a precision policy, an optimizer recipe and a per-epoch meter.

Subclasses only name `precision` and `optimizer_recipe` (see variants.py). Everything else is nnU-Net's own
training loop; the hooks below add measurement around it, run each step under the policy's autocast and guard
against non-finite steps. Settings come from `contract.GreenSettings` (read once, in `__init__`).
"""
from __future__ import annotations

import json
import math
import time
from os.path import isfile, join

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import GradScaler

from nnunet_green.contract import ENERGY_UNAVAILABLE, GreenSettings, env_name
from nnunet_green.metering import EpochMeter
from nnunet_green.metering.distributed import from_rank0, is_node_leader
from nnunet_green.training.optimizers import NNUNET_SGD, OptimizerRecipe, optimizer_state_bytes
from nnunet_green.training.precision import FP32, Precision
from nnunet_green.training.schedule import CoolDownPolyLR
from nnunet_green.training.stopping import StoppingPolicy, full_schedule_estimate, starts_cool_down

# Short runs for tests and demos (nnU-Net's `_Xepochs` classes still run 250 iterations per epoch):
# trainer attribute -> GreenSettings field.
RUN_LENGTH = {
    "num_epochs": "epochs",
    "num_iterations_per_epoch": "iters",
    "num_val_iterations_per_epoch": "val_iters",
}
# trainer attribute -> environment variable (finetune.py reads it; the names come from contract).
RUN_LENGTH_ENV = {attribute: env_name(setting) for attribute, setting in RUN_LENGTH.items()}
CPU_LOW_PRECISION_ENV = env_name("cpu_low_precision")
# Per-epoch values added to nnU-Net's own logger (saved in every checkpoint's 'logging').
LOGGED_KEYS = ("green_energy_j", "green_co2eq_g", "green_epoch_s", "green_nonfinite_steps", "green_data_wait_s")
STOP_CHECKPOINT_KEY = "green_stopping"  # the stop record, kept in checkpoints so that `--c` does not train on
COOL_DOWN_CHECKPOINT_KEY = "green_cool_down"  # the plateau that started a cool-down, so that `--c` keeps cooling


class StopTraining(Exception):
    """Raised after an epoch's checkpointing when the stopping policy says stop; ends nnU-Net's loop."""


class TimedBatches:
    """Iterator over one of nnU-Net's data loaders that adds the time spent waiting in `next()` to `wait_s`:
    the training loop's input starvation, as opposed to compute."""

    def __init__(self, loader):
        self.loader, self.wait_s = loader, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.loader)
        self.wait_s += time.perf_counter() - t0
        return batch


class nnUNetTrainerGreen(nnUNetTrainer):
    precision: Precision = FP32
    optimizer_recipe: OptimizerRecipe = NNUNET_SGD
    # Without a loss scaler (fp32, bf16, half weights) non-finite steps are skipped; this many in a row means the
    # run has diverged.
    max_consecutive_nonfinite_steps: int = 20

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Signature must stay exactly nnU-Net's: the base class records its init args from locals().
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.settings = GreenSettings.from_env()  # every nnUNet_green_* variable, validated once
        for attribute, setting in RUN_LENGTH.items():
            value = getattr(self.settings, setting)
            if value is not None:
                setattr(self, attribute, value)
        if self.optimizer_recipe.initial_lr is not None:
            self.initial_lr = self.optimizer_recipe.initial_lr
        self.active_precision = self.precision.on(self.device, self.settings.cpu_low_precision)
        self.grad_scaler = GradScaler(self.device.type) if self.active_precision.grad_scaler else None
        self.meter: EpochMeter | None = None
        self.stopping = StoppingPolicy.from_settings(self.settings, self.num_epochs)
        self.stop_record: dict | None = None
        self.cooling_since: dict | None = None  # the plateau record, while the learning rate cools down
        self._nonfinite_in_epoch = 0
        self._nonfinite_in_a_row = 0
        logging = self.logger.local_logger.my_fantastic_logging
        for key in LOGGED_KEYS:
            logging.setdefault(key, [])

    # --- set-up ------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        # nnU-Net calls this after building (and maybe compiling) the network and before DDP wrapping: the place to
        # cast weights (and register the half-weight hooks, see precision.py).
        if self.active_precision != self.precision:
            self.print_to_log_file(
                f"nnunet-green: {self.precision.name} precision is a GPU feature; on {self.device.type} this run "
                f"computes in fp32 (low precision on CPUs without native bf16/fp16 is 25-55x slower; set "
                f"{CPU_LOW_PRECISION_ENV}=1 to keep it anyway). Optimizer: {self.optimizer_recipe.name}.")
        self.active_precision.prepare_(self.network)
        optimizer = self.optimizer_recipe.build(self.network.parameters(), self.initial_lr, self.weight_decay)
        return optimizer, CoolDownPolyLR(optimizer, self.initial_lr, self.num_epochs)

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        ours = {STOP_CHECKPOINT_KEY: self.stop_record, COOL_DOWN_CHECKPOINT_KEY: self.cooling_since}
        if any(v is not None for v in ours.values()) and self.local_rank == 0 and not self.disable_checkpointing:
            # nnU-Net's checkpoint dict has fixed keys; add ours to the file it just wrote.
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
            checkpoint.update(ours)
            torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        # nnU-Net 2.8.1's load_checkpoint only works with a path (a dict leaves its `checkpoint` unbound), so the stop
        # record costs a second read of the file, once per `--c` / `--val`.
        checkpoint = torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
        self.stop_record = checkpoint.get(STOP_CHECKPOINT_KEY)
        self.cooling_since = checkpoint.get(COOL_DOWN_CHECKPOINT_KEY)
        if self.cooling_since is not None:
            self.lr_scheduler.cool_down(self.cooling_since["epoch"] + 1, self.cooling_since["cooldown_epochs"])
        # A checkpoint written by a non-green trainer has none of our logger keys: pad them to the current epoch
        # so nnU-Net's "one value per epoch" logger and progress.png stay aligned.
        logging = self.logger.local_logger.my_fantastic_logging
        for key in LOGGED_KEYS:
            values = logging.setdefault(key, [])
            values.extend([float("nan")] * (self.current_epoch - len(values)))

    def on_train_start(self):
        self.meter = self._new_meter()
        if self.meter.is_node_leader:  # refuse an unmeasurable energy budget before nnU-Net starts its loaders
            source = self.meter.energy.source
            self.stopping.check_start(source, source != ENERGY_UNAVAILABLE)
        super().on_train_start()
        self.meter.resume(self.current_epoch)
        if self.stopping.active:
            self.print_to_log_file(f"nnunet-green: stopping policy: {self.stopping.describe()}")
        self.dataloader_train = TimedBatches(self.dataloader_train)
        if self.stop_record is not None:
            self._refuse_to_train_on()

    def _refuse_to_train_on(self):
        """`--c` on a run that stopped early: stop again unless the current policy lets it go on (said in the log)."""
        previous = self.stop_record
        decision = self._stop_decision()
        if decision is not None:
            self.print_to_log_file(
                f"nnunet-green: this run stopped at epoch {previous['epoch']} ({previous['reason']}); the stopping "
                f"policy still says stop, so it does not train on. To train further, change or unset "
                f"{env_name('patience')} / {env_name('budget_kwh')} / {env_name('budget_hours')}.")
            raise StopTraining
        self.print_to_log_file(
            f"nnunet-green: this run had stopped at epoch {previous['epoch']} ({previous['reason']}); the current "
            f"stopping policy ({self.stopping.describe()}) lets it train on from epoch {self.current_epoch}.")
        self.stop_record = self.cooling_since = None
        self.lr_scheduler.cancel_cool_down()

    def run_training(self):
        try:
            super().run_training()
        except StopTraining:
            self.on_train_end()

    def _stop_decision(self) -> dict | None:
        if not self.stopping.active:
            return None
        decision = self.stopping.decide(self.meter.rows(), self.logger.get_value("ema_fg_dice", step=None),
                                        self.cooling_since) if self.meter.rows() else None
        return from_rank0(decision)  # every DDP rank leaves the loop at the same epoch, with rank 0's record

    def _new_meter(self) -> EpochMeter:
        return EpochMeter(self.output_folder, self.device, is_node_leader=is_node_leader(self.local_rank),
                          settings=self.settings)

    # --- one step ----------------------------------------------------------------------------------------------
    def _batch_to_device(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return data, target

    def train_step(self, batch: dict) -> dict:
        data, target = self._batch_to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self.active_precision.autocast(self.device):
            loss = self.loss(self.network(data), target)

        if self.grad_scaler is not None:
            # The scaler skips non-finite steps itself and lowers the scale.
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            if torch.isfinite(loss) and torch.isfinite(grad_norm):
                self.optimizer.step()
                self._nonfinite_in_a_row = 0
            else:
                self._skip_nonfinite_step()
        return {"loss": loss.detach().float().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's online validation (loss and the pseudo-Dice counts), under this run's autocast: nnU-Net's own
        step hard-codes fp16 autocast on CUDA, which would validate an fp32 or bf16 run in fp16."""
        data, target = self._batch_to_device(batch)
        with torch.no_grad(), self.active_precision.autocast(self.device):
            output = self.network(data)
            loss = self.loss(output, target)
        del data
        if self.enable_deep_supervision:  # counts at the highest resolution only
            output, target = output[0], target[0]
        return {"loss": loss.detach().float().cpu().numpy(), **self._hard_counts(output, target)}

    def _hard_counts(self, output: torch.Tensor, target: torch.Tensor) -> dict:
        """tp/fp/fn per foreground class of the hard prediction, with nnU-Net's label and ignore-label rules."""
        labels = self.label_manager
        if labels.has_regions:
            hard = (torch.sigmoid(output) > 0.5).long()
        else:  # argmax of the logits = argmax of the softmax
            hard = torch.zeros(output.shape, device=output.device, dtype=torch.float16)
            hard.scatter_(1, output.argmax(1, keepdim=True), 1)
        mask = None
        if labels.has_ignore_label:
            if labels.has_regions:  # the last target channel marks ignored voxels
                mask = ~target[:, -1:] if target.dtype == torch.bool else 1 - target[:, -1:]
                target = target[:, :-1]
            else:
                mask = (target != labels.ignore_label).float()
                target = torch.where(target == labels.ignore_label, torch.zeros_like(target), target)
        axes = [0] + list(range(2, output.ndim))
        tp, fp, fn, _ = get_tp_fp_fn_tn(hard, target, axes=axes, mask=mask)
        counts = {"tp_hard": tp, "fp_hard": fp, "fn_hard": fn}
        first = 0 if labels.has_regions else 1  # softmax training: drop the background class
        return {k: v.detach().cpu().numpy()[first:] for k, v in counts.items()}

    def _skip_nonfinite_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite_in_epoch += 1
        self._nonfinite_in_a_row += 1
        if self._nonfinite_in_a_row >= self.max_consecutive_nonfinite_steps:
            # Raise before nnU-Net's next checkpoint: the weights on disk and in memory are still finite.
            raise RuntimeError(
                f"nnunet-green: {self._nonfinite_in_a_row} consecutive training steps had a non-finite loss or "
                f"gradient with {self.active_precision.name} weights; stopping instead of writing a diverged "
                f"checkpoint. Try a lower learning rate or a trainer with a loss scaler (nnUNetTrainerGreenAMP8bit).")

    # --- metering hooks ----------------------------------------------------------------------------------------
    def on_epoch_start(self):
        self._nonfinite_in_epoch = 0
        self.dataloader_train.wait_s = 0.0
        self.meter.start_epoch(self.current_epoch)
        super().on_epoch_start()

    def on_validation_epoch_start(self):
        self.meter.start_validation()
        super().on_validation_epoch_start()

    def on_epoch_end(self):
        value = self.logger.get_value
        row = self.meter.end_epoch(train_loss=value("train_losses", step=-1), val_loss=value("val_losses", step=-1),
                                   pseudo_dice=value("mean_fg_dice", step=-1),
                                   data_wait_s=self.dataloader_train.wait_s)
        epoch = self.current_epoch
        self.logger.log("green_energy_j", _or_nan(row["energy_j"]), epoch)
        self.logger.log("green_co2eq_g", _or_nan(row["co2eq_g"]), epoch)
        self.logger.log("green_epoch_s", row["epoch_s"], epoch)
        self.logger.log("green_nonfinite_steps", self._nonfinite_in_epoch, epoch)
        self.logger.log("green_data_wait_s", row["data_wait_s"], epoch)
        energy = "n/a" if row["energy_j"] is None else f"{row['energy_j']:.1f} J ({row['energy_source']})"
        rss = "n/a" if row["host_rss_peak_mb"] is None else f"{row['host_rss_peak_mb']:.0f} MB"
        wait = row["data_wait_s"]
        share = f" ({wait / row['train_s']:.0%})" if row["train_s"] > 0 else ""
        self.print_to_log_file(f"nnunet-green: energy {energy}, peak host RSS {rss}, waiting for data "
                               f"{wait:.2f} s{share} of {row['train_s']:.2f} s training"
                               + (f", {self._nonfinite_in_epoch} non-finite steps skipped"
                                  if self._nonfinite_in_epoch else ""))
        super().on_epoch_end()  # checkpoints as usual; increments current_epoch
        decision = self._stop_decision() if self.current_epoch < self.num_epochs else None
        if starts_cool_down(decision):
            self.cooling_since = decision
            self.lr_scheduler.cool_down(self.current_epoch, decision["cooldown_epochs"])
            self.print_to_log_file(
                f"nnunet-green: plateau after epoch {decision['epoch']} (best EMA pseudo-Dice "
                f"{decision['best_ema_pseudo_dice']:.4f} at epoch {decision['best_epoch']}); annealing the learning "
                f"rate towards 0 over {decision['cooldown_epochs']} epochs, then stopping")
            return
        if decision is not None:
            self.stop_record = decision
            self.print_to_log_file(f"nnunet-green: stopping after epoch {decision['epoch']} "
                                   f"({decision['reason']}; policy: {self.stopping.describe()})")
            raise StopTraining

    def on_train_end(self):
        if isinstance(self.dataloader_train, TimedBatches):  # nnU-Net shuts its own loader classes down
            self.dataloader_train = self.dataloader_train.loader
        super().on_train_end()
        self._write_summary()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.meter is None:  # `--val` only: no training ran in this process
            self.meter = self._new_meter()
        with self.meter.measure("final_validation"):
            super().perform_actual_validation(save_probabilities)
        self._write_summary()

    def _write_summary(self):
        if self.local_rank != 0:
            return
        logging = self.logger.local_logger.my_fantastic_logging
        validation_summary = join(self.output_folder, "validation", "summary.json")
        validation_dice = None
        if isfile(validation_summary):
            with open(validation_summary) as f:
                validation_dice = json.load(f)["foreground_mean"]["Dice"]
        self.meter.write_summary({
            "trainer": self.__class__.__name__,
            "precision": self.active_precision.name,
            "requested_precision": self.precision.name,
            "optimizer": self.optimizer_recipe.name,
            "initial_lr": self.initial_lr,
            "optimizer_state_bytes": optimizer_state_bytes(self.optimizer) if self.optimizer is not None else None,
            "num_parameters": sum(p.numel() for p in self.network.parameters()),
            "num_epochs": self.num_epochs,
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
            "nonfinite_steps_skipped": int(np.nansum(logging["green_nonfinite_steps"])),
            "stopping": self._stopping_summary(),
            "dice": {
                "pseudo_dice_last": _last(logging["mean_fg_dice"]),
                "ema_pseudo_dice_best": None if self._best_ema is None else float(self._best_ema),
                "validation_mean_fg_dice": validation_dice,
            },
        })


    def _stopping_summary(self) -> dict:
        """Why and when training ended, and what the full schedule would have cost (extrapolated, labelled)."""
        rows = self.meter.rows()
        if self.stop_record is None:
            last = rows[-1]["epoch"] if rows else None
            reason = "schedule_complete" if self.current_epoch >= self.num_epochs else "interrupted"
            return {"reason": reason, "epoch": last, "policy": self.stopping.describe()}
        return {**self.stop_record, "policy": self.stopping.describe(),
                "full_schedule": full_schedule_estimate(rows, self.current_epoch, self.num_epochs)}


def _or_nan(value):
    return float("nan") if value is None else value


def _last(values):
    value = values[-1] if values else None
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
