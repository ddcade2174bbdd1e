"""Is training input-bound? nnU-Net's own training data loader against its own training step, per `nnUNet_n_proc_DA`.

The loader is the trainer's: `run_training.get_trainer_from_args(...)` builds the real trainer class from the plans,
and `trainer.get_dataloaders()` builds the augmentation pipeline and the (NonDet)MultiThreadedAugmenter exactly as
`nnUNetv2_train` does, once per measured `nnUNet_n_proc_DA` value (nnU-Net reads that variable when the loaders are
built). The step is the trainer's own `train_step` (forward, loss, backward, gradient clipping, optimizer step; on
CUDA with nnU-Net's autocast and grad scaler) on one real augmented batch.

Loader throughput is measured at steady state: the batches the augmenter may have buffered before the first timed
one (its two queues, `num_cached` each, plus one per worker) are drained first, so the rate is what the workers
produce, not what they stockpiled. Every phase has a time budget; a measurement that runs out of budget stops early
and says so.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import platform
import socket
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from nnunet_green.contract import (DATASET_FILE, DEFAULT_PLANS, LOADER_FILE, LOADER_FORMAT, LOADER_REPORT, GreenError,
                                   write_json_atomic)

N_PROC_ENV = "nnUNet_n_proc_DA"
DEFAULT_HEADROOM = 1.25  # a loader "keeps up" if it delivers this many times the batches the step consumes
SERIAL_TOLERANCE = 0.05   # nnUNet_n_proc_DA=0 keeps up if loading adds at most this fraction to each step
STEP_SHARE = 0.2         # fraction of --max-seconds held back for the training-step timing


class LoaderError(GreenError):
    """A dataset/configuration that cannot be measured (not planned, not preprocessed, unknown trainer...)."""


@dataclass
class LoaderRow:
    n_proc_DA: int                 # the value asked for (nnUNet_n_proc_DA)
    workers: int                   # background workers nnU-Net started (it caps the value at the CPU count); 0 = none
    augmenter: str                 # SingleThreadedAugmenter / NonDetMultiThreadedAugmenter
    startup_s: float               # get_dataloaders(): pipelines, worker start, first batch of each loader
    warmup_batches: int            # drained before timing (what the augmenter could have buffered)
    warmup_s: float
    timed_batches: int
    timed_s: float
    batches_per_s: float
    steady_state: bool             # False: the budget ran out while draining; the rate includes buffered batches
    stopped_early: bool            # fewer timed batches than asked because the budget was spent
    iteration_s: float | None = None  # estimated seconds per training iteration with this value (see decide)
    keeps_up: bool | None = None   # see decide()


@dataclass
class StepTiming:
    seconds_median: float
    seconds_all: list
    steps_per_s: float
    device: str
    autocast: bool
    compiled: bool = False
    stopped_early: bool = False


@dataclass
class LoaderReport:
    dataset: str
    configuration: str
    plans: str
    trainer: str
    fold: int
    device: str
    batch_size: int
    patch_size: list
    rows: list
    step: dict
    input_bound: bool
    recommended_n_proc_DA: int
    verdict: str
    headroom: float
    nnunet_default_n_proc_DA: int
    max_seconds: float
    elapsed_s: float
    machine: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    created: str = ""

    def to_json(self) -> dict:
        return {"format": LOADER_FORMAT, **asdict(self)}


# --- input checks ------------------------------------------------------------------------------------------------
def check_inputs(dataset: str, configuration: str, plans: str, trainer: str, device: str) -> tuple[str, Path]:
    """Dataset name and preprocessed data folder, or LoaderError naming the step that is missing."""
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            raise LoaderError(f"{var} is not set (nnU-Net's data folders; see nnU-Net's setting_up_paths.md)")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    except (RuntimeError, ValueError, AssertionError):
        raise LoaderError(f"dataset {dataset!r} not found in nnUNet_preprocessed "
                          f"({os.environ['nnUNet_preprocessed']}) or nnUNet_raw") from None
    base = Path(os.environ["nnUNet_preprocessed"]) / name
    plans_file = base / f"{plans}.json"
    if not plans_file.is_file():
        raise LoaderError(f"{name} has no plans {plans!r} ({plans_file} missing): plan it first "
                          f"(nnUNetv2_plan_and_preprocess, or nnunet-green-plan for nnUNetPlansGreenLight)")
    from nnunet_green.contract import read_json
    from nnunet_green.nnunet_io import ModelFolderError, configuration_managers

    try:
        _, cm = configuration_managers(read_json(plans_file, "nnU-Net plans"), configuration)
    except ModelFolderError as e:
        raise LoaderError(f"{plans_file}: {e}") from None
    data = base / cm.data_identifier
    if not data.is_dir() or not any(p.suffix in (".b2nd", ".npz") for p in data.iterdir()):
        ident = name.split("_")[0][len("Dataset"):].lstrip("0") or "0"
        raise LoaderError(f"{name} is not preprocessed for {plans}/{configuration} (no cases in {data}): run "
                          f"`nnUNetv2_preprocess -d {ident} -plans_name {plans} -c {configuration}`")
    if (base / DATASET_FILE).is_file() is False:
        raise LoaderError(f"{base / 'dataset.json'} missing (written by nnU-Net's planning)")
    from nnunet_green.nnunet_io import find_trainer

    try:
        find_trainer(trainer)
    except ModelFolderError:
        raise LoaderError(f"trainer {trainer!r} not found by nnU-Net's trainer lookup") from None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LoaderError("--device cuda: no CUDA device is available here (use --device cpu)")
    return name, data


def nnunet_default_n_proc() -> int:
    """What nnU-Net would use here without nnUNet_n_proc_DA (its hostname table, capped at the CPU count)."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    saved = os.environ.pop(N_PROC_ENV, None)
    try:
        return get_allowed_n_proc_DA()
    finally:
        if saved is not None:
            os.environ[N_PROC_ENV] = saved


