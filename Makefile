# nnunet-green. `make demo` runs the whole product end to end; `make test` runs the tests (CI runs exactly that).
VENV ?= .venv
PY := $(VENV)/bin/python
# Real data; tests and benchmarks that need it read this path (CI has ../shared beside the clone).
NNUNET_GREEN_DATA ?= $(abspath ../shared/data)
export NNUNET_GREEN_DATA

.PHONY: install test bench bench-e2e bench-gpu-inference bench-recovery bench-calibration bench-gpu-training bench-stopping bench-stopping-long bench-light demo clean

install: $(VENV)/.installed

# torch/torchvision first and pinned: this pair imports cleanly with nnU-Net's timm/torchvision chain
# (see docs/design.md). The editable install also places nnunet_green.pth (added to the editable wheel by the
# in-tree build backend, _build_backend/) so the stock CLIs find the trainers.
$(VENV)/.installed: setup.cfg setup.py pyproject.toml nnunet_green.pth _build_backend/nnunet_green_build.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q --durations=20 tests

# Benchmarks write JSON + markdown into bench_out/; docs/results/ holds copies of recorded runs.
# compression_cpu: TS-1.5mm forward at 128^3, dense / dense ONNX Runtime / compressed, 2 and 1 threads, one
# interleaved run (7-11 min on the shared 2-core CPU, 1.7-2.5 min of it compressing).
bench: install
	$(PY) benchmarks/compression_cpu.py --out bench_out
	$(PY) benchmarks/compression_accuracy.py --out bench_out

# End to end: real TotalSegmentator --fast and nnUNetv2_predict_from_modelfolder, dense vs compressed folder, on the
# real CTs in $(NNUNET_GREEN_DATA)/totalsegmentator_example; wall time, peak memory, where the time goes.
bench-e2e: install
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) benchmarks/end_to_end_cpu.py --out bench_out

# Dense vs compressed TS-1.5mm forward on one CUDA GPU, fp32 and AMP fp16 (exits 2 without CUDA).
bench-gpu-inference: install
	$(PY) benchmarks/gpu_inference.py -o bench_out/gpu_inference

# Accuracy recovery evidence (docs/results/recovery.md): trains a dense Hippocampus model, then compresses, distils,
# fine-tunes and scores (also at an equal multiply-add budget); then the TotalSegmentator-shaped model.
# About 3.5 h on a 2-core CPU.
bench-recovery: install
	nnUNet_n_proc_DA=1 $(PY) benchmarks/recovery.py --data $(NNUNET_GREEN_DATA)/Task04_Hippocampus --n-train 60 --n-test 20 \
	    --epochs 12 --iters 75 --ratios 0.05 0.12 0.25 0.5 --distill-ratios 0.12 --finetune-ratios 0.12 \
	    --finetune-epochs 3 --finetune-iters 50 --steps 300 --lr 1e-3 -o bench_out
	$(PY) benchmarks/recovery.py --data $(NNUNET_GREEN_DATA)/Task04_Hippocampus --n-train 60 --n-test 20 \
	    --ratios 0.05 0.12 0.25 0.5 --modes uniform budgeted-macs --distill-ratios --finetune-ratios -o bench_out/recovery_macs
	$(PY) benchmarks/recovery_totalsegmentator.py --fit-steps 400 --fit-minutes 30 \
	    --distill-steps 300 --distill-minutes 10 -o bench_out

# Data-aware (calibrated) vs weight-only decomposition (docs/results/calibration.md): the Hippocampus sweep
# (uniform / budgeted params / budgeted MACs, each weight-only, calibrated and calibrated + sequential refit;
# distillation at 0.12) on the dense model of bench-recovery's work folder (trained first if absent), then the
# calibration cost on the TS-1.5mm architecture.
bench-calibration: install
	$(PY) benchmarks/calibration.py sweep --data $(NNUNET_GREEN_DATA)/Task04_Hippocampus --n-train 60 --n-test 20 \
	    --epochs 12 --iters 75 --ratios 0.05 0.12 0.25 0.5 --distill-ratios 0.12 --finetune-ratios 0.12 \
	    --sequential --steps 300 -o bench_out
	$(PY) benchmarks/calibration.py cost --patches 8 --size 128 -o bench_out

# Green trainers on one GPU (docs/benchmarks.md): 6 trainers x 2 epochs x 25 iterations on Hippocampus + the loader
# table, bounded by --max-minutes (default 9, one 10-minute device call); exits 2 without CUDA.
bench-gpu-training: install
	$(PY) benchmarks/gpu_training.py -o bench_out/gpu_training

# Full schedule vs plateau stop (with its cool-down), same seed (docs/benchmarks.md): 45 min on a quiet 2-core CPU.
bench-stopping: install
	$(PY) benchmarks/stopping.py -o bench_out/stopping

# The same at 200 epochs: patience 5, then patience 10 against the same full run, then
# patience 10 with seed 1 (its own full run): ~2.5 h on 2 cores.
bench-stopping-long: install
	$(PY) benchmarks/stopping.py --epochs 200 --work work/stopping200 -o bench_out/stopping200
	$(PY) benchmarks/stopping.py --epochs 200 --work work/stopping200 --patience 10 \
	    --full-from bench_out/stopping200/stopping.json -o bench_out/stopping200_p10
	$(PY) benchmarks/stopping.py --epochs 200 --seed 1 --patience 10 --work work/stopping200_s1 \
	    -o bench_out/stopping200_s1_p10

# Light plans vs default plans at equal epochs on Hippocampus, then both compressed (docs/benchmarks.md). Reuses the
# data and, when it exists, the full-schedule run of bench-stopping (same settings); ~15 min after it, ~35 alone.
bench-light: install
	$(PY) benchmarks/light_plans.py -o bench_out/light_plans \
	    $(if $(wildcard work/stopping/runs/full/fold_0/green_summary.json),--baseline-run work/stopping/runs/full,)

demo: install
	$(PY) -m nnunet_green.demo --out demo_out $(if $(DATA),--data $(DATA),)

clean:
	rm -rf bench_out demo_out work
