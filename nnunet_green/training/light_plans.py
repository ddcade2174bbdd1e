"""`nnUNetPlannerGreenLight`: nnU-Net's default plans with a narrower U-Net (plans identifier `nnUNetPlansGreenLight`).

What changes against `nnUNetPlans` and what does not:

* Widths only. Features per stage start at 16 instead of 32 and are capped at 256 instead of 320 (3d and 2d). In a
  3x3x3 convolution the multiply-adds scale with C_in x C_out, so halving the full-resolution widths quarters the
  cost of the layers where most of a 3D U-Net's compute sits; the lower cap trims the parameters of the deep stages,
  which hold most of the weights but little compute. Measurements behind the choice: docs/light_plans.md.
* Same patch size, batch size, spacing, stages, kernels and strides as nnU-Net's default planner would choose. The
  topology is planned with the reference widths (32 / 320) and the light widths are swapped in afterwards, so the
  memory the narrower network saves is not spent on bigger patches or batches: every training step sees the same
  voxels, at a fraction of the compute. (Planning with the light widths directly would let nnU-Net's memory
  estimate grow the batch, and the step would cost about as much as before.)
* Preprocessed data is shared when it is provably identical. If `nnUNetPlans.json` exists and a configuration's
  preprocessing inputs (spacing, transpose, normalization, resampling, preprocessor, intensity properties) equal
  ours, the configuration reuses its `data_identifier` (e.g. `nnUNetPlans_3d_fullres`), as nnU-Net's own ResEnc
  planners do, and `nnUNetv2_preprocess` has nothing new to compute. Otherwise the data gets its own identifier
  (`nnUNetPlansGreenLight_<configuration>`).

Nothing in nnU-Net 2.8.1 looks the planner class up after planning (`PlansManager.experiment_planner_class` exists
but is never called), so training and prediction with `-p nnUNetPlansGreenLight` need only the plans file. The
dotted path of this class is recorded in the plans under `nnunet_green_planner` for provenance.
"""
from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from typing import Iterable, List, Tuple, Union

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_green.contract import DEFAULT_PLANS, LIGHT_PLANS, GreenError

REFERENCE_PLANS = DEFAULT_PLANS
PLANNER_KEY = "nnunet_green_planner"  # top-level plans key: provenance of the light widths
# per-configuration keys that decide what nnU-Net's DefaultPreprocessor writes
_DATA_KEYS = ("preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
              "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")
_PLANS_DATA_KEYS = ("transpose_forward", "image_reader_writer", "foreground_intensity_properties_per_channel")


def light_features(n_stages: int, base: int, cap: int) -> Tuple[int, ...]:
    """nnU-Net's width rule (base doubling per stage, capped) with the light base and cap."""
    return tuple(min(cap, base * 2 ** i) for i in range(n_stages))


class nnUNetPlannerGreenLight(ExperimentPlanner):
    """Default nnU-Net planning with a narrower U-Net; see the module docstring."""

    light_base_features = 16
    light_max_features_3d = 256
    light_max_features_2d = 256

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = LIGHT_PLANS,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.keep_configurations: tuple[str, ...] | None = None  # None: all that nnU-Net plans
        self.share_data = True  # False: always own data identifiers, never nnUNetPlans' folders
        self.data_reuse: dict[str, str] = {}  # configuration -> reused data identifier (filled by save_plans)

    # --- the one real change: widths ---------------------------------------------------------------------------
    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        # Patch size, batch size and topology exactly as nnU-Net's default (planned with its reference widths,
        # which are still set on self from ExperimentPlanner.__init__), then the light widths.
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        arch = plan["architecture"]["arch_kwargs"]
        cap = self.light_max_features_2d if len(spacing) == 2 else self.light_max_features_3d
        arch["features_per_stage"] = light_features(arch["n_stages"], self.light_base_features, cap)
        return plan

    # --- writing: configuration filter, shared data, provenance ------------------------------------------------
    def save_plans(self, plans: dict):
        if self.keep_configurations is not None:
            planned = sorted(plans["configurations"])
            plans["configurations"] = select_configurations(plans["configurations"], self.keep_configurations)
            if not plans["configurations"]:
                raise GreenError(f"nnU-Net plans none of {', '.join(self.keep_configurations)} for "
                                 f"{self.dataset_name} (it plans {', '.join(planned)}); nothing written")
        self.data_reuse = self._share_identical_data(plans)
        plans[PLANNER_KEY] = {
            "class": f"{type(self).__module__}.{type(self).__name__}",
            "reference_plans": REFERENCE_PLANS,
            "base_features": self.light_base_features,
            "max_features_3d": self.light_max_features_3d,
            "max_features_2d": self.light_max_features_2d,
            "topology": "as nnU-Net's default planner (planned with 32 base / 320 cap features), light widths "
                        "swapped in afterwards",
            "reused_data": dict(self.data_reuse),
        }
        super().save_plans(plans)

    def _share_identical_data(self, plans: dict) -> dict[str, str]:
        reference = self.reference_plans() if self.share_data else None
        if reference is None or any(_jsonable(plans.get(k)) != _jsonable(reference.get(k)) for k in _PLANS_DATA_KEYS):
            return {}
        reused = {}
        for name, conf in plans["configurations"].items():
            ref = reference.get("configurations", {}).get(name)
            if not isinstance(ref, dict) or "data_identifier" not in conf or "data_identifier" not in ref:
                continue
            if all(_jsonable(conf.get(k)) == _jsonable(ref.get(k)) for k in _DATA_KEYS):
                conf["data_identifier"] = ref["data_identifier"]
                reused[name] = ref["data_identifier"]
        return reused

    def reference_plans(self) -> dict | None:
        """nnUNetPlans.json of this dataset, or None if nnU-Net's default planner has not run."""
        from nnunetv2.paths import nnUNet_preprocessed

        path = Path(nnUNet_preprocessed) / self.dataset_name / f"{REFERENCE_PLANS}.json"
        if not path.is_file() or self.plans_identifier == REFERENCE_PLANS:
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None