# --- the trainer -------------------------------------------------------------------------------------------------
def make_trainer(dataset: str, configuration: str, plans: str, trainer: str, fold: int, device: str):
    """The real trainer, initialised (network on the device, optimizer), as nnUNetv2_train builds it; torch threads
    set as run_training does. torch.compile is off (its warm-up takes minutes; see notes)."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    if device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    else:
        torch.set_num_threads(1)
        with contextlib.suppress(RuntimeError):  # only allowed before the first parallel work
            torch.set_num_interop_threads(1)
    os.environ["nnUNet_compile"] = "f"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = get_trainer_from_args(str(dataset), configuration, fold, trainer, plans, device=torch.device(device))
        tr.initialize()
        # as on_train_start: numpy-format datasets are unpacked before training (a no-op for blosc2)
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        if tr.dataset_class is None:
            tr.dataset_class = infer_dataset_class(tr.preprocessed_dataset_folder)
        tr.dataset_class.unpack_dataset(tr.preprocessed_dataset_folder, overwrite_existing=False,
                                        num_processes=1, verify=True)
    tr.network.train()
    return tr


def shutdown(*loaders) -> None:
    """Stop nnU-Net's background augmenters (NonDet/MultiThreadedAugmenter `_finish`); single-threaded ones have
    nothing to stop."""
    for loader in loaders:
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            with contextlib.suppress(Exception):
                finish()


def _buffer_capacity(loader) -> int:
    """Batches an augmenter can hold before the consumer asks: results queue + worker queue (num_cached each) and
    one in every worker's hands."""
    procs = getattr(loader, "num_processes", 0) or 0
    cached = getattr(loader, "num_cached", 0) or 0
    return 2 * cached + procs if procs else 0


def measure_loader(trainer, n_proc: int, batches: int, budget_s: float, tick=None) -> tuple[LoaderRow, dict]:
    """Batches per second of the trainer's training loader with nnUNet_n_proc_DA=n_proc. Returns the row and one
    batch (for the step timing). `tick(n)` is called per delivered batch (progress)."""
    saved = os.environ.get(N_PROC_ENV)
    os.environ[N_PROC_ENV] = str(n_proc)
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    train = val = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train, val = trainer.get_dataloaders()
        startup = time.perf_counter() - t0
        first = None
        warmup = _buffer_capacity(train)
        drained = 0
        while drained < warmup and time.perf_counter() < deadline:
            batch = next(train)
            first = first if first is not None else batch
            drained += 1
        steady = drained >= warmup
        warmup_s = time.perf_counter() - t0 - startup
        timed, t_start = 0, time.perf_counter()
        while timed < batches and (timed == 0 or time.perf_counter() < deadline):
            batch = next(train)
            first = first if first is not None else batch
            timed += 1
            if tick:
                tick(1)
        timed_s = time.perf_counter() - t_start
    finally:
        shutdown(train, val)
        if saved is None:
            os.environ.pop(N_PROC_ENV, None)
        else:
            os.environ[N_PROC_ENV] = saved
    workers = int(getattr(train, "num_processes", 0) or 0)
    row = LoaderRow(n_proc_DA=n_proc, workers=workers, augmenter=type(train).__name__,
                    startup_s=round(startup, 3), warmup_batches=drained, warmup_s=round(warmup_s, 3),
                    timed_batches=timed,
                    timed_s=round(timed_s, 4), batches_per_s=round(timed / max(timed_s, 1e-9), 3),
                    steady_state=steady, stopped_early=timed < batches)
    return row, first


