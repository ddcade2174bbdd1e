"""The one place for every fact that more than one module reads or writes (torch-free, import-light).

File names, schema versions, the factorized network's dotted class name and its `arch_kwargs` keys, defaults,
every `nnUNet_green_*` environment variable (one table: name, type, default, doc), the error hierarchy and the CLI
exit codes, and the records written to disk (`compression.json`, `green_summary.json`, `bench.json`) as
dataclasses with `to_json` / `from_json`. Writers and readers import from here; a copy elsewhere is a bug.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

# --- files -------------------------------------------------------------------------------------------------------
PLANS_FILE = "plans.json"
DATASET_FILE = "dataset.json"
FINGERPRINT_FILE = "dataset_fingerprint.json"
MANIFEST_FILE = "compression.json"      # in a compressed model folder
GREEN_LOG_FILE = "green_log.csv"        # in a fold folder: one row per epoch
GREEN_SUMMARY_FILE = "green_summary.json"
BENCH_FILE = "bench.json"
PROGRESS_FILE = "progress.png"          # nnU-Net's exporter requires one per fold
DEFAULT_CHECKPOINT = "checkpoint_final.pth"

# --- schema versions ---------------------------------------------------------------------------------------------
MANIFEST_FORMAT = "nnunet-green-compression/1"
SUMMARY_FORMAT = "nnunet-green-summary/1"
BENCH_FORMAT = "nnunet-green-bench/1"

# --- the factorized network in plans.json ------------------------------------------------------------------------
NETWORK_CLASS_NAME = "nnunet_green.compression.network.TuckerFactorizedNetwork"
DENSE_CLASS_KEY = "dense_network_class"  # arch_kwargs key: the dense class the factory builds first
RANKS_KEY = "tucker_ranks"               # arch_kwargs key: {canonical conv name: [r_in, r_out]}
# state-dict key (top-level uint8 buffer) of the factorized network's fast CPU path: a serialized ONNX model
FAST_PATH_ARTEFACT_KEY = "fast_path_onnx"

# --- per-epoch log columns (green_log.csv) -----------------------------------------------------------------------
LOG_COLUMNS = ("epoch", "epoch_s", "train_s", "val_s", "gpu_energy_j", "cpu_energy_j", "energy_j", "energy_source",
               "co2eq_g", "gpu_mem_alloc_peak_mb", "gpu_mem_reserved_peak_mb", "host_rss_peak_mb", "train_loss",
               "val_loss", "pseudo_dice", "meter_overhead_s", "data_wait_s")
# columns added after the first release: an older log lacks them legitimately (shown as missing, no warning)
LATER_LOG_COLUMNS = ("data_wait_s",)
ENERGY_UNAVAILABLE = "unavailable"  # energy_source when no counter and no estimate

# --- trainers ----------------------------------------------------------------------------------------------------
BASELINE_TRAINER = "nnUNetTrainerGreenFP32"
FINETUNE_TRAINER = "nnUNetTrainerTuckerFinetune"

# --- defaults ----------------------------------------------------------------------------------------------------
DEFAULT_RANK_RATIO = 0.12
DEFAULT_MIN_RANK = 8   # Tucker rank floor per mode
DEFAULT_ROUND_TO = 8   # ranks rounded to multiples of this (GPU-friendly)
DEFAULT_CALIBRATION_PATCHES = 16  # calibration patches when images are given without a count
DEFAULT_CALIBRATION_RIDGE = 1e-5  # added to calibration input covariances, times their mean eigenvalue
# sequential calibration's regression on the compressed network's inputs shrinks towards the dense weight this much
# (times the mean eigenvalue): 1e-5 .. 1e-3 gave the same held-out error on Hippocampus, 1e-2 and more a higher one
SEQUENTIAL_CALIBRATION_RIDGE = 1e-3
DECOMPOSITION_WEIGHT_ONLY = "weight-only"  # compression.json "decomposition" (top level and per layer)
DECOMPOSITION_CALIBRATED = "calibrated"
# which layers pay off in speed (TuckerConfig.speed_rule, compression.json config "speed_rule"): "macs" decides by the
# multiply-add saving alone; "measured" also times dense vs factorized per layer on this machine and keeps a layer
# dense unless its factorization is faster by at least DEFAULT_SPEED_MARGIN (compression/layer_timing.py)
SPEED_RULE_MACS = "macs"
SPEED_RULE_MEASURED = "measured"
SPEED_RULES = (SPEED_RULE_MACS, SPEED_RULE_MEASURED)
DEFAULT_SPEED_RULE = SPEED_RULE_MACS
DEFAULT_SPEED_MARGIN = 0.05         # factorized must take < (1 - margin) x the dense time
DEFAULT_LAYER_TIMING_SECONDS = 30.0  # time bound of the per-layer timing; untimed layers keep the multiply-add rule


# --- errors and exit codes ---------------------------------------------------------------------------------------
class GreenError(Exception):
    """A problem the user must fix (bad input, failed check). Its message is printed as is; CLIs exit with
    EXIT_BAD_INPUT."""


class SettingsError(GreenError, ValueError):
    """An `nnUNet_green_*` variable with a value that cannot be used."""


class SchemaError(GreenError):
    """A record file (compression.json, green_summary.json, bench.json) that this version cannot read."""


EXIT_OK = 0
EXIT_FAILED = 1      # an unexpected error (a bug or the machine): traceback shown
EXIT_BAD_INPUT = 2   # bad arguments or input: one message, nothing written (argparse uses 2 as well)
EXIT_CODES_HELP = (f"exit status: {EXIT_OK} success, {EXIT_BAD_INPUT} bad arguments or input (one message, nothing "
                   f"written), {EXIT_FAILED} unexpected failure")


# --- settings from the environment -------------------------------------------------------------------------------
def _positive_int(name: str, raw: str) -> int:
    if not raw.strip().isdigit() or int(raw) < 1:
        raise SettingsError(f"{name} must be a positive integer, got {raw!r}")
    return int(raw)


def _non_negative_int(name: str, raw: str) -> int:
    if not raw.strip().isdigit():
        raise SettingsError(f"{name} must be a non-negative integer, got {raw!r}")
    return int(raw)


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(f"{name} must be a positive number, got {raw!r}")
    return value


def _flag(name: str, raw: str) -> bool:
    if raw not in ("0", "1"):
        raise SettingsError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _non_negative_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise SettingsError(f"{name} must be a number >= 0, got {raw!r}")
    return value


def _text(name: str, raw: str) -> str:
    return raw.strip()


@dataclass(frozen=True)
class EnvVar:
    name: str
    parse: Callable[[str, str], Any]
    default: Any
    doc: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("nnUNet_green_epochs", _positive_int, None, "epochs of a green trainer run (nnU-Net: 1000)"),
    EnvVar("nnUNet_green_iters", _positive_int, None, "training iterations per epoch (nnU-Net: 250)"),
    EnvVar("nnUNet_green_val_iters", _positive_int, None, "validation iterations per epoch (nnU-Net: 50)"),
    EnvVar("nnUNet_green_cpu_low_precision", _flag, False,
           "1 keeps fp16/bf16 weights and autocast on a CPU (25-55x slower there; for exercising GPU code paths)"),
    EnvVar("nnUNet_green_cpu_watts", _positive_float, None,
           "CPU package power in W for a labelled energy estimate where no counter is readable"),
    EnvVar("nnUNet_green_country", _text, "WORLD", "ISO 3166 code of the bundled carbon-intensity table"),
    EnvVar("nnUNet_green_carbon_intensity", _positive_float, None, "gCO2eq/kWh; wins over the country table"),
    EnvVar("nnUNet_green_pue", _positive_float, 1.0, "data-centre power usage effectiveness applied to CO2eq"),
    EnvVar("nnUNet_green_finetune_from", _text, None,
           f"compressed model folder that {FINETUNE_TRAINER} starts from (required by that trainer)"),
    EnvVar("nnUNet_green_finetune_lr", _positive_float, 1e-4, f"AdamW learning rate of {FINETUNE_TRAINER}"),
    EnvVar("nnUNet_green_patience", _positive_int, None,
           "stop after this many epochs without an EMA pseudo-Dice gain > nnUNet_green_min_delta"),
    EnvVar("nnUNet_green_min_delta", _non_negative_float, 0.0, "smallest EMA pseudo-Dice gain that counts"),
    EnvVar("nnUNet_green_min_epochs", _non_negative_int, None,
           "epochs before a plateau may stop training (unset: a tenth of the schedule; budgets always apply)"),
    EnvVar("nnUNet_green_cooldown", _non_negative_int, None,
           "epochs that anneal the learning rate towards 0 after a plateau, before the stop (unset: the patience)"),
    EnvVar("nnUNet_green_budget_kwh", _positive_float, None,
           "stop before the measured energy would exceed this (refused at start without an energy measurement)"),
    EnvVar("nnUNet_green_budget_hours", _positive_float, None, "stop before the training time would exceed this"),
    EnvVar("nnUNet_green_fast_path", _flag, True,
           "0 runs compressed networks eagerly in PyTorch even where their fast CPU path (ONNX Runtime) applies"),
)
ENV = {v.name: v for v in ENV_VARS}


@dataclass(frozen=True)
class GreenSettings:
    """Every `nnUNet_green_*` variable, parsed and validated once. Unset or empty = the default in ENV_VARS."""
    epochs: int | None = None
    iters: int | None = None
    val_iters: int | None = None
    cpu_low_precision: bool = False
    cpu_watts: float | None = None
    country: str = "WORLD"
    carbon_intensity: float | None = None
    pue: float = 1.0
    finetune_from: str | None = None
    finetune_lr: float = 1e-4
    patience: int | None = None
    min_delta: float = 0.0
    min_epochs: int | None = None
    cooldown: int | None = None
    budget_kwh: float | None = None
    budget_hours: float | None = None
    fast_path: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "GreenSettings":
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            var = ENV[env_name(f.name)]
            raw = env.get(var.name)
            values[f.name] = var.default if raw is None or raw.strip() == "" else var.parse(var.name, raw)
        return cls(**values)


def env_name(setting: str) -> str:
    """The environment variable of a GreenSettings field."""
    return f"nnUNet_green_{setting}"


def settings_table() -> str:
    """Markdown table of every variable (docs/training.md and --help texts)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {'unset' if v.default is None else v.default} | {v.doc} |" for v in ENV_VARS]
    return "\n".join(rows)


