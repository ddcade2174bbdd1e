"""The fast CPU path of a compressed model folder: build it into the checkpoints, report its state, rebuild it.

`build_fast_path(folder)` loads every fold the way the stock predictor does, exports and checks its artefact
(fast_export.install_artefact_) and writes it into the fold's checkpoint (atomically: written beside, renamed);
with `dense_folder` it also times dense eager against the compressed network as the predictor runs it. The
returned record goes to compression.json under "fast_path". `nnunet-green-fastpath FOLDER` (main) rebuilds a
stale or missing artefact, or with --check only reports the state of each fold.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from nnunet_green.contract import (DEFAULT_CHECKPOINT, EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_OK,
                                   FAST_PATH_ARTEFACT_KEY, MANIFEST_FILE, SPEED_RULE_MEASURED, CompressionManifest,
                                   GreenError)
from nnunet_green.nnunet_io import ModelFolder

PROG = "nnunet-green-fastpath"
DEFAULT_SPEED_SECONDS = 60.0  # time bound of the speed-up measurement at compression time


def fold_input_shape(loaded) -> tuple[int, ...]:
    """What the stock predictor feeds the network: batch 1, the plans' patch size."""
    return (1, loaded.num_input_channels, *loaded.configuration_manager.patch_size)


def write_artefact(folder: ModelFolder, fold: str, checkpoint: str, blob: torch.Tensor) -> None:
    """Replace the fold's checkpoint with one whose network_weights carry `blob` (atomic)."""
    ck = folder.load_checkpoint(fold, checkpoint)
    ck["network_weights"][FAST_PATH_ARTEFACT_KEY] = blob.detach().cpu().clone()
    folder.save_checkpoint(fold, ck, checkpoint)


def fold_status(loaded) -> str:
    """ok / missing / runtime / corrupt / stale / unsupported for one loaded fold."""
    from .fast_path import artefact_status, has_fast_path

    if not has_fast_path(loaded.network):
        return "unsupported"
    return artefact_status(loaded.network)[0]


def build_fast_path(folder, folds=None, checkpoint: str = DEFAULT_CHECKPOINT, dense_folder=None,
                    speed_seconds: float | None = DEFAULT_SPEED_SECONDS, only_if_needed: bool = False,
                    macs: tuple[int, int] | None = None, speed_rule: str | None = None) -> dict:
    """Build and store the artefact of every fold (or, with only_if_needed, of the folds whose artefact is missing
    or stale); returns the "fast_path" record. Without onnx/onnxruntime or for a network class without a fast path
    the record says so and nothing is written. With `dense_folder`, the compressed model is then timed as the
    predictor will run it (fast path or, where it cannot apply, eager) against the dense one, and a slower model
    gets a `warning`; `speed_seconds=None` skips that. `speed_rule`: the compression's (TuckerConfig.speed_rule),
    so the warning suggests only what was not done."""
    folder = ModelFolder(folder)
    folds = [str(f) for f in (folds or folder.folds(checkpoint))]
    record, loaded = _build_artefacts(folder, folds, checkpoint, only_if_needed)
    if macs:
        record["predicted_speedup"] = {"value": round(macs[0] / macs[1], 3),
                                       "model": "multiply-add ratio dense / compressed at the plans' patch size "
                                                "(arithmetic only: it ignores the non-conv work and the runtime)"}
    if dense_folder is not None and speed_seconds is not None and folds:
        from .fast_export import measure_speedup

        # the last fold as loaded while building (its artefact in place), else loaded now: what the predictor runs
        loaded = loaded or folder.load(folds[-1], checkpoint, what="compressed model")
        dense = ModelFolder(dense_folder).load(loaded.fold, checkpoint, what="dense model").network
        speed = measure_speedup(dense, loaded.network, fold_input_shape(loaded), max_seconds=speed_seconds)
        speed.update(fold=loaded.fold, fast_path_used=fold_status(loaded) == "ok")
        record["measured"] = speed
        if speed["speedup"] < 1.0:
            record["warning"] = slower_warning(speed, speed_rule, record.get("status"))
    return record


