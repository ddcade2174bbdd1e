"""`nnUNetTrainerTuckerFinetune`: labelled fine-tuning of a Tucker-compressed model with the stock nnUNetv2_train.

    nnUNet_green_finetune_from=/path/to/COMPRESSED_FOLDER nnUNetv2_train DATASET 3d_fullres FOLD \
        -tr nnUNetTrainerTuckerFinetune

COMPRESSED_FOLDER is a model folder written by nnunet-green-compress (it has compression.json). The trainer takes
the factorized architecture from that folder's plans.json (same configuration name), checks it against the dataset's
plans (same dense network, same preprocessing, same labels), starts from its fold_<FOLD>/checkpoint_final.pth and
fine-tunes with AdamW at a low learning rate for a short poly-decayed budget. nnU-Net writes the factorized plans
into the output folder, so the result is an ordinary model folder for nnUNetv2_predict / TotalSegmentator (no
environment variable is needed to predict; it is needed again to resume with --c).
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_green.training.green_trainer import RUN_LENGTH_ENV, nnUNetTrainerGreen
from nnunet_green.training.optimizers import OptimizerRecipe

FINETUNE_FROM_ENV = "nnUNet_green_finetune_from"
FINETUNE_LR_ENV = "nnUNet_green_finetune_lr"
FINETUNE_CHECKPOINT = "checkpoint_final.pth"
MANIFEST = "compression.json"
# Must match nnunet_green.compression.network.NETWORK_CLASS_NAME (not imported: keeps this module light)
TUCKER_NETWORK = "nnunet_green.compression.network.TuckerFactorizedNetwork"
DENSE_CLASS_KEY, RANKS_KEY = "dense_network_class", "tucker_ranks"
# Preprocessing fields that must agree: the compressed model was trained on data preprocessed this way
PREPROCESSING_KEYS = ("patch_size", "spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                      "resampling_fn_data_kwargs")


def _adamw(params, lr: float, weight_decay: float):
    return torch.optim.AdamW(params, lr, weight_decay=weight_decay)


# AdamW at 1e-4 (10x the reference study's 1e-5, because the budget here is short): see docs/recovery.md
ADAMW_FINETUNE = OptimizerRecipe("AdamW", _adamw, initial_lr=1e-4)


class nnUNetTrainerTuckerFinetune(nnUNetTrainerGreen):
    optimizer_recipe = ADAMW_FINETUNE
    default_num_epochs = 50  # the reference study's fine-tuning budget; nnUNet_green_epochs overrides

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Signature must stay exactly nnU-Net's (init args are recorded from locals()).
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not os.environ.get(RUN_LENGTH_ENV["num_epochs"]):
            self.num_epochs = self.default_num_epochs
        lr = os.environ.get(FINETUNE_LR_ENV)
        if lr:
            try:
                self.initial_lr = float(lr)
            except ValueError:
                raise RuntimeError(f"{FINETUNE_LR_ENV} must be a number, got {lr!r}") from None
            if not self.initial_lr > 0:
                raise RuntimeError(f"{FINETUNE_LR_ENV} must be > 0, got {lr!r}")
        self.finetune_source = self._source_folder()
        self.finetune_checkpoint = self.finetune_source / f"fold_{self.fold}" / FINETUNE_CHECKPOINT
        if not self.finetune_checkpoint.is_file():
            raise RuntimeError(f"nnUNetTrainerTuckerFinetune: {self.finetune_source} has no "
                               f"fold_{self.fold}/{FINETUNE_CHECKPOINT} (the trainer starts from the same fold it "
                               f"trains)")
        self._use_compressed_architecture(configuration, dataset_json)
        self._finetune_started = None

    # --- set-up ------------------------------------------------------------------------------------------------
    @staticmethod
    def _source_folder() -> Path:
        raw = os.environ.get(FINETUNE_FROM_ENV)
        if not raw:
            raise RuntimeError(f"nnUNetTrainerTuckerFinetune needs the compressed model folder to start from: set "
                               f"{FINETUNE_FROM_ENV}=/path/to/COMPRESSED_FOLDER (written by nnunet-green-compress)")
        folder = Path(raw).expanduser().absolute()
        if not folder.is_dir():
            raise RuntimeError(f"{FINETUNE_FROM_ENV}={raw}: folder not found")
        if not (folder / MANIFEST).is_file():
            raise RuntimeError(f"{FINETUNE_FROM_ENV}={raw} is not a compressed model folder (no {MANIFEST}); compress "
                               f"it first with nnunet-green-compress")
        if not (folder / "plans.json").is_file():
            raise RuntimeError(f"{FINETUNE_FROM_ENV}={raw} has no plans.json")
        return folder

    def _use_compressed_architecture(self, configuration: str, dataset_json: dict):
        """Swap the factorized architecture of the compressed folder into the in-memory plans. nnU-Net builds the
        network from self.configuration_manager and writes self.plans_manager.plans to the output folder's
        plans.json (on_train_start), so both now name the factorized network."""
        src = self.finetune_source
        try:
            src_plans = json.loads((src / "plans.json").read_text())
            src_dataset = json.loads((src / "dataset.json").read_text())
        except (OSError, ValueError) as e:
            raise RuntimeError(f"{FINETUNE_FROM_ENV}: cannot read plans.json/dataset.json of {src}: {e}") from None
        if configuration not in src_plans.get("configurations", {}):
            raise RuntimeError(f"compressed folder {src} has no configuration {configuration!r} "
                               f"(has {sorted(src_plans.get('configurations', {}))})")
        src_cm = PlansManager(src_plans).get_configuration(configuration)
        if src_cm.network_arch_class_name != TUCKER_NETWORK:
            raise RuntimeError(f"compressed folder {src}: configuration {configuration!r} names "
                               f"{src_cm.network_arch_class_name}, not the Tucker-factorized network")
        mine = self.configuration_manager
        problems = []
        src_kwargs = dict(src_cm.network_arch_init_kwargs)
        dense_class = src_kwargs.pop(DENSE_CLASS_KEY, None)
        src_kwargs.pop(RANKS_KEY, None)
        if dense_class != mine.network_arch_class_name:
            problems.append(f"network {dense_class} vs the dataset plans' {mine.network_arch_class_name}")
        elif src_kwargs != dict(mine.network_arch_init_kwargs):
            diff = sorted(k for k in set(src_kwargs) | set(mine.network_arch_init_kwargs)
                          if src_kwargs.get(k) != mine.network_arch_init_kwargs.get(k))
            problems.append(f"network arguments differ: {', '.join(diff)}")
        for key in PREPROCESSING_KEYS:
            a, b = src_cm.configuration.get(key), mine.configuration.get(key)
            if a != b:
                problems.append(f"{key} {a} vs {b}")
        if src_plans.get("transpose_forward") != self.plans_manager.plans.get("transpose_forward"):
            problems.append("transpose_forward differs")
        for key in ("labels", "channel_names"):
            a, b = src_dataset.get(key), dataset_json.get(key)
            if a != b:
                problems.append(f"dataset.json {key} {a} vs {b}")
        if problems:
            raise RuntimeError(f"compressed folder {src} does not match the plans/dataset being trained "
                               f"({self.plans_manager.dataset_name}, {configuration}): " + "; ".join(problems))
        plans = copy.deepcopy(self.plans_manager.plans)
        conf = copy.deepcopy(mine.configuration)  # resolved (inherits_from applied)
        conf.pop("inherits_from", None)
        conf["architecture"] = copy.deepcopy(src_cm.configuration["architecture"])
        plans["configurations"][configuration] = conf
        self.plans_manager = PlansManager(plans)
        self.configuration_manager = self.plans_manager.get_configuration(configuration)

    def initialize(self):
        fresh = not self.was_initialized
        super().initialize()
        if fresh:
            # Start from the compressed weights. A later --c (or -pretrained_weights) load replaces them, because
            # nnU-Net loads checkpoints after initialize().
            self._load_compressed_weights()

    def _load_compressed_weights(self):
        ck = torch.load(self.finetune_checkpoint, map_location="cpu", weights_only=False)
        net = self.network.module if self.is_ddp else self.network
        net = getattr(net, "_orig_mod", net)
        try:
            net.load_state_dict(ck["network_weights"], strict=True)
        except (RuntimeError, KeyError) as e:
            raise RuntimeError(f"the weights in {self.finetune_checkpoint} do not fit the network built from its "
                               f"plans: {str(e).splitlines()[0]}") from None
        self.print_to_log_file(f"nnunet-green: fine-tuning the Tucker-compressed model {self.finetune_source} "
                               f"(fold_{self.fold}); {self.optimizer_recipe.name} lr {self.initial_lr}, "
                               f"{self.num_epochs} epochs")

    # --- record ------------------------------------------------------------------------------------------------
    def on_train_start(self):
        super().on_train_start()
        self._finetune_started = time.perf_counter()

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            self._write_manifest()

    def _write_manifest(self):
        """compression.json of the source, with this run as "recovery": the output is still a compressed model
        (nnunet-green-compress refuses it; nnunet-green-bench reads the ranks)."""
        manifest = json.loads((self.finetune_source / MANIFEST).read_text())
        if manifest.get("recovery"):
            manifest.setdefault("recovery_history", []).append(manifest["recovery"])
        manifest["recovery"] = {
            "method": "finetune", "trainer": self.__class__.__name__, "from": str(self.finetune_source),
            "fold": self.fold, "dataset": self.plans_manager.dataset_name, "epochs": self.num_epochs,
            "iterations_per_epoch": self.num_iterations_per_epoch, "optimizer": self.optimizer_recipe.name,
            "lr": self.initial_lr, "weight_decay": self.weight_decay, "schedule": "poly 0.9",
            "seconds": None if self._finetune_started is None else round(time.perf_counter() -
                                                                        self._finetune_started, 2),
            "device": str(self.device), "metering": f"fold_{self.fold}/green_summary.json",
        }
        out = Path(self.output_folder_base) / MANIFEST
        manifest["folds"] = sorted(p.parent.name[len("fold_"):] for p in out.parent.glob(f"fold_*/{FINETUNE_CHECKPOINT}"))
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, out)