# --- records on disk ---------------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: not found ({what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SchemaError(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: {what} is not a JSON object")
    return data


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write via a temporary file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


class _Record:
    """Top-level keys as dataclass fields; unknown keys from newer writers kept in `extra` and written back."""
    FORMAT: str = ""
    WHAT: str = ""

    def to_json(self) -> dict:
        data = {"format": self.FORMAT}
        for f in fields(self):
            if f.name != "extra":
                data[f.name] = getattr(self, f.name)
        data.update(self.extra)
        return data

    @classmethod
    def from_json(cls, data: dict, where: str = ""):
        where = where or cls.WHAT
        fmt = data.get("format")
        if fmt != cls.FORMAT:
            raise SchemaError(f"{where}: format {fmt!r}, this version of nnunet-green reads {cls.FORMAT!r}")
        names = {f.name for f in fields(cls)} - {"extra"}
        required = {f.name for f in fields(cls) if f.name != "extra" and _is_required(f)}
        missing = sorted(required - data.keys())
        if missing:
            raise SchemaError(f"{where}: {cls.WHAT} lacks {', '.join(missing)} (written by another version?)")
        known = {k: data[k] for k in names if k in data}
        for f in fields(cls):  # a dict/list key holding another type would fail later, far from the file
            want = _JSON_TYPES.get(str(f.type))
            if want and known.get(f.name, 0) is None and "None" not in str(f.type) and not _is_required(f):
                del known[f.name]  # null for an optional object/list: its default
            if want and f.name in known and not (known[f.name] is None and "None" in str(f.type)) \
                    and not isinstance(known[f.name], want[0]):
                raise SchemaError(f"{where}: {cls.WHAT} key {f.name!r} is {type(known[f.name]).__name__}, "
                                  f"expected {want[1]} (written by another version?)")
        extra = {k: v for k, v in data.items() if k not in names and k != "format"}
        return cls(**known, extra=extra)

    @classmethod
    def read(cls, path: str | os.PathLike):
        return cls.from_json(read_json(path, cls.WHAT), str(path))

    def write(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_json())

    def as_dict(self) -> dict:
        return asdict(self)


