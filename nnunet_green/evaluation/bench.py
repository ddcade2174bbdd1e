"""Compare nnU-Net model folders (e.g. dense vs Tucker-compressed): parameters, multiply-adds, forward latency
(interleaved across models), and optionally the stock predictor's wall time and Dice on real images.

`bench(models, out_dir, ...)` writes OUT/bench.json (`contract.BenchResult`, BENCH_FORMAT) and OUT/bench.md and
returns the record as a dict. Every model is loaded through `nnunet_io.ModelFolder.load`, as the predictor does.
"""
from __future__ import annotations

import datetime as _dt
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nnunet_green.contract import BENCH_FILE, DEFAULT_CHECKPOINT, BenchResult, GreenError
from nnunet_green.evaluation.dice import dice_tables, foreground_labels, summarize
from nnunet_green.evaluation.machine import machine_info
from nnunet_green.evaluation.timing import forward_seconds, interleaved
from nnunet_green.nnunet_io import ModelFolder

PREDICT_EXE = "nnUNetv2_predict_from_modelfolder"
DENSE_RULE = "dense"


class BenchError(GreenError):
    """Bad bench input or a failed prediction; the message is meant for the user as is."""


def display_names(folders: list[Path]) -> list[str]:
    """Folder names; where two coincide, the shortest path suffixes that tell them apart (joined by "-")."""
    names = []
    for f in folders:
        same = [g for g in folders if g.name == f.name and g != f]
        k = 1
        while same and k < len(f.parts) and any(g.parts[-k:] == f.parts[-k:] for g in same):
            k += 1
        names.append("-".join(f.parts[-k:]).lstrip("/"))
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # the same folder given twice
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}_{seen[n]}"
    return names


def image_cases(images: Path, ending: str) -> list[str]:
    """Case ids of the `CASE_0000<ending>` files in `images`."""
    suffix = "_0000" + ending
    return sorted(p.name[:-len(suffix)] for p in images.iterdir() if p.is_file() and p.name.endswith(suffix))


def model_label(folder: ModelFolder) -> dict:
    """How a model was made, for the bench row: rank ratio (None if budgeted or dense), rule and kept fraction."""
    manifest = folder.manifest()
    if manifest is None:
        return {"rank_ratio": None, "rule": DENSE_RULE, "kept_fraction": 1.0}
    return {"rank_ratio": manifest.config.get("rank_ratio"), "rule": manifest.rule_label,
            "kept_fraction": manifest.kept_fraction}


def _check_inputs(images, labels, ending: str):
    images = Path(images).absolute() if images else None
    labels = Path(labels).absolute() if labels else None
    if labels is not None and images is None:
        raise BenchError("--labels needs --images")
    if images is None:
        return None, None
    if not images.is_dir():
        raise BenchError(f"images folder not found: {images}")
    cases = image_cases(images, ending)
    if not cases:
        raise BenchError(f"images folder {images} has no *_0000{ending} files")
    if labels is not None:
        if not labels.is_dir():
            raise BenchError(f"labels folder not found: {labels}")
        missing = [c + ending for c in cases if not (labels / (c + ending)).is_file()]
        if missing:
            raise BenchError(f"no label in {labels} for case(s) {', '.join(missing[:5])}")
    return images, labels


def predict(images: Path, out: Path, folder: Path, fold: str, checkpoint: str, device: str, npp: int, nps: int,
            disable_tta: bool) -> float:
    """The stock predictor (a subprocess, as a user runs it) on `images`; returns its wall time."""
    exe = Path(sys.executable).parent / PREDICT_EXE
    if not exe.exists():
        exe = Path(shutil.which(PREDICT_EXE) or exe)
    if out.exists():
        shutil.rmtree(out)
    cmd = [str(exe), "-i", str(images), "-o", str(out), "-m", str(folder), "-f", fold, "-chk", checkpoint,
           "-device", device, "--disable_progress_bar", "-npp", str(npp), "-nps", str(nps)]
    if disable_tta:
        cmd.append("--disable_tta")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise BenchError(f"prediction with {folder} failed (exit {proc.returncode}): {tail[0]}")
    return wall