def select_configurations(configurations: dict, keep: Iterable[str]) -> dict:
    """The planned configurations named in `keep` (3d_cascade_fullres brings 3d_fullres and 3d_lowres along,
    since it inherits from one and follows the other); a 3d_lowres kept without the cascade loses `next_stage`."""
    keep = set(keep)
    if "3d_cascade_fullres" in keep:
        keep |= {"3d_fullres", "3d_lowres"}
    out = {name: deepcopy(conf) for name, conf in configurations.items() if name in keep}
    if "3d_cascade_fullres" not in out and "3d_lowres" in out:
        out["3d_lowres"].pop("next_stage", None)
    return out


def _jsonable(value):
    """Compare plan values the way they end up in plans.json (tuples, numpy scalars and arrays as lists)."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else list(o)))


# --- measuring what the light plans save -------------------------------------------------------------------------
def network_from_plans(plans: dict, configuration: str, dataset_json: dict):
    """The (randomly initialised, deep supervision off) network nnU-Net's trainer and predictor build for
    `configuration` of `plans`."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_green.nnunet_io import build_network, configuration_managers

    pm, cm = configuration_managers(plans, configuration)
    return build_network(nnUNetTrainer, pm, cm, dataset_json, deep_supervision=False), cm


def network_cost(plans: dict, configuration: str, dataset_json: dict) -> dict:
    """Parameters and multiply-adds of one forward pass of one patch (batch 1) of a configuration's network."""
    from nnunet_green.compression.macs import count_macs, executed_params

    net, cm = network_from_plans(plans, configuration, dataset_json)
    n_in = _input_channels(net)
    shape = (1, n_in, *cm.patch_size)
    return {
        "configuration": configuration,
        "plans": plans.get("plans_name"),
        "features_per_stage": list(cm.network_arch_init_kwargs["features_per_stage"]),
        "n_stages": cm.network_arch_init_kwargs["n_stages"],
        "patch_size": list(cm.patch_size),
        "batch_size": cm.batch_size,
        "params": executed_params(net, shape),
        "macs_per_patch": count_macs(net, shape),
    }


def _input_channels(net) -> int:
    import torch

    first = next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    return first.in_channels


def time_train_step(plans: dict, configuration: str, dataset_json: dict, repeats: int = 3,
                    device: str = "cpu") -> dict:
    """Seconds of forward + backward + SGD step on one random batch (plans' batch and patch size, deep
    supervision on as in training, loss = sum of outputs' squares: the network's cost, not the loss's).
    Median of `repeats` after one warm-up."""
    import statistics
    import time

    import torch

    from nnunet_green.nnunet_io import build_network, configuration_managers
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pm, cm = configuration_managers(plans, configuration)
    net = build_network(nnUNetTrainer, pm, cm, dataset_json, deep_supervision=True).to(device)
    x = torch.randn(cm.batch_size, _input_channels(net), *cm.patch_size, device=device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = sum((o.float() ** 2).mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return {"configuration": configuration, "plans": plans.get("plans_name"), "device": device,
            "batch_size": cm.batch_size, "step_s_median": statistics.median(times), "step_s_all": times}
