"""`nnunet-green-bench`: compare nnU-Net model folders (e.g. dense vs Tucker-compressed): parameters, MACs, forward
latency (interleaved across models), and optionally stock-predictor wall time and Dice on real images."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

PROG = "nnunet-green-bench"
FORMAT = "nnunet-green-bench/1"

EXAMPLES = """\
examples:
  # dense vs compressed: params, MACs and forward latency at the plans' patch size
  nnunet-green-bench dense/nnUNetTrainer__nnUNetPlans__3d_fullres compressed/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      -o bench_out --repeats 5
  # also predict held-out images with the stock predictor and score them
  nnunet-green-bench DENSE COMPRESSED -o bench_out --images imagesTs --labels labelsTs -f 0

The first model is the reference: agreement Dice is each model's predictions against the first model's.
"""


class BenchError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL_FOLDER", help="nnU-Net model folders; the first is the reference")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="writes bench.json, bench.md, predictions/")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--patch", nargs=3, type=int, metavar=("Z", "Y", "X"), default=None,
                   help="input size for MACs and latency (default: each model's plans patch size)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per model (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per model first")
    p.add_argument("--images", default=None, help="folder of images (nnU-Net naming, CASE_0000.nii.gz) to predict")
    p.add_argument("--labels", default=None, help="folder of reference labels (CASE.nii.gz) for Dice")
    p.add_argument("-f", "--fold", default=None, help="fold to use (default: first fold present)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("-npp", type=int, default=1, help="preprocessing workers of the predictor")
    p.add_argument("-nps", type=int, default=1, help="export workers of the predictor")
    p.add_argument("--disable-tta", action="store_true",
                   help="predict without mirroring test-time augmentation (nnU-Net's --disable_tta; 8x fewer forwards "
                        "in 3D)")
    return p


# --------------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------------

def _fold_of(folder: Path, fold: str | None, checkpoint: str) -> str:
    from nnunet_green.compression.model_folder import available_folds

    present = available_folds(folder, checkpoint)
    if fold is None:
        if not present:
            raise BenchError(f"{folder} has no fold_*/{checkpoint}")
        return present[0]
    if str(fold) not in present:
        raise BenchError(f"{folder} has no fold_{fold}/{checkpoint} (folds present: {', '.join(present) or 'none'})")
    return str(fold)


def _check_model(folder: Path):
    if not folder.is_dir():
        raise BenchError(f"model folder not found: {folder}")
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise BenchError(f"{folder} is not an nnU-Net model folder (no {name})")


def _names(folders: list[Path]) -> list[str]:
    """Folder names; where two coincide, the shortest path suffixes that tell them apart (joined by "-")."""
    names = []
    for f in folders:
        same = [g for g in folders if g.name == f.name and g != f]
        k = 1
        while same and k < len(f.parts) and any(g.parts[-k:] == f.parts[-k:] for g in same):
            k += 1
        names.append("-".join(f.parts[-k:]).lstrip("/"))
    seen = {}
    for i, n in enumerate(names):  # the same folder given twice
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}_{seen[n]}"
    return names


def _rank_ratio(folder: Path):
    p = folder / "compression.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())["config"]["rank_ratio"]
    except (ValueError, KeyError, TypeError):
        return None


def _case_files(folder: Path, ending: str, suffix: str = "") -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix + ending))


# --------------------------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------------------------

class _Model:
    def __init__(self, folder: Path, name: str, fold: str, checkpoint: str, device):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.folder, self.name, self.fold, self.device = folder, name, fold, device
        predictor = nnUNetPredictor(device=device, verbose=False, allow_tqdm=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                predictor.initialize_from_trained_model_folder(str(folder), use_folds=[fold], checkpoint_name=checkpoint)
            except Exception as e:
                raise BenchError(f"cannot load {folder} (fold {fold}): {type(e).__name__}: {e}") from None
        self.network = predictor.network.to(device).eval()
        self.patch = list(predictor.configuration_manager.patch_size)
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        self.n_in = determine_num_input_channels(predictor.plans_manager, predictor.configuration_manager,
                                                 predictor.dataset_json)
        self.dataset_json = predictor.dataset_json
        self.params = sum(p.numel() for p in self.network.parameters())
        self.runs: list[float] = []
        self._torch = torch

    def input(self, patch):
        return self._torch.randn((1, self.n_in, *patch), device=self.device,
                                 generator=self._torch.Generator(device=self.device).manual_seed(0))

    def forward_s(self, x) -> float:
        torch = self._torch
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", enabled=cuda):  # fp16 autocast on GPU, as nnU-Net
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.network(x)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0


def _dice_tables(pred_dir: Path, ref_dir: Path, cases: list[str], labels: list[int]) -> dict[int, list[float]]:
    """Per label: Dice per case (NaN where both are empty)."""
    import numpy as np
    import SimpleITK as sitk

    out = {lab: [] for lab in labels}
    for case in cases:
        ref_path = ref_dir / case
        if not ref_path.is_file():
            raise BenchError(f"no label for predicted case {case} in {ref_dir}")
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / case)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_path)))
        if a.shape != b.shape:
            raise BenchError(f"{case}: prediction shape {a.shape} differs from {ref_path} {b.shape}")
        for lab in labels:
            pa, pb = a == lab, b == lab
            denom = int(pa.sum()) + int(pb.sum())
            out[lab].append(float("nan") if denom == 0 else 2.0 * int((pa & pb).sum()) / denom)
    return out


def _summarize(table: dict[int, list[float]]):
    per_label = {}
    for lab, vals in table.items():
        vals = [v for v in vals if not math.isnan(v)]
        per_label[str(lab)] = sum(vals) / len(vals) if vals else None
    defined = [v for v in per_label.values() if v is not None]
    return (sum(defined) / len(defined) if defined else None), per_label


def _foreground_labels(dataset_json: dict) -> list[int]:
    if dataset_json.get("regions_class_order"):
        return [int(v) for v in dataset_json["regions_class_order"]]
    vals = [v for k, v in dataset_json["labels"].items() if k != "ignore" and isinstance(v, int)]
    return sorted(v for v in set(vals) if v != 0)


def _predict(exe: Path, images: Path, out: Path, model: _Model, checkpoint: str, device: str, npp: int,
             nps: int, disable_tta: bool) -> float:
    if out.exists():
        shutil.rmtree(out)
    cmd = [str(exe), "-i", str(images), "-o", str(out), "-m", str(model.folder), "-f", model.fold, "-chk", checkpoint,
           "-device", device, "--disable_progress_bar", "-npp", str(npp), "-nps", str(nps)]
    if disable_tta:
        cmd.append("--disable_tta")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise BenchError(f"prediction with {model.folder} failed (exit {proc.returncode}): {tail[0]}")
    return wall


def _machine(device) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
            else None, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def bench(models, out_dir, device: str = "cpu", patch=None, repeats: int = 5, warmup: int = 1, images=None,
          labels=None, fold=None, checkpoint: str = "checkpoint_final.pth", npp: int = 1, nps: int = 1,
          disable_tta: bool = False, log=None) -> dict:
    """Measure `models` (model folders, first = reference) and write OUT/bench.json and OUT/bench.md."""
    import torch

    from nnunet_green.compression import count_macs

    log = log or (lambda msg: print(msg, file=sys.stderr))
    folders = [Path(m).absolute() for m in models]
    if not folders:
        raise BenchError("no model folder given")
    if repeats < 1 or warmup < 0:
        raise BenchError("--repeats must be >= 1 and --warmup >= 0")
    if patch is not None and (len(patch) != 3 or min(patch) < 1):
        raise BenchError(f"--patch needs three positive sizes, got {patch}")
    for f in folders:
        _check_model(f)
    folds = [_fold_of(f, fold, checkpoint) for f in folders]
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked but torch sees no CUDA device")
    dev = torch.device(device)

    images = Path(images).absolute() if images else None
    labels = Path(labels).absolute() if labels else None
    if labels is not None and images is None:
        raise BenchError("--labels needs --images")
    ds0 = json.loads((folders[0] / "dataset.json").read_text())
    ending = ds0.get("file_ending", ".nii.gz")
    if images is not None:
        if not images.is_dir():
            raise BenchError(f"images folder not found: {images}")
        if not _case_files(images, ending, "_0000"):
            raise BenchError(f"images folder {images} has no *_0000{ending} files")
        if labels is not None:
            if not labels.is_dir():
                raise BenchError(f"labels folder not found: {labels}")
            missing = [p.name[: -len("_0000" + ending)] + ending for p in _case_files(images, ending, "_0000")
                       if not (labels / (p.name[: -len("_0000" + ending)] + ending)).is_file()]
            if missing:
                raise BenchError(f"no label in {labels} for case(s) {', '.join(missing[:5])}")
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)

    names = _names(folders)
    loaded = [_Model(f, n, fo, checkpoint, dev) for f, n, fo in zip(folders, names, folds)]
    rows = []
    for m in loaded:
        p = list(patch) if patch else m.patch
        with torch.inference_mode():
            macs = int(count_macs(m.network, (1, m.n_in, *p)))
        rows.append({"name": m.name, "path": str(m.folder), "fold": m.fold, "rank_ratio": _rank_ratio(m.folder),
                     "params": m.params, "macs": macs, "patch_size": p})
        m.x = m.input(p)

    # interleaved timing: every round runs each model once, rotating the order, so drift hits all alike
    log(f"timing {len(loaded)} model(s): {warmup} warm-up + {repeats} timed forward(s) each on {device}")
    for _ in range(warmup):
        for m in loaded:
            m.forward_s(m.x)
    for r in range(repeats):
        k = r % len(loaded)
        for m in loaded[k:] + loaded[:k]:
            m.runs.append(m.forward_s(m.x))
    for row, m in zip(rows, loaded):
        row["latency_s"] = {"median": statistics.median(m.runs), "runs": [round(t, 6) for t in m.runs]}
        row.update(predict_wall_s=None, dice_vs_labels=None, agreement_dice=None)
    for m in loaded:  # free memory before the predictor subprocesses
        m.network = m.x = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    if images is not None:
        exe = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"
        if not exe.exists():
            exe = Path(shutil.which("nnUNetv2_predict_from_modelfolder") or exe)
        fg = _foreground_labels(loaded[0].dataset_json)
        ref_dir = None
        for row, m in zip(rows, loaded):
            pred_dir = out_dir / "predictions" / m.name
            log(f"predicting {images} with {m.name}")
            row["predict_wall_s"] = round(_predict(exe, images, pred_dir, m, checkpoint, device, npp, nps, disable_tta), 3)
            cases = [p.name for p in _case_files(pred_dir, ending)]
            if not cases:
                raise BenchError(f"the predictor wrote no {ending} files to {pred_dir}")
            per_label = {}
            if labels is not None:
                row["dice_vs_labels"], per_label["vs_labels"] = _summarize(_dice_tables(pred_dir, labels, cases, fg))
            if ref_dir is None:
                ref_dir = pred_dir
            else:
                row["agreement_dice"], per_label["agreement"] = _summarize(_dice_tables(pred_dir, ref_dir, cases, fg))
            row["per_label"] = per_label
            row["n_cases"] = len(cases)

    result = {"format": FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": device, "machine": _machine(dev), "repeats": repeats, "warmup": warmup,
              "images": str(images) if images else None, "labels": str(labels) if labels else None,
              "tta": None if images is None else not disable_tta,
              "models": rows, "reference": rows[0]["name"]}
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    (out_dir / "bench.md").write_text(markdown(result))
    return result


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    ref = result["models"][0]
    lines = [f"# nnunet-green-bench ({result['device']}, {result['machine']['cpu']}"
             f"{', ' + result['machine']['gpu'] if result['machine']['gpu'] else ''})", "",
             f"Reference: `{result['reference']}`. Latency: median of {result['repeats']} forwards (batch 1, "
             "models interleaved); MACs at the patch size shown.", "",
             "| model | rank ratio | params | MACs | patch | latency median (s) | speed-up | predict wall (s) "
             "| Dice vs labels | agreement Dice |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        lines.append(
            f"| {m['name']} | {_fmt(m['rank_ratio'], '')} | {m['params']:,} ({m['params'] / ref['params']:.1%}) "
            f"| {m['macs'] / 1e9:.2f} G ({m['macs'] / ref['macs']:.1%}) | {'×'.join(map(str, m['patch_size']))} "
            f"| {m['latency_s']['median']:.4f} | {ref['latency_s']['median'] / m['latency_s']['median']:.2f}× "
            f"| {_fmt(m['predict_wall_s'], '.1f')} | {_fmt(m['dice_vs_labels'], '.4f')} "
            f"| {_fmt(m['agreement_dice'], '.4f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation noise from imports
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        result = bench(args.models, args.output, device=args.device, patch=args.patch, repeats=args.repeats,
                       warmup=args.warmup, images=args.images, labels=args.labels, fold=args.fold,
                       checkpoint=args.checkpoint, npp=args.npp, nps=args.nps, disable_tta=args.disable_tta)
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(markdown(result), end="")
    print(f"wrote {Path(args.output) / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