def bench(models, out_dir, device: str = "cpu", patch=None, repeats: int = 5, warmup: int = 1, images=None,
          labels=None, fold=None, checkpoint: str = DEFAULT_CHECKPOINT, npp: int = 1, nps: int = 1,
          disable_tta: bool = False, log=None) -> dict:
    """Measure `models` (model folders, first = reference) and write OUT/bench.json and OUT/bench.md.
    Bad input raises a GreenError before anything is written."""
    import torch

    from nnunet_green.compression import count_macs

    log = log or (lambda msg: print(msg, file=sys.stderr))
    folders = [ModelFolder(m).check() for m in models]
    if not folders:
        raise BenchError("no model folder given")
    if repeats < 1 or warmup < 0:
        raise BenchError("--repeats must be >= 1 and --warmup >= 0")
    if patch is not None and (len(patch) != 3 or min(patch) < 1):
        raise BenchError(f"--patch needs three positive sizes, got {patch}")
    for f in folders:
        f.dataset_json  # noqa: B018  (a folder without dataset.json fails here, with its name)
    folds = [f.default_fold(fold, checkpoint) for f in folders]
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked but torch sees no CUDA device")
    dev = torch.device(device)
    ending = folders[0].file_ending
    images, labels = _check_inputs(images, labels, ending)

    names = display_names([f.path for f in folders])
    loaded = [f.load(fo, checkpoint, dev) for f, fo in zip(folders, folds)]
    rows, inputs = [], {}
    gen = torch.Generator(device=dev)
    for name, folder, m in zip(names, folders, loaded):
        net = m.network.eval()
        p = list(patch) if patch else list(m.configuration_manager.patch_size)
        with torch.inference_mode():
            macs = int(count_macs(net, (1, m.num_input_channels, *p)))
        rows.append({"name": name, "path": str(folder.path), "fold": m.fold, **model_label(folder),
                     "params": sum(t.numel() for t in net.parameters()), "macs": macs, "patch_size": p})
        inputs[name] = torch.randn((1, m.num_input_channels, *p), device=dev, generator=gen.manual_seed(0))
    out_dir = Path(out_dir).absolute()
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _measure(rows, loaded, inputs, dev, repeats, warmup, images, labels, ending, checkpoint, npp, nps,
                        disable_tta, out_dir, log)
    except BaseException:  # nothing half-written: what this run created goes again
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for row in rows:
                shutil.rmtree(out_dir / "predictions" / row["name"], ignore_errors=True)
        raise


def _measure(rows, loaded, inputs, dev, repeats, warmup, images, labels, ending, checkpoint, npp, nps, disable_tta,
             out_dir: Path, log) -> dict:
    """Latency, then predictions and Dice; `loaded` and `inputs` are emptied once timed (memory for the
    predictor subprocesses)."""
    import torch

    device = dev.type
    log(f"timing {len(loaded)} model(s): {warmup} warm-up + {repeats} timed forward(s) each on {device}")
    runs = {row["name"]: (lambda m=m, x=inputs[row["name"]]: forward_seconds(m.network, x, dev))
            for row, m in zip(rows, loaded)}
    times = interleaved(runs, repeats, warmup)
    for row in rows:
        t = times[row["name"]]
        row["latency_s"] = {"median": statistics.median(t), "runs": [round(v, 6) for v in t]}
        row.update(predict_wall_s=None, dice_vs_labels=None, agreement_dice=None)
    dataset_json = loaded[0].dataset_json
    del runs
    loaded.clear()
    inputs.clear()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    if images is not None:
        fg = foreground_labels(dataset_json)
        ref_dir = None
        for row in rows:
            pred_dir = out_dir / "predictions" / row["name"]
            log(f"predicting {images} with {row['name']}")
            row["predict_wall_s"] = round(predict(images, pred_dir, Path(row["path"]), row["fold"], checkpoint,
                                                  device, npp, nps, disable_tta), 3)
            cases = sorted(p.name for p in pred_dir.iterdir() if p.is_file() and p.name.endswith(ending))
            if not cases:
                raise BenchError(f"the predictor wrote no {ending} files to {pred_dir}")
            per_label = {}
            if labels is not None:
                row["dice_vs_labels"], per_label["vs_labels"] = summarize(dice_tables(pred_dir, labels, cases, fg))
            if ref_dir is None:
                ref_dir = pred_dir
            else:
                row["agreement_dice"], per_label["agreement"] = summarize(dice_tables(pred_dir, ref_dir, cases, fg))
            row["per_label"] = per_label
            row["n_cases"] = len(cases)

    result = BenchResult(models=rows, reference=rows[0]["name"],
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), device=device,
                         machine=machine_info(dev), repeats=repeats, warmup=warmup,
                         images=str(images) if images else None, labels=str(labels) if labels else None,
                         tta=None if images is None else not disable_tta)
    result.write(out_dir / BENCH_FILE)
    data = result.to_json()
    (out_dir / "bench.md").write_text(markdown(data))
    return data


def _fmt(v, spec=""):
    return "–" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    ref, machine = result["models"][0], result["machine"]
    lines = [f"# nnunet-green-bench ({result['device']}, {machine['cpu']}"
             f"{', ' + machine['gpu'] if machine.get('gpu') else ''})", "",
             f"Reference: `{result['reference']}`. Latency: median of {result['repeats']} forwards (batch 1, "
             "models interleaved); MACs at the patch size shown.", "",
             "| model | rule | params | MACs | patch | latency median (s) | speed-up | predict wall (s) "
             "| Dice vs labels | agreement Dice |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        lines.append(
            f"| {m['name']} | {m.get('rule') or _fmt(m['rank_ratio'])} | {m['params']:,} "
            f"({m['params'] / ref['params']:.1%}) | {m['macs'] / 1e9:.2f} G ({m['macs'] / ref['macs']:.1%}) "
            f"| {'×'.join(map(str, m['patch_size']))} | {m['latency_s']['median']:.4f} "
            f"| {ref['latency_s']['median'] / m['latency_s']['median']:.2f}× | {_fmt(m['predict_wall_s'], '.1f')} "
            f"| {_fmt(m['dice_vs_labels'], '.4f')} | {_fmt(m['agreement_dice'], '.4f')} |")
    return "\n".join(lines) + "\n"
