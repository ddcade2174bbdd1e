#!/usr/bin/env python
"""`make bench-e2e`: wall time of the REAL command-line tools on real CTs, dense vs Tucker-compressed folder of the
same model, dense and compressed runs interleaved.

(a) `TotalSegmentator --fast --ml -d cpu` on `example_ct.nii.gz` (real abdomen CT, 3 mm) with TOTALSEG_WEIGHTS_PATH
    on a TS-3mm-shaped weights root (Dataset297 layout, old-format plans, 5-stage PlainConvUNet [32 .. 320], patch
    112x112x128, 118 outputs) vs the root `compress_weights_root` wrote from it (as `nnunet-green-compress -i ROOT`).
(b) `nnUNetv2_predict_from_modelfolder` on a TS-1.5mm-shaped model folder (organs part model: 6 stages, patch
    128^3, 25 outputs) vs its compressed folder, on the two real 1.5 mm chest CT crops of the example data.

Weights are random (the real ones are a download) and, by default, projected so that every spatial kernel has
multilinear rank <= 8: Tucker-2 at any rank ratio is then exact, so the segmentations must agree and any
disagreement points at the inference path, not at the approximation. Speed does not depend on the weights' values.
`--weights random` keeps plain random weights (agreement then measures the approximation on meaningless weights).

Each run is a child process: `benchmarks/timed_cli.py` runs the console script's own entry point and logs when the
network's forwards ran, and its own peak resident memory (VmHWM) - the process that runs the network; the largest
peak of its worker processes (preprocessing, export) is recorded beside it. (The ru_maxrss a parent gets from
wait4 would not do: Linux counts the launching process's memory at fork into the child's maximum.) From the
forward log the wall time splits into: before the first forward
(interpreter start, imports, model load, reading and preprocessing the first image), network forwards, between
forwards (sliding-window bookkeeping, the next case's preprocessing), after the last forward (resampling the
logits back, argmax, export, TotalSegmentator's post-processing). TotalSegmentator's own "... in N s" stage lines
are kept too.

With --parts also: the compressed folder predicted by stock `nnUNetv2_predict ... -num_parts 2 -part_id i`, the two
parts one after the other, checked that together they wrote every case once and recording which inference path each
part reported (tests/test_compress_cli.py checks the same on the Hippocampus model in CI).

Writes <out>/end_to_end_cpu.json and .md (evaluation.experiment.write_result); prints each target as MET/MISS.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nnunet_green.contract import MANIFEST_FILE
from nnunet_green.evaluation import interleaved, machine_info
from nnunet_green.evaluation.experiment import write_result

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("NNUNET_GREEN_DATA", HERE.parent.parent / "shared" / "data"))
TS_EXAMPLE = DATA / "totalsegmentator_example"
CT_3MM = TS_EXAMPLE / "example_ct.nii.gz"
CTS_1_5MM = {"pulmonary": TS_EXAMPLE / "pulmonary_report" / "ct_cropped.nii.gz",
             "aorta": TS_EXAMPLE / "aorta_report" / "ct_cropped.nii.gz"}
TARGETS = {"speedup": 2.5}
PACKAGE_LOG_PREFIX = "nnunet-green:"  # how the package says which inference path ran (stderr)
STAGE_LINE = re.compile(r"^\s*(\w[\w ]*?) in ([0-9.]+)s\s*$")  # TotalSegmentator: "  Predicted in 12.34s"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ model folders

def dense_weights(plans: dict, dataset: dict, weights: str, seed: int = 0) -> dict:
    import torch

    from nnunet_green.testing.totalseg import build_network, project_to_low_rank_

    torch.manual_seed(seed)
    net = build_network(plans, dataset)
    if weights == "low-rank":
        project_to_low_rank_(net, 8)
    return net.state_dict()


def make_models(work: Path, ratio: float, weights: str) -> dict:
    """Dense and compressed TS-3mm root and TS-1.5mm folder under `work`; reused when a previous run with the same
    --work left them complete (the compressed ones are published atomically)."""
    from nnunet_green.testing import totalseg

    comp15 = work / "ts15_compressed" / totalseg.ORGANS_TASK_FOLDER / totalseg.MODEL_FOLDER
    comp3 = work / "ts3mm_compressed" / totalseg.TASK_FOLDER / totalseg.MODEL_FOLDER
    if (comp15 / MANIFEST_FILE).is_file() and (comp3 / MANIFEST_FILE).is_file():
        log(f"reusing the model folders in {work}")
        man = {k: dict(json.loads((f / MANIFEST_FILE).read_text()), compress_wall_s=None) for k, f in
               (("ts3mm", comp3), ("ts15", comp15))}
        return {"ts3mm": {"dense": work / "ts3mm_dense", "compressed": work / "ts3mm_compressed",
                          "manifest": man["ts3mm"]},
                "ts15": {"dense": work / "ts15_dense" / totalseg.ORGANS_TASK_FOLDER / totalseg.MODEL_FOLDER,
                         "compressed": comp15, "manifest": man["ts15"]}}
    return build_models(work, ratio, weights)


def build_models(work: Path, ratio: float, weights: str) -> dict:
    from nnunet_green.compression import TuckerConfig
    from nnunet_green.compression.model_folder import compress_model_folder, compress_weights_root
    from nnunet_green.testing import totalseg

    config = TuckerConfig(rank_ratio=ratio)
    log(f"TS-3mm-shaped weights root ({weights} weights), compressed at rank ratio {ratio}")
    plans, dataset = totalseg.ts_old_format_plans(**totalseg.DATASET297), totalseg.ts_dataset_json()
    totalseg.write_model_folder(work / "ts3mm_dense", plans, dataset, dense_weights(plans, dataset, weights))
    t0 = time.perf_counter()
    (man3,) = compress_weights_root(work / "ts3mm_dense", work / "ts3mm_compressed", config, progress=True)
    man3["compress_wall_s"] = time.perf_counter() - t0

    log(f"TS-1.5mm-shaped model folder ({weights} weights), compressed at rank ratio {ratio}")
    plans, dataset = totalseg.ts_old_format_plans(**totalseg.DATASET291), totalseg.ts_organs_dataset_json()
    dense15 = totalseg.write_model_folder(work / "ts15_dense", plans, dataset, dense_weights(plans, dataset, weights),
                                          task_folder=totalseg.ORGANS_TASK_FOLDER)
    comp15 = work / "ts15_compressed" / totalseg.ORGANS_TASK_FOLDER / totalseg.MODEL_FOLDER
    t0 = time.perf_counter()
    man15 = compress_model_folder(dense15, comp15, config, progress=True)
    man15["compress_wall_s"] = time.perf_counter() - t0
    return {"ts3mm": {"dense": work / "ts3mm_dense", "compressed": work / "ts3mm_compressed", "manifest": man3},
            "ts15": {"dense": dense15, "compressed": comp15, "manifest": man15}}


# ------------------------------------------------------------------ one timed CLI run

def package_said(lines) -> list[str]:
    """The package's own log lines (which inference path ran); a progress bar may share the line."""
    return sorted({s[s.index(PACKAGE_LOG_PREFIX):].strip() for s in lines if PACKAGE_LOG_PREFIX in s})


