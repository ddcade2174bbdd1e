"""nnU-Net model folders: one route to read them, build their network and publish new ones.

`ModelFolder` knows a folder's plans (old TotalSegmentator format too, converted by nnU-Net itself), dataset.json,
folds, checkpoints and compression manifest, and builds the network exactly along the stock predictor's path
(`nnUNetPredictor.initialize_from_trained_model_folder`: trainer class by the checkpoint's name, its static
`build_network_architecture`, strict load). Compression, distillation, benchmarking, fine-tuning and the
TotalSegmentator helpers all go through it, so there is one builder to keep right.

`publish(dst)` writes a folder atomically: into a hidden temporary folder beside `dst`, renamed on success,
removed on failure; temporary folders left by a killed earlier run are removed first.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io
import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from nnunet_green.contract import (DATASET_FILE, DEFAULT_CHECKPOINT, MANIFEST_FILE, NETWORK_CLASS_NAME, PLANS_FILE,
                                   CompressionManifest, GreenError, SchemaError)


class ModelFolderError(GreenError):
    """A model folder that cannot be read, built or loaded; the message names the folder and what is wrong."""


def is_model_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / PLANS_FILE).is_file()


def find_model_folders(root: str | os.PathLike, max_depth: int = 4) -> list[Path]:
    """Model folders (`<trainer>__<plans>__<configuration>` with plans.json) below a weights root, sorted."""
    root = Path(root)
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        if here != root and here.name.count("__") >= 2 and (here / PLANS_FILE).is_file():
            found.append(here)
            dirnames[:] = []  # fold_X below a model folder are not model folders
            continue
        if depth >= max_depth:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def parse_folder_name(folder: Path) -> tuple[str, str, str] | None:
    """(trainer, plans identifier, configuration) from `<trainer>__<plans>__<configuration>`."""
    parts = Path(folder).name.split("__")
    return tuple(parts) if len(parts) == 3 and all(parts) else None


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fold_arg(fold: str):
    """nnU-Net's form of a fold: int, or the string 'all'."""
    return fold if fold == "all" else int(fold)


