"""Drop-in test with the REAL TotalSegmentator CLI: a TotalSegmentator-shaped weights root (the `--fast` 3 mm model,
Dataset297, old-format plans as TS v2 ships them) is compressed with `nnunet-green-compress` in weights-root mode,
and `TotalSegmentator --fast` runs on the real example CT with TOTALSEG_WEIGHTS_PATH pointing at the result.

The real Dataset297 weights (~165 MB, a download) are not available offline, so the checkpoint holds random weights
of a smaller PlainConvUNet (fewer features/stages, same format and 118 outputs) to keep the CPU time low.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import TOTALSEG_EXAMPLE, requires, run_cli, strip_fast_path_artefact

pytest.importorskip("totalsegmentator")

from nnunet_green.testing.totalseg import (MODEL_FOLDER, TASK_FOLDER, build_network, offline_env,  # noqa: E402
                                           project_to_low_rank_, ts_dataset_json, ts_old_format_plans,
                                           write_model_folder)

CT = TOTALSEG_EXAMPLE / "example_ct_sm.nii.gz"


def build_ts_weights_root(root, seed=0, low_rank=8):
    plans, dataset = ts_old_format_plans(), ts_dataset_json()
    torch.manual_seed(seed)
    net = build_network(plans, dataset)
    if low_rank:
        project_to_low_rank_(net, low_rank)
    write_model_folder(root, plans, dataset, net.state_dict())
    return root


def _edit_one_weight(checkpoint):
    """A hand edit after compression: the artefact no longer matches the weights."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weight = next(v for k, v in ck["network_weights"].items() if k.endswith(".weight") and v.is_floating_point())
    weight.view(-1)[0] *= 1 + 1e-6
    torch.save(ck, checkpoint)


def run_totalsegmentator(weights, home, out_file):
    env = dict(offline_env(weights, home), OMP_NUM_THREADS="2")
    return run_cli("TotalSegmentator", "-i", CT, "-o", out_file, "--fast", "--ml", "-d", "cpu", "-nr", 1, "-ns", 1,
                   env=env, timeout=600)


@requires(TOTALSEG_EXAMPLE)
def test_totalsegmentator_runs_compressed_weights_root(tmp_path):
    import nibabel as nib

    dense_root = build_ts_weights_root(tmp_path / "ts_weights")
    out_root = tmp_path / "ts_weights_compressed"
    proc = run_cli("nnunet-green-compress", "-i", dense_root, "-o", out_root, "--rank-ratio", 0.25, "-q", "--no-speed-check")
    assert "params" in proc.stdout

    folder = out_root / TASK_FOLDER / MODEL_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["compression.json", "dataset.json", "fold_0", "plans.json"]
    conf = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert "UNet_class_name" not in conf  # written in the new format
    kw = conf["architecture"]["arch_kwargs"]
    assert kw["dense_network_class"] == "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    assert kw["features_per_stage"] == [8, 16, 32] and kw["n_conv_per_stage"] == [2, 2, 2]
    assert kw["tucker_ranks"]
    manifest = json.loads((folder / "compression.json").read_text())
    assert manifest["configuration"] == "3d_fullres" and manifest["patch_size"] == [32, 64, 64]
    assert manifest["totals"]["params_after"] < manifest["totals"]["params_before"]
    factorized = [lay for lay in manifest["layers"] if lay["factorized"]]
    assert factorized and all(lay["rank_in"] >= min(8, lay["in_channels"]) and
                              lay["rank_out"] >= min(8, lay["out_channels"]) for lay in factorized)
    assert max(lay["rel_error"] for lay in factorized) < 1e-3
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer_4000epochs_NoMirroring"

    home = tmp_path / "ts_home"
    seg_c = tmp_path / "seg_compressed.nii.gz"
    proc = run_totalsegmentator(out_root, home, seg_c)
    log = proc.stdout + proc.stderr
    assert "Downloading" not in log, log[-2000:]
    assert "fast CPU path: ONNX Runtime" in log, log[-2000:]  # the artefact in the checkpoint was used
    assert sorted(p.name for p in out_root.iterdir()) == [TASK_FOLDER], "TotalSegmentator added weights"
    ct = nib.load(CT)
    seg = nib.load(seg_c)
    assert seg.shape == ct.shape
    np.testing.assert_allclose(seg.affine, ct.affine, atol=1e-3)
    labels_c = np.asarray(seg.dataobj)
    assert labels_c.max() <= 117 and len(np.unique(labels_c)) > 1

    # the same root again with its fast-path artefact deleted, then with it stale (one weight edited by hand after
    # compression, by a part in a million): TotalSegmentator runs the eager network and says why once
    segs = {}
    for case, edit, reason in (("deleted", strip_fast_path_artefact, "no fast-path artefact"),
                               ("stale", _edit_one_weight, "built for other weights")):
        root = tmp_path / f"ts_weights_{case}"
        shutil.copytree(out_root, root)
        edit(root / TASK_FOLDER / MODEL_FOLDER / "fold_0" / "checkpoint_final.pth")
        segs[case] = tmp_path / f"seg_{case}.nii.gz"
        proc = run_totalsegmentator(root, home, segs[case])
        log = proc.stdout + proc.stderr
        assert log.count(reason) == 1 and "fast CPU path: ONNX" not in log, log[-2000:]
    labels_deleted, labels_stale = (np.asarray(nib.load(segs[c]).dataobj) for c in ("deleted", "stale"))
    print(f"TotalSegmentator --fast voxel agreement fast path vs eager: {(labels_deleted == labels_c).mean():.6f}")
    # random weights leave 118 nearly tied logits, so float-level differences between the runtimes flip a few
    # voxels (0.99993 here; issue 12's 0.9999 bar is checked on trained models and on a CT crop, test_fast_path)
    assert (labels_deleted == labels_c).mean() >= 0.999
    assert (labels_stale == labels_deleted).mean() >= 0.9999  # both eager; one weight differs by 1e-6

    # the dense root through the same CLI, for comparison: the same labels come out for most voxels
    seg_d = tmp_path / "seg_dense.nii.gz"
    run_totalsegmentator(dense_root, home, seg_d)
    labels_d = np.asarray(nib.load(seg_d).dataobj)
    agreement = float((labels_c == labels_d).mean())
    print(f"TotalSegmentator --fast voxel agreement dense vs compressed(0.25): {agreement:.4f}")
    # every spatial kernel has multilinear rank <= 8 and the ranks chosen are >= 8: the factorization is exact
    assert agreement > 0.99
    shutil.rmtree(home)