_JSON_TYPES = {"dict": (dict, "an object"), "dict | None": (dict, "an object or null"),
               "list": (list, "a list"), "list | None": (list, "a list or null")}


def _is_required(f) -> bool:
    from dataclasses import MISSING
    return f.default is MISSING and f.default_factory is MISSING


@dataclass
class CompressionManifest(_Record):
    """compression.json of a compressed model folder."""
    FORMAT = MANIFEST_FORMAT
    WHAT = MANIFEST_FILE

    source: dict                      # {"path", "checkpoints": {fold_X/ckpt: sha256}}
    # {"rank_ratio", "budget", "budget_cost", "min_rank", "round_to", "half", "speed_rule" (absent before it existed)}
    config: dict
    configuration: str
    folds: list
    totals: dict                      # params/macs before/after, decomposition_s
    layers: list
    rank_rule: str = ""
    nnunet_green_version: str = ""
    created: str = ""
    patch_size: list = field(default_factory=list)
    checkpoint: str = DEFAULT_CHECKPOINT
    recovery: dict | None = None      # distillation or fine-tune record
    trainer_name: str = ""
    dense_network_class: str = ""
    verification: dict | None = None
    carried_over: dict = field(default_factory=dict)  # {relative path: what it describes}: files of the DENSE source
    fast_path: dict | None = None     # fast CPU path: status per fold, verification, predicted/measured speed-up
    # how the factors were found: DECOMPOSITION_WEIGHT_ONLY (no images) or DECOMPOSITION_CALIBRATED ("" before)
    decomposition: str = ""
    # the calibration set and its cost: {"images", "source", "patches", "patch_size", "statistics_s", "ridge", ...};
    # None for a weight-only decomposition
    calibration: dict | None = None
    # the per-layer speed rule's summary (speed_rule "measured"; layer_timing.timing_summary); None otherwise
    layer_timing: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rule_label(self) -> str:
        """Short name of how the ranks were chosen, with recovery: 'ratio 0.12', 'budget 0.12 params + distilled'."""
        c = self.config
        if c.get("budget") is not None:
            label = f"budget {c['budget']:g} {c.get('budget_cost') or 'params'}"
        elif c.get("rank_ratio") is not None:
            label = f"ratio {c['rank_ratio']:g}"
        else:
            label = self.rank_rule or "rule not recorded"
        if (self.calibration or self.extra.get("calibration") or {}).get("images"):
            label += " calibrated"
        kind = self.recovery_kind
        return f"{label} + {kind}" if kind else label

    @property
    def recovery_kind(self) -> str | None:
        """'distilled', 'fine-tuned' (recovery records of older versions name only their `method`), or None."""
        r = self.recovery
        if not isinstance(r, dict) or not r:
            return None
        if r.get("kind"):
            return str(r["kind"])
        return {"distillation": "distilled", "finetune": "fine-tuned"}.get(r.get("method"), "recovered")

    @property
    def kept_fraction(self) -> float | None:
        """Parameters kept / dense: the x axis a budgeted model shares with uniform ratios."""
        t = self.totals
        if t.get("params_before") and t.get("params_after") is not None:
            return t["params_after"] / t["params_before"]
        return None