def measure_step(trainer, batch: dict, repeats: int, budget_s: float, tick=None) -> StepTiming:
    """Seconds of the trainer's own `train_step` on one batch: one untimed warm-up, then up to `repeats` timed
    steps within `budget_s` (at least one)."""
    import torch

    dev = trainer.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    deadline = time.perf_counter() + budget_s
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train_step(batch)  # warm-up: allocator, cuDNN autotuning, lazy inits
        sync()
        if tick:
            tick(1)
        times = []
        while len(times) < repeats and (not times or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            trainer.train_step(batch)
            sync()
            times.append(time.perf_counter() - t0)
            if tick:
                tick(1)
    med = statistics.median(times)
    return StepTiming(seconds_median=round(med, 4), seconds_all=[round(t, 4) for t in times],
                      steps_per_s=round(1 / med, 3), device=str(dev), autocast=dev.type == "cuda",
                      stopped_early=len(times) < repeats)


def decide(rows: list[LoaderRow], step: StepTiming, headroom: float = DEFAULT_HEADROOM,
           serial_tolerance: float = SERIAL_TOLERANCE) -> tuple[bool, int, str]:
    """(input-bound?, recommended nnUNet_n_proc_DA, one-paragraph verdict).

    Workers (n >= 1) load while the step runs: an iteration takes max(step, 1 / rate), and a value keeps up if
    rate >= headroom x steps/s. With n = 0 loading runs in the main process between steps: an iteration takes
    step + 1 / rate, and 0 keeps up only if loading adds at most `serial_tolerance` of the step. The recommendation
    is the fewest workers that keep up (every worker is a CPU core taken from the rest of the machine)."""
    need = step.steps_per_s * headroom
    for r in rows:
        load_s = 1 / max(r.batches_per_s, 1e-9)
        r.iteration_s = round(step.seconds_median + load_s if r.workers == 0 else max(step.seconds_median, load_s), 4)
        r.keeps_up = (load_s <= serial_tolerance * step.seconds_median) if r.workers == 0 else r.batches_per_s >= need
    ok = sorted((r for r in rows if r.keeps_up), key=lambda r: (r.workers, r.n_proc_DA))
    where = f"{step.seconds_median:.3f} s per step on {step.device}"
    if ok:
        rec = ok[0]
        if rec.workers == 0:
            text = (f"not input-bound: loading in the main process (nnUNet_n_proc_DA=0) takes "
                    f"{1 / rec.batches_per_s:.3f} s per batch, {1 / rec.batches_per_s / step.seconds_median:.1%} of "
                    f"the training step ({where}); background workers would only take CPU from training.")
        else:
            text = (f"not input-bound: with nnUNet_n_proc_DA={rec.n_proc_DA} the loader delivers "
                    f"{rec.batches_per_s:.2f} batches/s, the training step consumes {step.steps_per_s:.2f}/s "
                    f"({where}); {headroom:g}x headroom needs {need:.2f}/s. More workers would only take CPU from "
                    f"the rest of the machine.")
        return False, rec.n_proc_DA, text
    best = min(rows, key=lambda r: (r.iteration_s, r.workers))
    text = (f"input-bound: no measured value keeps up with the training step ({step.steps_per_s:.2f} steps/s, "
            f"{where}; {need:.2f} batches/s with {headroom:g}x headroom). Fastest: nnUNet_n_proc_DA={best.n_proc_DA} "
            f"({best.batches_per_s:.2f} batches/s, ~{best.iteration_s:.3f} s per iteration instead of "
            f"{step.seconds_median:.3f} s): the {step.device} waits for data. Measure larger values if the CPU has "
            f"cores to spare, or cheapen the augmentation.")
    return True, best.n_proc_DA, text


def run(dataset: str, configuration: str = "3d_fullres", plans: str = DEFAULT_PLANS, trainer: str = "nnUNetTrainer",
        procs=(0, 1, 2), batches: int = 10, steps: int = 3, max_seconds: float = 120.0, device: str | None = None,
        fold: int = 0, headroom: float = DEFAULT_HEADROOM, progress: bool = True) -> tuple[LoaderReport, object]:
    """Measure every value in `procs` and the training step within `max_seconds` (plus the trainer's set-up, which
    counts against the budget too). Returns (report, trainer)."""
    import torch
    from tqdm import tqdm

    t_begin = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name, _ = check_inputs(dataset, configuration, plans, trainer, device)
    procs = list(dict.fromkeys(int(p) for p in procs))
    default_n = nnunet_default_n_proc()
    fold_folder = Path(os.environ["nnUNet_results"]) / name / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}"
    new_folders = [p for p in (fold_folder, fold_folder.parent, fold_folder.parent.parent) if not p.exists()]
    tr = make_trainer(dataset, configuration, plans, trainer, fold, device)
    tr.nnunet_green_new_folders = new_folders  # made by the trainer's __init__ (innermost first)
    rows, batch = [], None
    bar = tqdm(total=len(procs) * batches + steps + 1, desc="loader", unit="batch", disable=not progress,
               dynamic_ncols=True)
    try:
        loader_end = t_begin + max_seconds * (1 - STEP_SHARE)
        for i, n in enumerate(procs):
            bar.set_postfix_str(f"{N_PROC_ENV}={n}")
            budget = max(0.0, (loader_end - time.perf_counter()) / (len(procs) - i))
            row, b = measure_loader(tr, n, batches, budget, tick=bar.update)
            batch = batch if batch is not None else b
            rows.append(row)
        bar.set_postfix_str("training step")
        step = measure_step(tr, batch, steps, max(0.0, t_begin + max_seconds - time.perf_counter()),
                            tick=bar.update)
    finally:
        bar.close()
    input_bound, rec, verdict = decide(rows, step, headroom)
    notes = [f"step timed without torch.compile (nnUNetv2_train compiles on CUDA by default; compiled steps are "
             f"faster, which is what the {headroom:g}x headroom is for)"]
    if device == "cpu":
        notes.append("training on the CPU: workers and the training step share the same cores, so running together "
                     "each gets less than measured alone")
    capped = [r.n_proc_DA for r in rows if r.workers != r.n_proc_DA]
    if capped:
        notes.append(f"nnU-Net caps nnUNet_n_proc_DA at the CPU count ({os.cpu_count()}): {capped} ran with fewer "
                     "workers")
    if any(not r.steady_state for r in rows):
        notes.append("some rows ran out of budget while draining the augmenter's buffer: their rate includes "
                     "buffered batches (too high); raise --max-seconds")
    report = LoaderReport(
        dataset=name, configuration=configuration, plans=plans, trainer=trainer, fold=fold, device=device,
        batch_size=int(tr.batch_size), patch_size=[int(s) for s in tr.configuration_manager.patch_size],
        rows=[asdict(r) for r in rows], step=asdict(step), input_bound=input_bound, recommended_n_proc_DA=rec,
        verdict=verdict, headroom=headroom, nnunet_default_n_proc_DA=default_n, max_seconds=max_seconds,
        elapsed_s=round(time.perf_counter() - t_begin, 2), machine=machine_info(device), notes=notes,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return report, tr


def machine_info(device: str) -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "hostname": socket.gethostname(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- writing -----------------------------------------------------------------------------------------------------
def markdown(report: LoaderReport) -> str:
    r = report
    lines = [f"# Data loading vs training step: {r.dataset} {r.configuration} ({r.plans}, {r.trainer})", "",
             f"Batch {r.batch_size} x patch {r.patch_size}, device {r.device}, {r.machine.get('cpu_count')} CPUs"
             + (f", {r.machine['gpu']}" if r.machine.get("gpu") else "") + f"; measured {r.created}, "
             f"{r.elapsed_s:.0f} s of a {r.max_seconds:g} s budget.", "",
             "| nnUNet_n_proc_DA | workers | batches/s | timed batches | start-up s | est. s/iteration | keeps up |",
             "|---:|---:|---:|---:|---:|---:|:---|"]
    for row in r.rows:
        flag = ("yes" if row["keeps_up"] else "no") + ("" if row["steady_state"] else " (not steady)") \
            + (" (budget spent)" if row["stopped_early"] else "")
        lines.append(f"| {row['n_proc_DA']} | {row['workers']} | {row['batches_per_s']:.2f} | {row['timed_batches']} "
                     f"| {row['startup_s']:.1f} | {row['iteration_s']:.3f} | {flag} |")
    s = r.step
    lines += ["", f"Training step ({r.trainer}.train_step on {s['device']}, median of {len(s['seconds_all'])}): "
              f"{s['seconds_median']:.3f} s = {s['steps_per_s']:.2f} steps/s.", "",
              f"**Verdict:** {r.verdict}", "",
              f"**Recommendation:** `export nnUNet_n_proc_DA={r.recommended_n_proc_DA}` "
              f"(nnU-Net's own default on this machine: {r.nnunet_default_n_proc_DA}).", ""]
    lines += [f"- {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def write_report(report: LoaderReport, folder: Path) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / LOADER_FILE, report.to_json())
    md = folder / LOADER_REPORT
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(markdown(report))
    os.replace(tmp, md)
    return folder / LOADER_FILE, md