def find_trainer(trainer_name: str):
    """nnU-Net's own trainer lookup (nnunetv2 package, then `nnUNet_extTrainer`), without its search printout."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(trainer_name)
    except (RuntimeError, AssertionError, ImportError) as e:
        raise ModelFolderError(f"trainer {trainer_name!r} (from the checkpoint) cannot be found by nnU-Net: "
                               f"{e}") from None


def configuration_managers(plans: dict, name: str):
    """(PlansManager, ConfigurationManager) of nnU-Net for `name`: resolves `inherits_from` and converts
    old-format plans."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if name not in plans.get("configurations", {}):
        raise ModelFolderError(f"configuration {name!r} is not in {PLANS_FILE} "
                               f"(has {sorted(plans.get('configurations', {}))})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnU-Net's old-format notice
        try:
            manager = PlansManager(copy.deepcopy(plans))
            return manager, manager.get_configuration(name)
        except (KeyError, RuntimeError, ValueError) as e:
            raise ModelFolderError(f"cannot interpret configuration {name!r} of {PLANS_FILE}: "
                                   f"{type(e).__name__}: {e}") from None


def io_channels(plans_manager, configuration_manager, dataset_json: dict) -> tuple[int, int]:
    """(input channels, segmentation heads) as nnU-Net determines them."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    return (determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads)


def predicts_regions(dataset_json: dict) -> bool:
    """nnU-Net's own test (LabelManager): a label given as several values is a region, so the network has a sigmoid
    per channel instead of one softmax over the classes."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    try:
        return LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order")).has_regions
    except (AssertionError, KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"cannot interpret the labels of {DATASET_FILE}: {type(e).__name__}: {e}") from None


def build_network(trainer_class, plans_manager, configuration_manager, dataset_json: dict,
                  deep_supervision: bool = False):
    """Exactly what the stock predictor does to build a network: the trainer's static builder, from plans."""
    n_in, n_out = io_channels(plans_manager, configuration_manager, dataset_json)
    builder = trainer_class.build_network_architecture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "plans_manager" in inspect.signature(builder).parameters:
            return builder(plans_manager, configuration_manager, n_in, n_out,
                           enable_deep_supervision=deep_supervision)
        return builder(configuration_manager.network_arch_class_name,
                       configuration_manager.network_arch_init_kwargs,
                       configuration_manager.network_arch_init_kwargs_req_import, n_in, n_out,
                       enable_deep_supervision=deep_supervision)


def load_checkpoint(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise ModelFolderError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated/garbage files
        detail = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise ModelFolderError(f"cannot read checkpoint {path}: {type(e).__name__}: {detail}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict) or "trainer_name" not in ckpt:
        raise ModelFolderError(f"{path} is not an nnU-Net checkpoint (no network_weights/trainer_name)")
    return ckpt


@dataclass
class LoadedModel:
    """One fold's network, strict-loaded, with the managers the predictor holds."""
    folder: Path
    fold: str
    network: object  # torch.nn.Module
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    trainer_name: str
    mirror_axes: tuple | None
    num_input_channels: int
    num_outputs: int


class ModelFolder:
    """A trained nnU-Net model folder (`<trainer>__<plans>__<configuration>/` with plans.json, dataset.json,
    fold_X/checkpoint_*.pth), dense or compressed. Reads lazily; never writes to the folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()
        self._plans = self._dataset = None

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    # --- files -------------------------------------------------------------------------------------------------
    def check(self) -> "ModelFolder":
        if not self.path.is_dir():
            raise ModelFolderError(f"model folder not found: {self.path}")
        if not is_model_folder(self.path):
            raise ModelFolderError(f"{self.path} is not an nnU-Net model folder: no {PLANS_FILE}")
        return self

    def _json(self, name: str, what: str) -> dict:
        path = self.path / name
        if not path.is_file():
            raise ModelFolderError(f"{self.path} has no {name} ({what})")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModelFolderError(f"cannot read {path}: {e}") from None

    @property
    def plans(self) -> dict:
        if self._plans is None:
            self._plans = self._json(PLANS_FILE, "nnU-Net plans")
        return self._plans

    @property
    def dataset_json(self) -> dict:
        if self._dataset is None:
            self._dataset = self._json(DATASET_FILE, "dataset description")
        return self._dataset

    @property
    def file_ending(self) -> str:
        return self.dataset_json.get("file_ending", ".nii.gz")

    @property
    def is_compressed(self) -> bool:
        """True if a compression manifest is present or plans.json names the factorized network."""
        if (self.path / MANIFEST_FILE).exists():
            return True
        return any(isinstance(c, dict) and isinstance(c.get("architecture"), dict)
                   and c["architecture"].get("network_class_name") == NETWORK_CLASS_NAME
                   for c in self.plans.get("configurations", {}).values())

    def manifest(self) -> CompressionManifest | None:
        """compression.json, or None for a dense folder; an unreadable one is an error."""
        if not (self.path / MANIFEST_FILE).is_file():
            return None
        try:
            return CompressionManifest.read(self.path / MANIFEST_FILE)
        except SchemaError as e:
            raise ModelFolderError(str(e)) from None

    def folds(self, checkpoint: str = DEFAULT_CHECKPOINT) -> list[str]:
        """Folds that have `checkpoint`, numeric first ('0', '1', ..., 'all')."""
        folds = [p.name[len("fold_"):] for p in self.path.glob("fold_*") if (p / checkpoint).is_file()]
        return sorted(folds, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))

    def checkpoint_path(self, fold: str, checkpoint: str = DEFAULT_CHECKPOINT) -> Path:
        return self.path / f"fold_{fold}" / checkpoint

    def save_checkpoint(self, fold: str, checkpoint_dict: dict, checkpoint: str = DEFAULT_CHECKPOINT) -> None:
        """Replace a fold's checkpoint atomically (written beside it, then renamed): a killed run leaves the old
        file, never half of a new one."""
        import torch

        path = self.checkpoint_path(fold, checkpoint)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            torch.save(checkpoint_dict, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, fold: str, checkpoint: str = DEFAULT_CHECKPOINT) -> dict:
        return load_checkpoint(self.checkpoint_path(fold, checkpoint))

    def default_fold(self, fold: str | None = None, checkpoint: str = DEFAULT_CHECKPOINT) -> str:
        """`fold` if it has the checkpoint, else the first fold that has one."""
        present = self.folds(checkpoint)
        if fold is not None:
            if str(fold) not in present:
                raise ModelFolderError(f"{self.path} has no fold_{fold}/{checkpoint} (has: "
                                       f"{', '.join(present) or 'none'})")
            return str(fold)
        if not present:
            raise ModelFolderError(f"{self.path} has no fold_*/{checkpoint}")
        return present[0]

    # --- nnU-Net objects ---------------------------------------------------------------------------------------
    def configuration_name(self, checkpoint: dict | None = None) -> str | None:
        """The configuration this folder was trained with: the checkpoint's init_args, else the folder name."""
        conf = ((checkpoint or {}).get("init_args") or {}).get("configuration")
        named = parse_folder_name(self.path)
        return conf or (named[2] if named else None)

    def managers(self, configuration: str):
        return configuration_managers(self.plans, configuration)

    def build_network(self, configuration: str, trainer_name: str, deep_supervision: bool = False):
        """The (unloaded) network the stock predictor builds for this folder and trainer."""
        pm, cm = self.managers(configuration)
        try:
            return build_network(find_trainer(trainer_name), pm, cm, self.dataset_json, deep_supervision)
        except ModelFolderError:
            raise
        except Exception as e:
            raise ModelFolderError(f"cannot build the network of {self.path}: {type(e).__name__}: {e}") from None

    def load(self, fold: str | None = None, checkpoint: str = DEFAULT_CHECKPOINT, device=None,
             what: str = "model") -> LoadedModel:
        """One fold through nnU-Net's own predictor initialisation (same builder, strict load)."""
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.check()
        fold = self.default_fold(fold, checkpoint)
        device = torch.device("cpu") if device is None else torch.device(device)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                predictor = nnUNetPredictor(device=device, verbose=False, verbose_preprocessing=False,
                                            allow_tqdm=False)
                predictor.initialize_from_trained_model_folder(str(self.path), (fold_arg(fold),), checkpoint)
        except Exception as e:  # nnU-Net raises bare RuntimeError/KeyError/FileNotFoundError for broken folders
            raise ModelFolderError(f"cannot load the {what} {self.path} the way nnUNetv2_predict does: "
                                   f"{type(e).__name__}: {e}") from None
        net = predictor.network
        net = getattr(net, "_orig_mod", net)  # nnUNet_compile wraps it; callers want the module itself
        pm, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
        n_in, n_out = io_channels(pm, cm, dj)
        return LoadedModel(folder=self.path, fold=fold, network=net.to(device), plans_manager=pm,
                           configuration_manager=cm, dataset_json=dj, trainer_name=predictor.trainer_name,
                           mirror_axes=predictor.allowed_mirroring_axes, num_input_channels=n_in, num_outputs=n_out)


# --- atomic publishing ---------------------------------------------------------------------------------------------
STALE_AFTER_S = 6 * 3600  # a temporary folder this old belongs to a killed run, not a running one


def _temp_name(dst: Path, kind: str) -> Path:
    return dst.parent / f".{dst.name}.{kind}-{uuid.uuid4().hex[:8]}"


def remove_stale_temporaries(dst: Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove `.DST.tmp-*` / `.DST.old-*` beside `dst` left by a killed run (a live run's are younger)."""
    removed = []
    if not dst.parent.is_dir():
        return removed
    now = time.time()
    for p in dst.parent.glob(f".{dst.name}.*-*"):
        kind = p.name[len(dst.name) + 2:].split("-", 1)[0]
        if kind not in ("tmp", "old"):
            continue
        try:
            if now - p.lstat().st_mtime < older_than_s and not _owner_dead(p):
                continue
        except OSError:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


_OWNER_FILE = ".nnunet_green_owner"


def _owner_dead(tmp: Path) -> bool:
    """True if the process that created `tmp` (pid recorded inside) no longer runs on this machine."""
    try:
        host, pid = (tmp / _OWNER_FILE).read_text().split()
        if host != os.uname().nodename:
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


class publish:
    """`with publish(dst, overwrite) as tmp:` write into `tmp`; on success `tmp` replaces `dst` in one rename,
    on failure it is removed (with any parent folders this created)."""

    def __init__(self, dst: str | os.PathLike, overwrite: bool = False):
        self.dst, self.overwrite = Path(dst).absolute(), overwrite
        self.created_parents: list[Path] = []

    def __enter__(self) -> Path:
        p = self.dst.parent
        while not p.exists():
            self.created_parents.append(p)
            p = p.parent
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.dst)
        self.tmp = _temp_name(self.dst, "tmp")
        self.tmp.mkdir()
        (self.tmp / _OWNER_FILE).write_text(f"{os.uname().nodename} {os.getpid()}")
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            for p in self.created_parents:  # innermost first
                try:
                    p.rmdir()
                except OSError:
                    break
            return False
        (self.tmp / _OWNER_FILE).unlink(missing_ok=True)
        old = None
        if self.dst.exists() or self.dst.is_symlink():
            if not self.overwrite:  # appeared meanwhile
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise ModelFolderError(f"output {self.dst} already exists (use --overwrite to replace it)")
            old = _temp_name(self.dst, "old")
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        return False
