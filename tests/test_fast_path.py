"""Fast CPU inference path of compressed networks (compression/fast_path.py): same predictions as the eager
factorized network, used only when it applies, one log line per reason when it does not."""
from __future__ import annotations

import copy
import logging
import pickle
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TOTALSEG_EXAMPLE, requires
from nnunet_green.compression import TuckerConfig, tucker_
from nnunet_green.compression import fast_path
from nnunet_green.compression.fast_export import (MAX_REL_LOGIT_DIFF, MIN_ARGMAX_AGREEMENT, compare_paths,
                                                  install_artefact_)
from nnunet_green.compression.fast_path import ARTEFACT_KEY, eager, fast_forward
from nnunet_green.compression.network import TuckerFactorizedNetwork

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch, caplog):
    monkeypatch.setattr(fast_path, "_SAID", set())  # "once per process" must not leak between tests
    caplog.set_level(logging.INFO, logger=fast_path.log.name)


def small_network(kind: str, dim: int, deep_supervision: bool = False, seed: int = 0):
    """(factorized network with the fast path, its dense class kwargs): 3 stages, 8-32 features, random
    InstanceNorm affine parameters (the stock init leaves them at 1/0)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    cls = PlainConvUNet if kind == "plain" else ResidualEncoderUNet
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    kw = dict(n_stages=3, features_per_stage=[8, 16, 32], conv_op=conv, kernel_sizes=3, strides=[1, 2, 2],
              n_conv_per_stage_decoder=1, conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
              nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
    kw["n_conv_per_stage" if kind == "plain" else "n_blocks_per_stage"] = 2 if kind == "plain" else [1, 2, 2]
    torch.manual_seed(seed)
    dense = cls(input_channels=1, num_classes=3, **kw)
    for m in dense.modules():
        if isinstance(m, norm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    records = tucker_(dense, TuckerConfig(rank_ratio=0.5, min_rank=4, round_to=4), n_iter_max=0)
    ranks = {r.name: [r.rank_in, r.rank_out] for r in records if r.factorized}
    net = TuckerFactorizedNetwork(1, 3, cls, ranks, **kw)
    net.load_state_dict(dense.state_dict(), strict=True)  # no artefact entry: accepted
    return net.eval()


SHAPE3, SHAPE2 = (1, 1, 16, 16, 24), (1, 1, 32, 40)


@pytest.fixture(scope="module")
def plain3d():
    net = small_network("plain", 3)
    install_artefact_(net, SHAPE3)
    return net


def eager_out(net, x):
    with torch.inference_mode(), eager():
        return net(x)


def lines(caplog, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind,dim", [("plain", 3), ("plain", 2), ("resenc", 3), ("resenc", 2)])
def test_fast_path_matches_eager_and_steps_aside_for_deep_supervision(kind, dim, caplog):
    net = small_network(kind, dim, deep_supervision=True)
    shape = SHAPE3 if dim == 3 else SHAPE2
    record = install_artefact_(net, shape)  # exported with deep supervision off, whatever the flag says
    assert record["status"] == "built" and net.decoder.deep_supervision
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ds = net(x)
    assert isinstance(ds, (list, tuple)) and lines(caplog, "deep supervision on") == 1
    for a, b in zip(ds, eager_out(net, x)):
        assert torch.equal(a, b)

    net.decoder.deep_supervision = False
    check = compare_paths(net, x)
    assert check["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT and check["max_rel_logit_diff"] <= MAX_REL_LOGIT_DIFF
    with torch.inference_mode():
        assert torch.equal(net(x), fast_forward(net, x))  # the module's forward took the fast path
    assert lines(caplog, "fast CPU path: ONNX Runtime") == 1


def test_fallbacks_say_why_once_and_predict_the_same(plain3d, caplog, monkeypatch):
    x = torch.randn(SHAPE3, generator=torch.Generator().manual_seed(4))
    ref = eager_out(plain3d, x)

    def runs_eager(net, inp, text, expect=None, grad=False):
        for _ in range(2):
            with torch.set_grad_enabled(grad), torch.inference_mode(not grad):
                out = net(inp)
            assert torch.equal(out, eager_out(net, inp) if expect is None else expect)
        assert lines(caplog, text) == 1, [r.getMessage() for r in caplog.records]

    missing = copy.deepcopy(plain3d)
    missing.set_fast_path_artefact(b"")
    runs_eager(missing, x, "no fast-path artefact", ref)

    corrupt = copy.deepcopy(plain3d)
    corrupt.set_fast_path_artefact(b"not an onnx model")
    runs_eager(corrupt, x, "cannot be loaded", ref)

    other = torch.randn(1, 1, 16, 16, 16)
    runs_eager(plain3d, other, "is not the fast-path artefact's")

    runs_eager(plain3d, x, "training or autograd enabled", ref, grad=True)
    plain3d.train()
    try:
        runs_eager(plain3d, x, "training or autograd enabled", ref)
    finally:
        plain3d.eval()

    stale = copy.deepcopy(plain3d)
    with torch.no_grad():
        next(stale.parameters()).view(-1)[0] += 1e-3  # one weight edited by hand
    runs_eager(stale, x, "built for other weights")
    assert not torch.equal(eager_out(stale, x), ref)  # the edit matters: the artefact would have been wrong

    monkeypatch.setenv("nnUNet_green_fast_path", "0")
    runs_eager(plain3d, x, "disabled by nnUNet_green_fast_path=0", ref)
    monkeypatch.delenv("nnUNet_green_fast_path")

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    runs_eager(plain3d, x, "onnxruntime is not installed", ref)


def test_deep_copy_trains_its_own_weights_and_the_network_pickles(plain3d):
    x = torch.randn(SHAPE3, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        before = plain3d(x)
    student = copy.deepcopy(plain3d).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student(x).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in plain3d.parameters())
    opt.step()
    student.eval()
    with torch.inference_mode():
        assert torch.equal(plain3d(x), before)  # the original still runs fast on its own weights
        assert fast_forward(student, x) is None  # the copy's artefact is stale now: eager
    restored = pickle.loads(pickle.dumps(plain3d))
    with torch.inference_mode():
        assert fast_forward(restored, x) is not None and torch.equal(restored(x), before)


def test_old_and_resized_artefact_entries_strict_load(plain3d):
    state = plain3d.state_dict()
    assert state[ARTEFACT_KEY].dtype == torch.uint8 and state[ARTEFACT_KEY].numel() > 0
    fresh = small_network("plain", 3, seed=1)  # empty buffer, other weights
    fresh.load_state_dict(state, strict=True)  # an entry of another size
    x = torch.randn(SHAPE3)
    with torch.inference_mode():
        assert fast_forward(fresh, x) is not None
    old = {k: v for k, v in state.items() if k != ARTEFACT_KEY}
    fresh.load_state_dict(old, strict=True)  # a folder from before the fast path
    assert fresh._buffers[ARTEFACT_KEY].numel() == 0


# ---------------------------------------------------------------- real images (Hippocampus: test_compress_cli.py)

def to_patch(image: np.ndarray, shape) -> torch.Tensor:
    """A real image cropped / zero-padded to the network input `shape` (what the predictor's padding does)."""
    x = np.zeros(shape[2:], np.float32)
    crop = tuple(slice(0, min(a, b)) for a, b in zip(x.shape, image.shape))
    x[crop] = image[crop]
    return torch.from_numpy(x)[None, None]


@requires(TOTALSEG_EXAMPLE)
def test_rebuild_cli_and_exact_on_a_real_ct_crop(tmp_path, capsys):
    """A TotalSegmentator-shaped model (random weights) compressed without the artefact, given one by
    `nnunet-green-fastpath`, then fast vs eager on a real 1.5 mm chest CT crop, CT-normalised with the plans'
    intensity statistics."""
    import json

    import SimpleITK as sitk

    from nnunet_green.compression import fast_folder

    from nnunet_green.compression.model_folder import compress_model_folder
    from nnunet_green.nnunet_io import ModelFolder
    from nnunet_green.testing.totalseg import random_model_folder, ts_old_format_plans

    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{f"c{i}": i for i in range(1, 8)}},
               "numTraining": 1, "file_ending": ".nii.gz"}
    plans = ts_old_format_plans()  # 3 stages, 8-32 features, patch 32x64x64
    dense = random_model_folder(tmp_path / "dense", dataset, plans=plans)
    out = tmp_path / "c012"
    manifest = compress_model_folder(dense, out, TuckerConfig(rank_ratio=0.12), fast_path=False)
    assert manifest["fast_path"] is None
    # added afterwards by the rebuild CLI, as for a folder from before the fast path
    assert fast_folder.main([str(out), "--check"]) == 0 and capsys.readouterr().out == "fold_0: missing\n"
    assert fast_folder.main([str(out)]) == 0 and capsys.readouterr().out == "fold_0: built\n"
    assert fast_folder.main([str(out), "--check"]) == 0 and capsys.readouterr().out == "fold_0: ok\n"
    assert json.loads((out / "compression.json").read_text())["fast_path"]["status"] == "built"
    loaded = ModelFolder(out).load("0")
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(TOTALSEG_EXAMPLE / "pulmonary_report" / "ct_cropped.nii.gz")))
    ct = np.clip(ct.astype(np.float32), props["percentile_00_5"], props["percentile_99_5"])
    ct = (ct - props["mean"]) / props["std"]
    check = compare_paths(loaded.network, to_patch(ct[40:], (1, 1, *loaded.configuration_manager.patch_size)))
    assert check["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT and check["max_rel_logit_diff"] <= MAX_REL_LOGIT_DIFF


def test_hooks_and_fake_tensors_see_the_eager_network(plain3d, caplog):
    """Forward hooks (activation statistics, MAC counting) and fake-tensor shape propagation need every layer."""
    from nnunet_green.compression import count_macs

    seen = []
    handle = plain3d.decoder.seg_layers[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        x = torch.randn(SHAPE3)
        with torch.inference_mode():
            assert torch.equal(plain3d(x), eager_out(plain3d, x))
    finally:
        handle.remove()
    assert seen and lines(caplog, "forward hooks on the network's layers") == 1
    assert count_macs(plain3d, SHAPE3) > 0