@dataclass
class TrainingSummary(_Record):
    """green_summary.json of a fold folder."""
    FORMAT = SUMMARY_FORMAT
    WHAT = GREEN_SUMMARY_FILE

    totals: dict
    trainer: str | None = None
    nnunet_green_version: str = ""
    output_folder: str = ""
    device: str = ""
    gpu_name: str | None = None
    epochs_logged: int = 0
    energy: dict = field(default_factory=dict)
    carbon: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class BenchResult(_Record):
    """bench.json written by nnunet-green-bench."""
    FORMAT = BENCH_FORMAT
    WHAT = BENCH_FILE

    models: list
    reference: str | None = None
    created: str = ""
    device: str = ""
    machine: dict = field(default_factory=dict)
    repeats: int | None = None
    warmup: int | None = None
    images: str | None = None
    labels: str | None = None
    tta: bool | None = None
    extra: dict = field(default_factory=dict)


# --- recovery kinds (compression.json "recovery"."kind"; the report labels models with it) ------------------------
RECOVERY_DISTILLED = "distilled"
RECOVERY_FINETUNED = "fine-tuned"

DEFAULT_PLANS = "nnUNetPlans"  # nnU-Net's default plans identifier (`-p`)

# --- light plans and loader tuning (nnunet-green-plan, nnunet-green-loader) ----------------------------------------
LIGHT_PLANS = "nnUNetPlansGreenLight"        # plans identifier written by nnunet-green-plan
LIGHT_PLANNER = "nnUNetPlannerGreenLight"    # its planner class (nnunet_green.training.light_plans)
LOADER_FILE = "loader.json"                  # nnunet-green-loader's record, in the trainer's fold folder or -o
LOADER_REPORT = "loader.md"
LOADER_FORMAT = "nnunet-green-loader/1"