def _build_artefacts(folder: ModelFolder, folds: list[str], checkpoint: str, only_if_needed: bool):
    """(record with status, per-fold results; the last fold loaded, or None where nothing could be built)."""
    from .fast_export import ArtefactError, install_artefact_

    record: dict = {"folds": {}}
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        record.update(status="unavailable", reason=f"{e.name} is not installed")
        return record, None
    record["runtime"] = f"onnxruntime {onnxruntime.__version__}"
    loaded = None
    for f in folds:
        loaded = folder.load(f, checkpoint, what="compressed model")
        status = fold_status(loaded)
        if status == "unsupported":
            record.update(status="unsupported", reason=f"no fast CPU path for {type(loaded.network).__name__}")
            return record, loaded
        if only_if_needed and status == "ok":
            record["folds"][f"fold_{f}"] = {"status": "ok (kept)"}
            continue
        try:
            record["folds"][f"fold_{f}"] = install_artefact_(loaded.network, fold_input_shape(loaded))
        except (ArtefactError, RuntimeError) as e:  # the exporter raises RuntimeError for unexportable graphs
            record["folds"][f"fold_{f}"] = {"status": "failed", "reason": str(e).splitlines()[0][:300]}
            continue
        write_artefact(folder, f, checkpoint, loaded.network._buffers[FAST_PATH_ARTEFACT_KEY])
    statuses = {r["status"] for r in record["folds"].values()}
    record["status"] = "built" if statuses <= {"built", "ok (kept)"} else "failed"
    return record, loaded


def slower_warning(speed: dict, speed_rule: str | None = None, fast_status: str | None = None) -> str:
    """What a user reads when the compressed model measured slower than the dense one: the numbers, then what can
    be done, leaving out what this compression did already. `fast_status`: the fast path record's status.
    `--speed-rule measured` is offered where the model ran eagerly: its timings are eager PyTorch's, and with the
    fast path it made the compressed models slower (docs/results/speed_rule.md)."""
    eager = not speed.get("fast_path_used")
    options = []
    if eager and speed_rule != SPEED_RULE_MEASURED:
        options.append(f"--speed-rule {SPEED_RULE_MEASURED} (keeps dense the layers whose factorization is slower "
                       "on this machine; they hold few parameters)")
    options.append("another --rank-ratio or --rank-budget (a smaller one removes more work per layer)")
    if eager and fast_status == "unavailable":
        options.append("the fast CPU path (install onnx and onnxruntime, then nnunet-green-fastpath FOLDER)")
    elif eager and fast_status == "failed":
        options.append("the fast CPU path, whose artefact failed to build (compression.json fast_path.folds says "
                       "why)")
    options.append("predicting on a GPU")
    return (f"the compressed model is not faster than the dense one on this machine ({speed['speedup']:.2f}x at "
            f"input {tuple(speed['input_shape'])}, {speed['threads']} threads, "
            + ("eager PyTorch" if eager else "fast CPU path")
            + "): small patches leave little convolution work to save. Try " + "; ".join(options) + ".")


def update_manifest(folder: Path, record: dict) -> None:
    path = Path(folder) / MANIFEST_FILE
    if path.is_file():
        manifest = CompressionManifest.read(path)
        manifest.fast_path = record
        manifest.write(path)


# --- CLI -----------------------------------------------------------------------------------------------------------
EXAMPLES = f"""\
examples:
  # after fine-tuning, a hand edit, or for a folder written before the fast path existed
  {PROG} compressed/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres
  # only report each fold's state (ok, missing, stale, corrupt, runtime = onnxruntime missing)
  {PROG} --check COMPRESSED_FOLDER

{EXIT_CODES_HELP}
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Build (or check) the fast CPU inference artefact (ONNX "
                                "Runtime graph) stored in the checkpoints of a Tucker-compressed nnU-Net model folder. "
                                "Checkpoints are replaced atomically; only missing or stale artefacts are rebuilt.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="COMPRESSED_FOLDER")
    p.add_argument("--check", action="store_true", help="report each fold's state, change nothing")
    p.add_argument("-f", "--folds", nargs="+", help="folds (default: all present)")
    p.add_argument("-chk", "--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--force", action="store_true", help="rebuild also artefacts that are up to date")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        folder = ModelFolder(args.folder).check()
        if not folder.is_compressed:
            raise GreenError(f"{folder.path} is not a Tucker-compressed model folder")
        folds = [str(f) for f in (args.folds or folder.folds(args.checkpoint))]
        if args.check:
            for f in folds:
                print(f"fold_{f}: {fold_status(folder.load(f, args.checkpoint))}")
            return EXIT_OK
        record = build_fast_path(folder.path, folds, args.checkpoint, only_if_needed=not args.force)
    except GreenError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for name, r in record["folds"].items():
        print(f"{name}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else ""))
    if record["status"] in ("unavailable", "unsupported"):
        print(f"{PROG}: error: {record['reason']}", file=sys.stderr)
        return EXIT_BAD_INPUT
    old = (CompressionManifest.read(folder.path / MANIFEST_FILE).fast_path or {}) \
        if (folder.path / MANIFEST_FILE).is_file() else {}
    update_manifest(folder.path, {**old, **{k: v for k, v in record.items() if k != "folds"},
                                  "folds": {**old.get("folds", {}), **record["folds"]}})
    return EXIT_OK if record["status"] == "built" else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