def run_timed(script: str, args: list, env: dict, log_dir: Path, tag: str) -> dict:
    """One CLI run in a child process: wall time, peak RSS of the process tree, forward log, output lines."""
    log_dir.mkdir(parents=True, exist_ok=True)
    forwards_json = log_dir / f"{tag}.forwards.json"
    cmd = [sys.executable, str(HERE / "timed_cli.py"), str(forwards_json), script, *map(str, args)]
    t_start = time.time()
    proc = subprocess.Popen(cmd, env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = [(time.time() - t_start, line.rstrip("\n")) for line in proc.stdout]
    proc.wait()
    t_end = time.time()
    (log_dir / f"{tag}.log").write_text("".join(f"{t:7.2f} {s}\n" for t, s in lines))
    if proc.returncode != 0:
        tail = "\n".join(s for _, s in lines[-15:])
        raise RuntimeError(f"{script} failed (exit {proc.returncode}):\n{tail}")
    record = json.loads(forwards_json.read_text())
    calls = record["calls"]
    wall = t_end - t_start
    fwd = [e - s for s, e in calls]
    parts = {"before_first_forward_s": (calls[0][0] - t_start) if calls else wall,
             "forwards_s": sum(fwd),
             "between_forwards_s": (calls[-1][1] - calls[0][0] - sum(fwd)) if calls else 0.0,
             "after_last_forward_s": (t_end - calls[-1][1]) if calls else 0.0}
    stages = [{"stage": m.group(1), "s": float(m.group(2))} for _, s in lines if (m := STAGE_LINE.match(s))]
    package_lines = package_said(s for _, s in lines)
    return {"wall_s": wall, "peak_rss_mb": record["peak_rss_mb"], "workers_peak_rss_mb": record["workers_peak_rss_mb"],
            "n_forwards": len(fwd),
            "forward_median_s": statistics.median(fwd) if fwd else None, **parts, "stages": stages,
            "package_log": package_lines}


# ------------------------------------------------------------------ scenarios

def scenario_totalsegmentator(models: dict, work: Path, repeats: int, warmup: int) -> dict:
    from nnunet_green.testing.totalseg import offline_env

    out = work / "out_ts"
    runs, n = {}, {"dense": 0, "compressed": 0}

    def make(kind):
        def run():
            n[kind] += 1
            seg = out / f"{kind}_{n[kind]}.nii.gz"
            env = offline_env(models[kind], work / "ts_home")
            r = run_timed("TotalSegmentator", ["-i", CT_3MM, "-o", seg, "--fast", "--ml", "-d", "cpu",
                                               "-nr", 1, "-ns", 1], env, work / "logs", f"ts_{kind}_{n[kind]}")
            r["output"] = str(seg)
            runs.setdefault(kind, []).append(r)
            log(f"  TotalSegmentator --fast, {kind}: {r['wall_s']:.1f} s wall, {r['n_forwards']} forwards "
                f"{r['forwards_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
            return r["wall_s"]
        return run

    log(f"(a) TotalSegmentator --fast on {CT_3MM.name}: {warmup} warm-up + {repeats} interleaved rounds")
    interleaved({"dense": make("dense"), "compressed": make("compressed")}, repeats, warmup)
    timed = {k: v[warmup:] for k, v in runs.items()}
    seg = {k: read_seg(Path(v[-1]["output"])) for k, v in timed.items()}
    return summarize(timed, {"example_ct": agreement(seg["dense"], seg["compressed"])},
                     command=f"TotalSegmentator -i {CT_3MM} -o SEG --fast --ml -d cpu -nr 1 -ns 1")


def scenario_predict(models: dict, work: Path, images: Path, repeats: int, warmup: int) -> dict:
    out = work / "out_predict"
    runs, n = {}, {"dense": 0, "compressed": 0}

    def make(kind):
        def run():
            n[kind] += 1
            pred = out / f"{kind}_{n[kind]}"
            r = run_timed("nnUNetv2_predict_from_modelfolder",
                          ["-i", images, "-o", pred, "-m", models[kind], "-f", 0, "-device", "cpu", "-npp", 1,
                           "-nps", 1], os.environ.copy(), work / "logs", f"predict_{kind}_{n[kind]}")
            r["output"] = str(pred)
            runs.setdefault(kind, []).append(r)
            log(f"  nnUNetv2_predict_from_modelfolder, {kind}: {r['wall_s']:.1f} s wall, {r['n_forwards']} forwards "
                f"{r['forwards_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
            return r["wall_s"]
        return run

    log(f"(b) nnUNetv2_predict_from_modelfolder on {len(CTS_1_5MM)} 1.5 mm CTs: {warmup} warm-up + {repeats} "
        "interleaved rounds")
    interleaved({"dense": make("dense"), "compressed": make("compressed")}, repeats, warmup)
    timed = {k: v[warmup:] for k, v in runs.items()}
    agree = {case: agreement(read_seg(Path(timed["dense"][-1]["output"]) / f"{case}.nii.gz"),
                             read_seg(Path(timed["compressed"][-1]["output"]) / f"{case}.nii.gz"))
             for case in CTS_1_5MM}
    return summarize(timed, agree, command="nnUNetv2_predict_from_modelfolder -i IMAGES -o OUT -m FOLDER -f 0 "
                                           "-device cpu -npp 1 -nps 1")


def check_parts(compressed_folder: Path, images: Path, work: Path) -> dict:
    """Stock nnUNetv2_predict over the compressed folder in two parts (as two SLURM array tasks would run it)."""
    results = compressed_folder.parent.parent
    dataset, (trainer, plans, conf) = compressed_folder.parent.name, compressed_folder.name.split("__")
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(work / "raw"),
               nnUNet_preprocessed=str(work / "preprocessed"))
    out = work / "out_parts"
    walls, said = [], []
    for part in (0, 1):
        log(f"  nnUNetv2_predict -num_parts 2 -part_id {part} on the compressed folder")
        cmd = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", dataset, "-tr", trainer, "-p", plans,
               "-c", conf, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "-num_parts", "2",
               "-part_id", str(part)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"nnUNetv2_predict part {part} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
        said.append(package_said((proc.stdout + proc.stderr).splitlines()))
    written = sorted(p.name[:-len(".nii.gz")] for p in out.glob("*.nii.gz"))
    ok = written == sorted(CTS_1_5MM)
    return {"command": " ".join(cmd[:-1]) + " {0,1}", "wall_s": walls, "cases_written": written,
            "all_cases_once": ok, "package_log": said}


# ------------------------------------------------------------------ summaries

def read_seg(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    fg = (a > 0) | (b > 0)
    return {"voxel_agreement": float((a == b).mean()),
            "foreground_agreement": float((a[fg] == b[fg]).mean()) if fg.any() else None,
            "labels_dense": int(len(np.unique(a))), "labels_compressed": int(len(np.unique(b)))}


def summarize(runs: dict, agree: dict, command: str) -> dict:
    def med(kind, key):
        return statistics.median(r[key] for r in runs[kind])

    d, c = [r["wall_s"] for r in runs["dense"]], [r["wall_s"] for r in runs["compressed"]]
    paired = [a / b for a, b in zip(d, c)]
    keys = ("wall_s", "before_first_forward_s", "forwards_s", "between_forwards_s", "after_last_forward_s",
            "peak_rss_mb", "workers_peak_rss_mb")
    return {"command": command, "runs": runs,
            "median": {k: {key: med(k, key) for key in keys} for k in runs},
            "speedup": statistics.median(d) / statistics.median(c), "speedup_paired_min": min(paired),
            "speedup_paired_max": max(paired),
            "peak_rss_ratio": med("compressed", "peak_rss_mb") / med("dense", "peak_rss_mb"),
            "agreement": agree}


PARTS = (("before_first_forward_s", "before the first forward (start, imports, model load, preprocessing)"),
         ("forwards_s", "network forwards"), ("between_forwards_s", "between forwards"),
         ("after_last_forward_s", "after the last forward (resampling back, export, post-processing)"))


def markdown(result: dict) -> str:
    m = result["machine"]
    exact = ("; every spatial kernel projected to multilinear rank <= 8, so the factorization is exact"
             if result["weights"] == "low-rank" else "")
    L = ["# End to end on CPU: real CLIs, dense vs compressed folder", "",
         f"- Command: `{result['command']}`", f"- Date: {result['date']}",
         f"- Machine: {result['machine_label']} - {m['cpu']}, {m['cpu_count']} logical CPUs, torch {m['torch']}, "
         f"nnU-Net {m['nnunetv2']}; load average at start {m['load_avg'][0]:.1f}, end {result['load_avg_end'][0]:.1f}",
         f"- Weights: random (seed 0){exact}, "
         f"rank ratio {result['rank_ratio']}. Runs: {result['warmup']} warm-up + {result['repeats']} interleaved "
         "rounds (dense, compressed, then the other order); medians of the timed rounds.", ""]
    for key, title in (("totalsegmentator", "(a) TotalSegmentator --fast, TS-3mm-shaped weights root, example_ct "
                                            "(122x101x112, 3 mm)"),
                       ("predict", "(b) nnUNetv2_predict_from_modelfolder, TS-1.5mm-shaped folder, two 1.5 mm CTs "
                                   "(122x102x112 and 120x126x164)")):
        if key not in result:
            continue
        s = result[key]
        man = result["compression"][key]
        L += [f"## {title}", "", f"`{s['command']}`", "",
              f"Compression: {man['params_before'] / 1e6:.2f} M -> {man['params_after'] / 1e6:.2f} M parameters, "
              f"multiply-adds / {man['macs_before'] / man['macs_after']:.2f} at the plans' patch; fast path in "
              f"compression.json: {json.dumps(man['fast_path']) if man['fast_path'] else 'none'}.", "",
              "| | dense | compressed | dense / compressed |", "|---|---|---|---|"]
        md, mc = s["median"]["dense"], s["median"]["compressed"]
        L.append(f"| wall time (median) | {md['wall_s']:.1f} s | {mc['wall_s']:.1f} s | **{s['speedup']:.2f}x** "
                 f"(paired {s['speedup_paired_min']:.2f} - {s['speedup_paired_max']:.2f}) |")
        for k, label in PARTS:
            ratio = f"{md[k] / mc[k]:.2f}x" if mc[k] > 0.05 else "-"
            L.append(f"| {label} | {md[k]:.1f} s ({md[k] / md['wall_s']:.0%}) | {mc[k]:.1f} s "
                     f"({mc[k] / mc['wall_s']:.0%}) | {ratio} |")
        L.append(f"| peak RSS of the CLI process (runs the network; median) | {md['peak_rss_mb']:.0f} MB "
                 f"| {mc['peak_rss_mb']:.0f} MB | {1 / s['peak_rss_ratio']:.2f}x |")
        L.append(f"| largest peak RSS of its worker processes (median) | {md['workers_peak_rss_mb']:.0f} MB "
                 f"| {mc['workers_peak_rss_mb']:.0f} MB | |")
        r0 = s["runs"]["dense"][0]
        L += ["", f"Forwards per run: {r0['n_forwards']}; median forward dense "
                  f"{statistics.median(r['forward_median_s'] for r in s['runs']['dense']):.2f} s, compressed "
                  f"{statistics.median(r['forward_median_s'] for r in s['runs']['compressed']):.2f} s."]
        for kind in ("dense", "compressed"):
            said = s["runs"][kind][-1]["package_log"]
            if said:
                L.append(f"The package said ({kind}, last run): " + " / ".join(f"`{x}`" for x in said) + ".")
            st = s["runs"][kind][-1]["stages"]
            if st:
                L.append(f"TotalSegmentator's own stage times ({kind}, last run): "
                         + ", ".join(f"{x['stage']} {x['s']:.1f} s" for x in st) + ".")
        L += ["", "| case | voxel agreement | foreground agreement | labels dense / compressed |", "|---|---|---|---|"]
        for case, a in s["agreement"].items():
            fg = "-" if a["foreground_agreement"] is None else f"{a['foreground_agreement']:.4f}"
            L.append(f"| {case} | {a['voxel_agreement']:.4f} | {fg} | {a['labels_dense']} / {a['labels_compressed']} |")
        L.append("")
    if result.get("parts"):
        p = result["parts"]
        L += ["## Split prediction (stock nnUNetv2_predict -num_parts 2)", "", f"`{p['command']}`", "",
              f"Parts ran one after the other ({', '.join(f'{w:.1f} s' for w in p['wall_s'])}); cases written: "
              f"{', '.join(p['cases_written'])} - every case exactly once: {'yes' if p['all_cases_once'] else '**no**'}.",
              ""]
        for part, lines in enumerate(p["package_log"]):
            L.append(f"- part {part}: " + (" / ".join(f"`{x}`" for x in lines) or "the package said nothing"))
        L.append("")
    L += ["## Targets", "", "| target | value | met |", "|---|---|---|"]
    for t in result["targets"]:
        L.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(L) + "\n"


def targets(result: dict) -> list[dict]:
    rows = []
    for key, name in (("totalsegmentator", "TotalSegmentator --fast"), ("predict", "nnUNetv2_predict_from_modelfolder")):
        if key not in result:
            continue
        s = result[key]
        rows.append({"target": f"{name}: compressed >= {TARGETS['speedup']}x faster (wall)",
                     "value": f"{s['speedup']:.2f}x", "met": s["speedup"] >= TARGETS["speedup"]})
        rows.append({"target": f"{name}: peak RSS compressed <= dense",
                     "value": f"{s['median']['compressed']['peak_rss_mb']:.0f} MB vs "
                              f"{s['median']['dense']['peak_rss_mb']:.0f} MB", "met": s["peak_rss_ratio"] <= 1.0})
    if result.get("parts"):
        rows.append({"target": "nnUNetv2_predict -num_parts 2: every case written once",
                     "value": ", ".join(result["parts"]["cases_written"]), "met": result["parts"]["all_cases_once"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help="writes end_to_end_cpu.json and end_to_end_cpu.md here")
    ap.add_argument("--ratio", type=float, default=0.12, help="rank ratio of the compressed models")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds (one dense and one compressed run each)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed rounds first")
    ap.add_argument("--weights", choices=("low-rank", "random"), default="low-rank",
                    help="random weights projected to multilinear rank 8 (exact factorization; default) or plain")
    ap.add_argument("--only", choices=("totalsegmentator", "predict"), default=None, help="run one scenario only")
    ap.add_argument("--parts", action="store_true", help="also predict with stock nnUNetv2_predict -num_parts 2 "
                                                          "(two parts, one after the other) and check the cases")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary folder, removed afterwards)")
    ap.add_argument("--machine-label", default="2-core CPU dev machine, no GPU, shared with other jobs")
    args = ap.parse_args(argv)
    for p in (CT_3MM, *CTS_1_5MM.values()):
        if not p.is_file():
            print(f"end_to_end_cpu: {p} not found (set NNUNET_GREEN_DATA to the shared data folder)", file=sys.stderr)
            return 2

    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    result = {"command": " ".join(shlex.quote(a) for a in [exe, *sys.argv]),
              "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine_label": args.machine_label, "machine": machine_info("cpu"), "args": vars(args),
              "weights": args.weights, "rank_ratio": args.ratio, "repeats": args.repeats, "warmup": args.warmup}
    work_ctx = tempfile.TemporaryDirectory(prefix="bench_e2e_") if args.work is None else None
    work = Path(args.work or work_ctx.name).absolute()
    work.mkdir(parents=True, exist_ok=True)
    try:
        models = make_models(work / "models", args.ratio, args.weights)
        result["compression"] = {}
        for key, m in (("totalsegmentator", models["ts3mm"]), ("predict", models["ts15"])):
            result["compression"][key] = {**m["manifest"]["totals"], "compress_wall_s": m["manifest"]["compress_wall_s"],
                                          "fast_path": m["manifest"].get("fast_path")}
        images = work / "images_1.5mm"
        images.mkdir(exist_ok=True)
        for case, path in CTS_1_5MM.items():
            link = images / f"{case}_0000.nii.gz"
            if not link.exists():
                link.symlink_to(path)
        if args.only in (None, "totalsegmentator"):
            result["totalsegmentator"] = scenario_totalsegmentator(models["ts3mm"], work, args.repeats, args.warmup)
        if args.only in (None, "predict"):
            result["predict"] = scenario_predict(models["ts15"], work, images, args.repeats, args.warmup)
        if args.parts:
            result["parts"] = check_parts(models["ts15"]["compressed"], images, work)
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()
    result["load_avg_end"] = list(os.getloadavg())
    result["targets"] = targets(result)
    write_result(Path(args.out), "end_to_end_cpu", result, markdown(result))
    for row in result["targets"]:
        log(f"  {'MET ' if row['met'] else 'MISS'} {row['target']}: {row['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
