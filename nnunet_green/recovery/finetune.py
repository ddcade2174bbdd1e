"""`nnUNetTrainerTuckerFinetune`: labelled fine-tuning of a Tucker-compressed model with the stock nnUNetv2_train.

    nnUNet_green_finetune_from=/path/to/COMPRESSED_FOLDER nnUNetv2_train DATASET 3d_fullres FOLD \
        -tr nnUNetTrainerTuckerFinetune

COMPRESSED_FOLDER is a model folder written by nnunet-green-compress (it has compression.json). The trainer takes
the factorized architecture from that folder's plans.json (same configuration name), checks it against the dataset's
plans (same dense network, same preprocessing, same labels), starts from its fold_<FOLD>/checkpoint_final.pth and
fine-tunes with AdamW at a low learning rate (`nnUNet_green_finetune_lr`) for a short poly-decayed budget
(`nnUNet_green_epochs`, default 50). nnU-Net writes the factorized plans into the output folder, so the result is
an ordinary model folder for nnUNetv2_predict / TotalSegmentator (no environment variable is needed to predict; it
is needed again to resume with --c). Settings are read through `contract.GreenSettings`, folders through
`nnunet_io.ModelFolder`.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from nnunet_green.contract import (DEFAULT_CHECKPOINT, DENSE_CLASS_KEY, FINETUNE_TRAINER, MANIFEST_FILE,
                                   NETWORK_CLASS_NAME, PLANS_FILE, RANKS_KEY, RECOVERY_FINETUNED, GreenError,
                                   GreenSettings, env_name)
from nnunet_green.compression.fast_folder import build_fast_path
from nnunet_green.nnunet_io import ModelFolder, ModelFolderError
from nnunet_green.recovery.record import add_recovery
from nnunet_green.training.green_trainer import nnUNetTrainerGreen
from nnunet_green.training.optimizers import OptimizerRecipe

FINETUNE_FROM_ENV = env_name("finetune_from")
FINETUNE_LR_ENV = env_name("finetune_lr")
DEFAULT_EPOCHS = 50  # the reference study's fine-tuning budget; nnUNet_green_epochs overrides
# Preprocessing fields that must agree: the compressed model was trained on data preprocessed this way
PREPROCESSING_KEYS = ("patch_size", "spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                      "resampling_fn_data_kwargs")


class FinetuneError(GreenError, RuntimeError):
    """A fine-tuning set-up that cannot work (missing or mismatching compressed folder); stops nnUNetv2_train at
    init with this message."""


def _adamw(params, lr: float, weight_decay: float):
    return torch.optim.AdamW(params, lr, weight_decay=weight_decay)


# lr: nnUNet_green_finetune_lr (default 1e-4, 10x the reference study's 1e-5 because the budget is short; see
# docs/recovery.md); the recipe keeps none of its own
ADAMW_FINETUNE = OptimizerRecipe("AdamW", _adamw)


class nnUNetTrainerTuckerFinetune(nnUNetTrainerGreen):
    optimizer_recipe = ADAMW_FINETUNE

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Signature must stay exactly nnU-Net's (init args are recorded from locals()).
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = GreenSettings.from_env()
        if settings.epochs is None:
            self.num_epochs = DEFAULT_EPOCHS
        self.initial_lr = settings.finetune_lr
        self.finetune_source = self._source_folder(settings.finetune_from)
        self.finetune_checkpoint = self.finetune_source.checkpoint_path(str(self.fold), DEFAULT_CHECKPOINT)
        if not self.finetune_checkpoint.is_file():
            raise FinetuneError(f"{FINETUNE_TRAINER}: {self.finetune_source.path} has no "
                                f"fold_{self.fold}/{DEFAULT_CHECKPOINT} (the trainer starts from the same fold it "
                                f"trains)")
        self._use_compressed_architecture(configuration, dataset_json)
        self._finetune_started = None

    # --- set-up ------------------------------------------------------------------------------------------------
    @staticmethod
    def _source_folder(raw: str | None) -> ModelFolder:
        if not raw:
            raise FinetuneError(f"{FINETUNE_TRAINER} needs the compressed model folder to start from: set "
                                f"{FINETUNE_FROM_ENV}=/path/to/COMPRESSED_FOLDER (written by nnunet-green-compress)")
        folder = ModelFolder(Path(raw).expanduser())
        if not folder.path.is_dir():
            raise FinetuneError(f"{FINETUNE_FROM_ENV}={raw}: folder not found")
        if not (folder.path / MANIFEST_FILE).is_file():
            raise FinetuneError(f"{FINETUNE_FROM_ENV}={raw} is not a compressed model folder (no {MANIFEST_FILE}); "
                                f"compress it first with nnunet-green-compress")
        if not (folder.path / PLANS_FILE).is_file():
            raise FinetuneError(f"{FINETUNE_FROM_ENV}={raw} has no {PLANS_FILE}")
        return folder

    def _use_compressed_architecture(self, configuration: str, dataset_json: dict):
        """Swap the factorized architecture of the compressed folder into the in-memory plans. nnU-Net builds the
        network from self.configuration_manager and writes self.plans_manager.plans to the output folder's
        plans.json (on_train_start), so both now name the factorized network."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        src = self.finetune_source
        try:
            _, src_cm = src.managers(configuration)
            src_plans, src_dataset = src.plans, src.dataset_json
        except ModelFolderError as e:
            raise FinetuneError(f"{FINETUNE_FROM_ENV}: {e}") from None
        if src_cm.network_arch_class_name != NETWORK_CLASS_NAME:
            raise FinetuneError(f"compressed folder {src.path}: configuration {configuration!r} names "
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
            raise FinetuneError(f"compressed folder {src.path} does not match the plans/dataset being trained "
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
        try:
            ck = self.finetune_source.load_checkpoint(str(self.fold), DEFAULT_CHECKPOINT)
        except ModelFolderError as e:
            raise FinetuneError(str(e)) from None
        net = self.network.module if self.is_ddp else self.network
        net = getattr(net, "_orig_mod", net)
        try:
            net.load_state_dict(ck["network_weights"], strict=True)
        except (RuntimeError, KeyError) as e:
            raise FinetuneError(f"the weights in {self.finetune_checkpoint} do not fit the network built from its "
                                f"plans: {str(e).splitlines()[0]}") from None
        self.print_to_log_file(f"nnunet-green: fine-tuning the Tucker-compressed model {self.finetune_source.path} "
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
        """compression.json of the source, with this run as "recovery" (`"kind": "fine-tuned"`): the output is
        still a compressed model (nnunet-green-compress refuses it; nnunet-green-bench reads the ranks)."""
        manifest = self.finetune_source.manifest()
        out = Path(self.output_folder_base)
        add_recovery(manifest, {
            "kind": RECOVERY_FINETUNED, "method": "finetune", "trainer": self.__class__.__name__,
            "from": str(self.finetune_source.path), "fold": self.fold, "dataset": self.plans_manager.dataset_name,
            "epochs": self.num_epochs, "iterations_per_epoch": self.num_iterations_per_epoch,
            "optimizer": self.optimizer_recipe.name, "lr": self.initial_lr, "weight_decay": self.weight_decay,
            "schedule": "poly 0.9",
            "seconds": None if self._finetune_started is None else round(time.perf_counter() -
                                                                        self._finetune_started, 2),
            "device": str(self.device), "metering": f"fold_{self.fold}/green_summary.json",
        })
        manifest.folds = ModelFolder(out).folds(DEFAULT_CHECKPOINT)
        # the fast CPU path's artefact came with the source's weights: now stale, rebuilt for the new ones
        manifest.fast_path = build_fast_path(out, manifest.folds, DEFAULT_CHECKPOINT, only_if_needed=True)
        manifest.write(out / MANIFEST_FILE)
