"""`make demo`: the whole product on one small dataset, with the stock nnU-Net CLIs doing the work.

data subset (or synthetic) → nnUNetv2_plan_and_preprocess → nnUNetv2_train (fp32 + green settings) →
nnunet-green-compress → stock predictor on held-out cases (dense vs compressed; Dice and agreement) →
nnunet-green-report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunet_green.demo.data import msd_subset, synthetic_msd_task
from nnunet_green.contract import BENCH_FILE, DATASET_FILE, DEFAULT_PLANS, LIGHT_PLANS

MARKER = ".nnunet-green-demo"
# On a CPU the precision part of a setting is a GPU feature (it falls back to fp32), so the CPU default shows the
# levers that save there too: a lighter planned network (the baseline trainer again, on nnUNetPlansGreenLight) and
# an 8-bit optimizer (memory); on a GPU the study's precision settings.
CPU_TRAINERS = ("nnUNetTrainerGreenFP32", "nnUNetTrainerGreen8bit")
GPU_TRAINERS = ("nnUNetTrainerGreenFP32", "nnUNetTrainerGreenAMP8bit", "nnUNetTrainerGreenHalf8bit")
# Lines of nnU-Net's training output worth showing live; everything goes to the step's log file.
SHOWN = re.compile(r"^\S+ \S+: (Epoch \d+|Epoch time|Pseudo dice|Mean Validation Dice|nnunet-green:)")
BIN = Path(sys.executable).parent
# Run lengths. The synthetic default is sized to finish within 10 minutes on 2 CPU cores
# (docs/results/demo_synthetic/);
# the real-data run is the longer one recorded in docs/results/demo_hippocampus/.
SYNTHETIC_RUN = {"n_train": 10, "n_test": 3, "epochs": 3, "iters": 25, "val_iters": 2}
DATA_RUN = {"n_train": 20, "n_test": 5, "epochs": 4, "iters": 40, "val_iters": 3}
# Wall time of the defaults on the 2-core CPU machine, printed at the start (minutes; see docs/results/).
EXPECTED_MIN = {"synthetic": 7, "data": 14}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nnunet_green.demo",
        description="End-to-end nnunet-green demo: plan, train fp32 and green settings, compress, predict held-out "
                    "cases with the dense and compressed model, and write the comparison report.",
        epilog="Example: python -m nnunet_green.demo --data ../shared/data/Task04_Hippocampus --out demo_out")
    p.add_argument("--out", default="demo_out", type=Path,
                   help="output folder; an earlier demo output there is deleted first (default: demo_out)")
    p.add_argument("--data", type=Path, default=None,
                   help="MSD-layout task folder (e.g. Task04_Hippocampus); default: a small SYNTHETIC dataset")
    p.add_argument("--n-train", type=int, default=None,
                   help=f"training cases (default {SYNTHETIC_RUN['n_train']} synthetic, "
                        f"{DATA_RUN['n_train']} from --data)")
    p.add_argument("--n-test", type=int, default=None,
                   help=f"held-out cases, scored against their labels (default {SYNTHETIC_RUN['n_test']} synthetic, "
                        f"{DATA_RUN['n_test']} from --data)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per training run (default {SYNTHETIC_RUN['epochs']} synthetic, "
                        f"{DATA_RUN['epochs']} with --data)")
    p.add_argument("--iters", type=int, default=None,
                   help=f"training iterations per epoch (default {SYNTHETIC_RUN['iters']} synthetic, "
                        f"{DATA_RUN['iters']} with --data)")
    p.add_argument("--val-iters", type=int, default=None,
                   help=f"online validation iterations per epoch (default {SYNTHETIC_RUN['val_iters']} synthetic, "
                        f"{DATA_RUN['val_iters']} with --data)")
    p.add_argument("--trainers", nargs="+", default=None,
                   help=f"trainers to compare, first is the baseline (default on CPU: {' '.join(CPU_TRAINERS)}; "
                        f"on GPU: {' '.join(GPU_TRAINERS)})")
    p.add_argument("--no-light-plans", dest="light_plans", action="store_false",
                   help=f"skip the extra run of the first trainer on the lighter planned network ({LIGHT_PLANS})")
    p.add_argument("--rank-ratio", type=float, default=0.12, help="Tucker rank ratio for the compressed model")
    p.add_argument("--distill-steps", type=int, default=60,
                   help="label-free distillation steps on the training images before the compressed folder is "
                        "published (0: compress zero-shot; default 60, about a minute on 2 CPU cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    args = p.parse_args(argv)
    for name, value in (DATA_RUN if args.data is not None else SYNTHETIC_RUN).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.distill_steps < 0:
        p.error("--distill-steps must be at least 0")
    for name in ("n_train", "n_test", "epochs", "iters", "val_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.n_train < 5:
        p.error("--n-train must be at least 5 (nnU-Net's fold 0 of a 5-fold split)")
    if args.data is not None and not (args.data / DATASET_FILE).is_file():
        p.error(f"--data {args.data}: not an MSD task folder (no dataset.json)")
    if not 0 < args.rank_ratio <= 1:
        p.error("--rank-ratio must be in (0, 1]")
    return args


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = args.out.resolve()
        self.device = args.device or _default_device()
        self.trainers = args.trainers or (GPU_TRAINERS if self.device == "cuda" else CPU_TRAINERS)
        self.raw, self.preprocessed, self.results = (self.out / n for n in
                                                     ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        self.logs = self.out / "logs"
        self.timings: dict[str, float] = {}
        self.step_no = 0

    # --- plumbing ----------------------------------------------------------------------------------------------
    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                   nnUNet_results=str(self.results), PYTHONUNBUFFERED="1")
        # nnU-Net's final validation starts this many worker processes; on 2 cores one is faster (NOTES: 49 s vs
        # 126 s for a one-epoch run, most of it the pool's start-up)
        cores = os.cpu_count() or 1
        env.setdefault("nnUNet_def_n_proc", str(1 if cores <= 2 else min(4, cores)))
        if self.device == "cpu":
            env.setdefault("nnUNet_n_proc_DA", str(min(4, os.cpu_count() or 1)))
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def step(self, title: str):
        self.step_no += 1
        print(f"\n[{self.step_no}/6] {title}", flush=True)

    def run(self, name: str, *cmd, env=None, show=None):
        """Run a stock CLI; its full output goes to logs/<name>.log, selected lines to the console."""
        log = self.logs / f"{name}.log"
        t0 = time.perf_counter()
        command = [str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0], *map(str, cmd[1:])]
        with open(log, "w", buffering=1) as f:  # line-buffered: the log can be followed while it runs
            f.write("$ " + " ".join(command) + "\n")
            proc = subprocess.Popen(command, env=env or self.env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                f.write(line)
                if show is not None and show.search(line):
                    print("      " + line.split(": ", 1)[-1].rstrip(), flush=True)
            proc.wait()
        seconds = time.perf_counter() - t0
        self.timings[name] = seconds
        if proc.returncode != 0:
            tail = log.read_text().splitlines()[-25:]
            raise SystemExit(f"demo: {cmd[0]} failed (exit {proc.returncode}); last lines of {log}:\n"
                             + "\n".join(tail))
        print(f"    {name}: done in {seconds:.0f} s (log: {log.relative_to(self.out.parent)})", flush=True)

    # --- steps -------------------------------------------------------------------------------------------------
    def prepare_output(self):
        if self.out.exists():
            if not (self.out / MARKER).is_file() and any(self.out.iterdir()):
                raise SystemExit(f"demo: {self.out} exists and is not a demo output; choose another --out")
            shutil.rmtree(self.out)  # never mix results of an earlier run into this one
        self.logs.mkdir(parents=True)
        (self.out / MARKER).write_text("created by python -m nnunet_green.demo; deleted and rebuilt on every run\n")

    def dataset(self) -> tuple[int, str, Path]:
        self.step("dataset")
        source = self.out / "msd"
        if self.args.data is None:
            task = synthetic_msd_task(source, n_train=self.args.n_train, n_test=self.args.n_test)
            print(f"    SYNTHETIC dataset ({self.args.n_train} training + {self.args.n_test} held-out cases of "
                  f"random ellipsoids): it exercises the pipeline, its numbers say nothing about anatomy")
        else:
            task = msd_subset(self.args.data, source, self.args.n_train, self.args.n_test)
            print(f"    {self.args.data}: {self.args.n_train} training + {self.args.n_test} held-out cases")
        match = re.match(r"Task(\d+)_(.+)", task.name)
        if not match:
            raise SystemExit(f"demo: {task.name}: MSD task folders are named TaskNN_Name")
        dataset_id = int(match.group(1))
        self.run("convert", "nnUNetv2_convert_MSD_dataset", "-i", task, "-np", 1)
        return dataset_id, f"Dataset{dataset_id:03d}_{match.group(2)}", task / "labelsTs"

    def plan(self, dataset_id: int):
        self.step("nnUNetv2_plan_and_preprocess" + (" + nnunet-green-plan" if self.args.light_plans else ""))
        self.run("plan_and_preprocess", "nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres",
                 "-npfp", 1, "-np", 2)
        if self.args.light_plans:  # shares nnUNetPlans' preprocessed data: nothing to preprocess again
            self.run("plan_light", "nnunet-green-plan", "-d", dataset_id, "-c", "3d_fullres")

    def runs(self) -> list[tuple[str, str]]:
        """(trainer, plans) of every training run; the first is the baseline that gets compressed."""
        runs = [(trainer, DEFAULT_PLANS) for trainer in self.trainers]
        if self.args.light_plans:
            runs.insert(1, (self.trainers[0], LIGHT_PLANS))
        return runs

    def train(self, dataset_id: int, dataset_name: str) -> list[Path]:
        runs = self.runs()
        names = [t if p == DEFAULT_PLANS else f"{t} -p {p}" for t, p in runs]
        self.step(f"nnUNetv2_train: {', '.join(names)} "
                  f"({self.args.epochs} epochs x {self.args.iters} iterations, {self.device})")
        if self.device == "cpu":
            print("    on a CPU, precision settings (AMP, bf16, half weights) are GPU features and run as fp32; the "
                  "levers that save here are the lighter network and, for memory, the 8-bit optimizer state")
        # even 20 epochs of the synthetic default end with the EMA still rising (docs/results/demo_synthetic/)
        print("    stopping at a plateau (nnUNet_green_patience) saves on a CPU too, but nnU-Net's EMA pseudo-Dice "
              "needs tens of epochs to settle, so runs this short train their whole schedule; measured savings: "
              "docs/results/stopping.md")
        env = self.env(nnUNet_green_epochs=self.args.epochs, nnUNet_green_iters=self.args.iters,
                       nnUNet_green_val_iters=self.args.val_iters)
        folders = []
        for (trainer, plans), name in zip(runs, names):
            print(f"    {name}", flush=True)
            self.run(f"train_{trainer}_{plans}", "nnUNetv2_train", dataset_id, "3d_fullres", 0, "-tr", trainer,
                     "-p", plans, "-device", self.device, env=env, show=SHOWN)
            folders.append(self.results / dataset_name / f"{trainer}__{plans}__3d_fullres")
        return folders

    def compress(self, dense: Path, images: Path) -> Path:
        steps = self.args.distill_steps
        recovery = ["--distill", images, "--distill-steps", steps, "--distill-minutes", 2,
                    "--device", self.device] if steps else []
        self.step(f"nnunet-green-compress --rank-ratio {self.args.rank_ratio}"
                  + (f" --distill ({steps} label-free steps, factors calibrated on the same images)" if steps else "") + f" ({dense.name})")
        target = self.out / "compressed" / dense.name
        self.run("compress", "nnunet-green-compress", "-i", dense, "-o", target,
                 "--rank-ratio", self.args.rank_ratio, *recovery, "-q")
        return target

    def predict(self, dense: Path, compressed: Path, labels: Path, dataset_name: str) -> Path:
        self.step("stock nnU-Net predictor on the held-out cases: dense vs compressed (Dice vs labels, agreement; "
                  "test-time mirroring off to keep the demo short)")
        bench = self.out / "bench"
        self.run("predict_and_bench", "nnunet-green-bench", dense, compressed, "-o", bench,
                 "--images", self.raw / dataset_name / "imagesTs", "--labels", labels,
                 "--device", self.device, "--repeats", 3, "-f", 0, "--disable-tta")
        return bench / BENCH_FILE

    def report(self, inputs: list[Path]) -> Path:
        self.step("nnunet-green-report")
        target = self.out / "report"
        self.run("report", "nnunet-green-report", *inputs, "-o", target, "--title",
                 "nnunet-green demo" + (" (SYNTHETIC data)" if self.args.data is None else f": {self.args.data.name}"))
        return target

    def announce(self):
        defaults = DATA_RUN if self.args.data is not None else SYNTHETIC_RUN
        if self.device == "cpu" and all(getattr(self.args, k) == v for k, v in defaults.items()) \
                and self.args.trainers is None:
            minutes = EXPECTED_MIN["data" if self.args.data is not None else "synthetic"]
            print(f"nnunet-green demo: expected duration about {minutes} min on 2 CPU cores "
                  f"(less with more cores or a GPU)", flush=True)
        else:
            print("nnunet-green demo: non-default run length; the default run takes about "
                  f"{EXPECTED_MIN['synthetic']} min (synthetic) or {EXPECTED_MIN['data']} min (--data) on 2 CPU cores",
                  flush=True)

    def __call__(self) -> Path:
        t0 = time.perf_counter()
        self.announce()
        self.prepare_output()
        dataset_id, dataset_name, labels = self.dataset()
        self.plan(dataset_id)
        models = self.train(dataset_id, dataset_name)
        compressed = self.compress(models[0], self.raw / dataset_name / "imagesTr")
        bench = self.predict(models[0], compressed, labels, dataset_name)
        report = self.report([*models, compressed, bench])
        total = time.perf_counter() - t0
        (self.out / "demo.json").write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
            "device": self.device, "trainers": list(self.trainers), "runs": [list(r) for r in self.runs()],
            "timings_s": self.timings, "total_s": total,
        }, indent=2))
        _print_outcome(bench)
        print(f"\nDemo finished in {total / 60:.1f} min. Report: {report / 'report.html'} (and report.md)")
        return report


def _print_outcome(bench_json: Path):
    bench = json.loads(bench_json.read_text())
    print(f"\n    {'model':60s}   params    latency   Dice vs labels   agreement")
    for m in bench["models"]:
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        print(f"    {m['name'][-60:]:60s} {m['params'] / 1e6:7.2f} M {m['latency_s']['median']:8.3f} s "
              f"{fmt(m.get('dice_vs_labels'), '14.3f')}   {fmt(m.get('agreement_dice'), '.3f')}")


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    Demo(parse_args(argv))()
    return 0
