"""Tucker-2 compression core: exactness at full rank, the rank rule, aliasing, MACs, nnU-Net integration."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunet_green.compression import (BudgetedRanks, GivenRanks, LayerRecord, PointwiseConv3d, RankPolicy,
                                      TuckerConfig, TuckerConv, UniformRanks, count_macs, dense_reason,
                                      executed_params, factorize_structure_, factorized_params, mac_breakdown,
                                      mac_fraction, param_count, ranks_of, tucker_, tucker_ranks)
from nnunet_green.compression.network import (NETWORK_CLASS_NAME, build_dense_from_plans, build_network_from_plans,
                                              factorized_architecture)

FULL = TuckerConfig(rank_ratio=1.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def plain_unet(dim: int, features, n_classes: int, input_channels: int = 1, deep_supervision=False):
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    n = len(features)
    return PlainConvUNet(input_channels, n, features, conv, [[3] * dim] * n, [[1] * dim] + [[2] * dim] * (n - 1),
                         [2] * n, n_classes, [2] * (n - 1), True, norm, {"eps": 1e-5, "affine": True}, None, None,
                         nn.LeakyReLU, {"inplace": True}, deep_supervision=deep_supervision)


def ts_15mm():
    """TotalSegmentator 1.5 mm part-model architecture (25 outputs), random weights."""
    return plain_unet(3, [32, 64, 128, 256, 320, 320], 25)


def randomize_norms(model):
    # nnU-Net initialises affine norms to identity; random affines make the end-to-end comparison stricter
    for m in model.modules():
        if isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- exactness at rank_ratio 1.0

@pytest.mark.parametrize("make_conv,shape", [
    (lambda: nn.Conv3d(16, 24, 3, padding=1), (2, 16, 9, 10, 11)),
    (lambda: nn.Conv3d(16, 24, 3, stride=2, padding=1), (1, 16, 12, 12, 12)),
    (lambda: nn.Conv3d(12, 20, 3, stride=(1, 2, 2), padding=1, bias=False), (1, 12, 7, 12, 12)),
    (lambda: nn.Conv3d(16, 16, (1, 3, 3), padding=(0, 1, 1)), (1, 16, 5, 12, 12)),
    (lambda: nn.ConvTranspose3d(24, 16, 2, stride=2), (1, 24, 5, 6, 7)),
    (lambda: nn.ConvTranspose3d(24, 16, (1, 2, 2), stride=(1, 2, 2)), (2, 24, 4, 6, 6)),
    (lambda: nn.Conv2d(16, 32, 3, padding=1), (2, 16, 20, 20)),
    (lambda: nn.Conv2d(16, 32, (3, 5), stride=2, padding=(1, 2), dilation=1), (1, 16, 21, 20)),
    (lambda: nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1), (1, 32, 10, 10)),
])
def test_full_rank_reproduces_dense(make_conv, shape):
    dense = nn.Sequential(make_conv())
    x = torch.randn(shape)
    with torch.no_grad():
        ref = dense(x)
    (rec,) = tucker_(dense, FULL)
    assert rec.factorized and rec.reason is None
    assert (rec.rank_in, rec.rank_out) == (rec.in_channels, rec.out_channels)
    assert isinstance(dense[0], TuckerConv)
    assert rec.rel_error <= 1e-4
    with torch.no_grad():
        out = dense(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4
    assert sorted(dense.state_dict()) == sorted(
        ["0.first.weight", "0.core.weight", "0.last.weight"] + (["0.last.bias"] if dense[0].last.bias is not None
                                                                  else []))


def test_full_rank_plain_unet_3d_end_to_end():
    net = plain_unet(3, [8, 16, 32, 48], 3, input_channels=2).eval()
    randomize_norms(net)
    x = torch.randn(1, 2, 24, 24, 16)
    with torch.no_grad():
        ref = net(x)
    records = tucker_(net, FULL)
    fact = [r for r in records if r.factorized]
    dense = [r for r in records if not r.factorized]
    # every conv with a spatial kernel (stem included) is factorized at 1.0; only the 1x1 heads stay dense
    assert dense and all(r.kernel_size == (1, 1, 1) and "1x1" in r.reason for r in dense)
    assert len(fact) == 2 * 4 + 2 * 3 + 3  # encoder convs + decoder convs + transposed convs
    assert max(r.rel_error for r in fact) <= 1e-4
    with torch.no_grad():
        out = net(x)
    assert rel_err(out, ref) <= 1e-4


def test_full_rank_residual_encoder_unet_2d_end_to_end():
    net = ResidualEncoderUNet(1, 4, [8, 16, 32, 32], nn.Conv2d, 3, [1, 2, 2, 2], [1, 2, 2, 2], 3, [1, 1, 1], True,
                              nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                              {"inplace": True}, deep_supervision=True).eval()
    randomize_norms(net)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = net(x)
    records = tucker_(net, FULL)
    assert sum(r.factorized for r in records) >= 15
    with torch.no_grad():
        out = net(x)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert rel_err(o, r) <= 1e-4


# ---------------------------------------------------------------- realistic network at 0.12

@pytest.fixture(scope="module")
def ts_compressed():
    torch.manual_seed(1)
    dense = ts_15mm().eval()
    net = copy.deepcopy(dense)
    records = tucker_(net, TuckerConfig(rank_ratio=0.12), input_shape=(1, 1, 64, 64, 64))
    return dense, net, records


def test_ts_architecture_matches_published_counts(ts_compressed):
    dense, _, _ = ts_compressed
    # 31.19 M as published = parameters used by the forward (deep-supervision heads excluded)
    assert executed_params(dense, (1, 1, 64, 64, 64)) == 31_194_809
    assert sum(p.numel() for p in dense.parameters()) == 31_214_109


def test_rank_ratio_012_on_ts_network(ts_compressed):
    dense, net, records = ts_compressed
    fact = [r for r in records if r.factorized]
    assert len(fact) == 26  # 11 encoder (stem dense) + 10 decoder convs + 5 transposed convs
    before = sum(r.params_before for r in fact)
    after = sum(r.params_after for r in fact)
    assert 1 - after / before >= 0.88
    for r in fact:
        assert r.rank_in % 8 == 0 and r.rank_out % 8 == 0, r
        assert 8 <= r.rank_in < r.in_channels and 8 <= r.rank_out < r.out_channels
        assert r.macs_after < r.macs_before
        assert 0 <= r.rel_error < 1
    by_name = {r.name: r for r in records}
    stem = by_name["encoder.stages.0.0.convs.0.conv"]
    assert not stem.factorized and "min_rank" in stem.reason and stem.rank_in is None and stem.rel_error is None
    heads = [r for r in records if r.name.startswith("decoder.seg_layers")]
    assert len(heads) == 5 and all(not r.factorized and "1x1" in r.reason for r in heads)
    # the exact rank rule for a 320->320 3x3x3 conv: a = 0.311 -> 99.6 -> 96
    assert (by_name["encoder.stages.5.0.convs.1.conv"].rank_in, by_name["encoder.stages.5.0.convs.1.conv"].rank_out) \
        == (96, 96)
    json.dumps([r.to_dict() for r in records])  # JSON-serialisable
    assert isinstance(records[0], LayerRecord)


def test_aliases_share_one_module(ts_compressed):
    _, net, records = ts_compressed
    modules = dict(net.named_modules(remove_duplicate=False))
    rec = next(r for r in records if r.name == "encoder.stages.2.0.convs.1.conv")
    assert set(rec.aliases) == {"encoder.stages.2.0.convs.1.all_modules.0", "decoder.encoder.stages.2.0.convs.1.conv",
                                "decoder.encoder.stages.2.0.convs.1.all_modules.0"}
    for r in records:
        if r.factorized:
            assert isinstance(modules[r.name], TuckerConv)
            for a in r.aliases:
                assert modules[a] is modules[r.name]
    assert not any(isinstance(m, nn.Conv3d) and not isinstance(m, PointwiseConv3d) and m.kernel_size == (3, 3, 3)
                   and m.in_channels > 1 and name.endswith(".conv")
                   for name, m in net.named_modules(remove_duplicate=False))


def test_state_dict_strict_loads_into_structure(ts_compressed):
    _, net, records = ts_compressed
    ranks = ranks_of(records)
    assert ranks == ranks_of(net)
    fresh = ts_15mm().eval()
    factorize_structure_(fresh, json.loads(json.dumps(ranks)))  # ranks survive a JSON round trip (plans.json)
    fresh.load_state_dict(net.state_dict(), strict=True)
    with pytest.raises(KeyError, match="canonical name 'encoder.stages.1.0.convs.0.conv'"):
        factorize_structure_(ts_15mm(), {"decoder.encoder.stages.1.0.convs.0.conv": (8, 16)})
    modules = dict(fresh.named_modules(remove_duplicate=False))
    for r in records:
        for a in r.aliases:
            assert modules[a] is modules[r.name]
    x = torch.randn(1, 1, 64, 64, 64)  # InstanceNorm needs > 1 voxel at the 1/32 bottleneck
    with torch.no_grad():
        assert torch.allclose(fresh(x), net(x), rtol=0, atol=1e-6)


def test_compressed_macs(ts_compressed):
    dense, net, records = ts_compressed
    shape = (1, 1, 64, 64, 64)
    d, c = count_macs(dense, shape), count_macs(net, shape)
    assert c < d / 5
    # per-layer records agree with the per-module breakdown of the compressed network
    parts = mac_breakdown(net, shape)
    r = next(r for r in records if r.name == "decoder.transpconvs.2")
    assert r.macs_after == sum(parts[f"{r.name}.{p}"] for p in ("first", "core", "last"))


# ---------------------------------------------------------------- rank rule, MACs by hand

def test_rank_rule():
    r_in, r_out = tucker_ranks(320, 320, 27, 0.12)
    a = (-2 + math.sqrt(4 + 4 * 27 * 0.12 * 27)) / (2 * 27)  # 27a^2 + 2a = 0.12*27 for C_in = C_out
    assert (r_in, r_out) == (8 * round(a * 320 / 8),) * 2 == (96, 96)
    assert tucker_ranks(64, 128, 27, 0.12) == (16, 40)  # 19.9 -> 16 (nearest), 39.8 -> 40
    assert tucker_ranks(4, 6, 27, 0.05) == (4, 6)  # fewer channels than min_rank: full
    assert tucker_ranks(12, 100, 27, 0.05, min_rank=1, round_to=8) == (8, 8)  # at least one multiple of 8
    assert tucker_ranks(6, 100, 27, 0.05, min_rank=1, round_to=8)[0] == 1  # C < round_to: ceil, no rounding
    assert tucker_ranks(33, 65, 8, 1.0) == (33, 65)
    # monotone in the ratio
    ranks = [tucker_ranks(256, 512, 27, r) for r in (0.05, 0.08, 0.12, 0.2, 0.3, 0.5)]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)


def test_mac_count_single_conv_by_hand():
    conv = nn.Sequential(nn.Conv3d(8, 16, 3, stride=2, padding=1))
    assert count_macs(conv, (1, 8, 20, 20, 20)) == (10 * 10 * 10) * 16 * 8 * 27
    convt = nn.Sequential(nn.ConvTranspose3d(16, 8, 2, stride=2))
    assert count_macs(convt, (2, 16, 5, 5, 5)) == 2 * 125 * 16 * 8 * 8
    conv2d = nn.Sequential(nn.Conv2d(6, 10, (3, 5), padding=(1, 2)), nn.ReLU(), nn.Flatten(), nn.Linear(10 * 7 * 9, 4))
    assert count_macs(conv2d, (3, 6, 7, 9)) == 3 * (63 * 10 * 6 * 15 + 630 * 4)
    # factorized: first 1x1 at input resolution, core and last at output resolution
    tucker_(conv, TuckerConfig(rank_ratio=0.5, min_rank=1, round_to=1, min_mac_saving=0))
    r_in, r_out = conv[0].rank_in, conv[0].rank_out
    assert count_macs(conv, (1, 8, 20, 20, 20)) == 8000 * 8 * r_in + 1000 * (27 * r_in * r_out + r_out * 16)
    # count_macs does not run real compute: a huge input is fine
    assert count_macs(nn.Sequential(nn.Conv3d(1, 1, 1)), (1, 1, 4096, 4096, 4096)) == 4096 ** 3


def test_gemm_pointwise_matches_conv():
    conv = nn.Conv3d(12, 7, 1)
    pw = PointwiseConv3d(12, 7)
    pw.load_state_dict(conv.state_dict())
    for x in (torch.randn(1, 12, 5, 6, 7), torch.randn(3, 12, 5, 6, 7),
              torch.randn(2, 12, 5, 6, 7).to(memory_format=torch.channels_last_3d)):
        assert torch.allclose(pw(x), conv(x), atol=1e-5)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("bad", [0, -1, 1.5, float("nan"), float("inf")])
def test_bad_rank_ratio(bad):
    with pytest.raises(ValueError, match="rank_ratio"):
        TuckerConfig(rank_ratio=bad)


def test_grouped_and_output_padding_refused():
    model = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1, groups=4),
                          nn.ConvTranspose3d(16, 16, 3, stride=2, padding=1, output_padding=1),
                          nn.Conv3d(16, 16, 3, padding=1))
    with pytest.raises(ValueError, match=r"'0'.*groups=4"):
        factorize_structure_(model, {"0": (8, 8)})
    with pytest.raises(ValueError, match=r"'1'.*output_padding"):
        factorize_structure_(model, {"1": (8, 8)})
    with pytest.raises(ValueError, match="groups=2"):
        TuckerConv.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2, 2)
    # tucker_ leaves them dense and says why; the ordinary conv is still factorized
    records = tucker_(model, FULL)
    assert [r.factorized for r in records] == [False, False, True]
    assert "groups=4" in records[0].reason and "output_padding" in records[1].reason


def test_no_mac_gain_left_dense():
    # 0.9 of the parameters -> ranks round up to the full channel count: more multiply-adds, not fewer
    model = nn.Sequential(nn.Conv3d(16, 16, 3), nn.Conv3d(64, 64, 3))
    records = tucker_(model, TuckerConfig(rank_ratio=0.9))
    assert not records[0].factorized and "no multiply-add gain" in records[0].reason
    assert records[1].factorized and records[1].rank_in < 64
    assert type(model[0]) is nn.Conv3d


def test_filter_fn_and_unknown_names():
    model = nn.Sequential(nn.Conv3d(16, 16, 3), nn.Conv3d(16, 16, 3))
    records = tucker_(model, FULL, filter_fn=lambda m, name: name != "1")
    assert [r.factorized for r in records] == [True, False] and records[1].reason == "excluded by filter_fn"
    with pytest.raises(KeyError, match="nope"):
        factorize_structure_(model, {"nope": (8, 8)})
    with pytest.raises(ValueError, match="ranks"):
        factorize_structure_(nn.Sequential(nn.Conv3d(16, 16, 3)), {"0": (17, 8)})


# ---------------------------------------------------------------- nnU-Net integration

DENSE_ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 4, "features_per_stage": [16, 32, 64, 64], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def test_get_network_from_plans_builds_factorized_network():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    dense = get_network_from_plans(DENSE_ARCH["network_class_name"], DENSE_ARCH["arch_kwargs"],
                                   DENSE_ARCH["_kw_requires_import"], 1, 4, deep_supervision=False).eval()
    randomize_norms(dense)
    records = tucker_(dense, TuckerConfig(rank_ratio=0.3))
    assert any(r.factorized for r in records)
    arch = factorized_architecture(DENSE_ARCH, ranks_of(records))
    arch = json.loads(json.dumps(arch))  # as read back from plans.json
    assert arch["network_class_name"] == NETWORK_CLASS_NAME
    rebuilt = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, 4, deep_supervision=True)
    from nnunet_green.compression.fast_path import ARTEFACT_KEY, FastPlainConvUNet
    # the dense class with the fast CPU path: the dense state-dict keys plus the (optional) artefact buffer
    assert type(rebuilt) is FastPlainConvUNet and isinstance(rebuilt, PlainConvUNet)
    assert rebuilt.decoder.deep_supervision
    assert set(rebuilt.state_dict()) == set(dense.state_dict()) | {ARTEFACT_KEY}
    rebuilt.load_state_dict(dense.state_dict(), strict=True)
    rebuilt.decoder.deep_supervision = False
    rebuilt.eval()
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), dense(x), rtol=0, atol=1e-6)


def test_plans_helpers_new_and_old_format():
    new_plans = {"dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans",
                 "configurations": {"3d_fullres": {"architecture": DENSE_ARCH, "patch_size": [8, 32, 32]}}}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}}
    dense = build_dense_from_plans(new_plans, "3d_fullres", dataset_json)
    assert type(dense) is PlainConvUNet and dense.decoder.num_classes == 3
    # old-format (nnU-Net <= 2.1, as shipped by TotalSegmentator) plans are converted by nnU-Net itself
    old_plans = {"dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {
        "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 16, "unet_max_num_features": 64,
        "n_conv_per_stage_encoder": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2], "patch_size": [8, 32, 32],
        "num_pool_per_axis": [2, 3, 3],
        "conv_kernel_sizes": DENSE_ARCH["arch_kwargs"]["kernel_sizes"],
        "pool_op_kernel_sizes": DENSE_ARCH["arch_kwargs"]["strides"]}}}
    with pytest.warns(UserWarning, match="old nnU-Net plans"):
        old = build_dense_from_plans(old_plans, "3d_fullres", input_channels=1, num_classes=3)
    assert sorted(old.state_dict()) == sorted(dense.state_dict())
    records = tucker_(old, TuckerConfig(rank_ratio=0.3))
    compressed_plans = copy.deepcopy(new_plans)
    compressed_plans["configurations"]["3d_fullres"]["architecture"] = factorized_architecture(DENSE_ARCH,
                                                                                              ranks_of(records))
    net = build_network_from_plans(compressed_plans, "3d_fullres", dataset_json)
    net.load_state_dict(old.state_dict(), strict=True)
    assert type(build_dense_from_plans(compressed_plans, "3d_fullres", dataset_json)) is PlainConvUNet


def test_full_rank_caps_ranks_at_what_the_weight_can_hold():
    # A 1->32 3x3x3 stem has output-mode rank <= 27: full rank must stay exact, not ask for 32 factors.
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv3d(1, 32, 3, padding=1))
    x = torch.randn(1, 1, 8, 8, 8)
    expected = stem(x)
    record, = tucker_(stem, TuckerConfig(rank_ratio=1.0))
    assert (record.rank_in, record.rank_out) == (1, 27)
    assert ((stem(x) - expected).norm() / expected.norm()).item() <= 1e-4


def test_explicit_ranks_factorize_exactly_the_named_layers():
    net = nn.Sequential(nn.Conv3d(16, 32, 3), nn.Conv3d(32, 32, 3))
    records = tucker_(net, TuckerConfig(), ranks={"1": (8, 16)})
    assert [(r.name, r.factorized, r.rank_in, r.rank_out) for r in records] == \
        [("0", False, None, None), ("1", True, 8, 16)]
    assert isinstance(net[1], TuckerConv) and records[0].reason == "not among the given ranks"
    with pytest.raises(KeyError, match="nope"):
        tucker_(nn.Sequential(nn.Conv3d(16, 32, 3)), TuckerConfig(), ranks={"nope": (8, 8)})


def test_budget_config_spends_a_global_budget_per_layer():
    """TuckerConfig(budget=...) through the one verb: per-layer ranks within the global parameter budget, layers
    it keeps dense say why, and the MAC budget needs an input shape."""
    net = plain_unet(3, [32, 64, 128], 3)
    dense_params = {n: m.weight.numel() + m.bias.numel() for n, m in net.named_modules()
                    if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3)
                    and min(m.in_channels, m.out_channels) >= 8}
    records = tucker_(net, TuckerConfig(budget=0.2))
    eligible = [r for r in records if r.name in dense_params]
    kept = sum(r.params_after for r in eligible) / sum(dense_params.values())
    assert 0.1 < kept <= 0.2
    assert len({(r.rank_in, r.rank_out) for r in eligible if r.factorized}) > 1  # not one uniform ratio
    assert all(r.reason for r in records if not r.factorized)
    assert not any(r.reason == "not among the given ranks" for r in records)
    with torch.no_grad():
        assert torch.isfinite(net(torch.randn(1, 1, 16, 16, 16))).all()
    with pytest.raises(ValueError, match="input_shape"):
        tucker_(plain_unet(3, [16, 32], 2), TuckerConfig(budget=0.2, budget_cost="macs"))
    for bad in (dict(budget=1.0), dict(budget=0.0), dict(budget=0.2, budget_cost="flops")):
        with pytest.raises(ValueError, match="budget"):
            TuckerConfig(**bad)


def test_verification_input_reaches_the_bottleneck_with_more_than_one_voxel():
    """The strict-load check runs one small forward: for TotalSegmentator's 5/6-stage networks (total stride 16/32)
    a 16^3 input would reach 1^3 at the bottleneck, where InstanceNorm raises."""
    from types import SimpleNamespace

    from nnunet_green.compression.model_folder import _min_input_shape

    for n_pool, patch, expected in ((5, [128, 128, 128], [64, 64, 64]), (4, [112, 112, 128], [32, 32, 32]),
                                    (2, [40, 56, 40], [16, 16, 16]), (4, [16, 112, 128], [16, 32, 32])):
        cm = SimpleNamespace(patch_size=patch, pool_op_kernel_sizes=[[1, 1, 1]] + [[2, 2, 2]] * n_pool)
        assert _min_input_shape(cm) == expected
    net = plain_unet(3, [8, 16, 16, 16, 16], 3).eval()  # total stride 16
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


# ---------------------------------------------------------------- policies, cost, the one eligibility rule

def test_policies_plan_then_apply_like_the_config():
    net = plain_unet(3, [16, 32, 64], 3)
    by_config, by_policy = copy.deepcopy(net), copy.deepcopy(net)
    records = tucker_(by_config, TuckerConfig(rank_ratio=0.3))
    assert [(r.name, r.rank_in, r.rank_out, r.reason) for r in records] == \
        [(r.name, r.rank_in, r.rank_out, r.reason) for r in tucker_(by_policy, UniformRanks(0.3))]
    plan = UniformRanks(0.3).plan(net)  # deciding does not touch the model
    assert not any(isinstance(m, TuckerConv) for m in net.modules())
    assert plan.ranks == {r.name: (r.rank_in, r.rank_out) for r in records if r.factorized}
    assert plan.dense == {r.name: r.reason for r in records if not r.factorized} and plan.rule == \
        "uniform rank ratio 0.3"
    assert all(isinstance(p, RankPolicy) for p in (UniformRanks(), BudgetedRanks(0.2), GivenRanks({})))
    assert TuckerConfig(rank_ratio=0.3).policy() == UniformRanks(0.3)
    assert TuckerConfig(budget=0.2, budget_cost="macs").policy() == BudgetedRanks(0.2, "macs")
    assert TuckerConfig().rank_ratio == UniformRanks().rank_ratio == 0.12  # contract.DEFAULT_RANK_RATIO
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    assert ranks_of(tucker_(a, TuckerConfig(budget=0.2))) == ranks_of(tucker_(b, BudgetedRanks(0.2)))
    # filter_fn takes a layer out of the budget as well
    first = next(iter(BudgetedRanks(0.2).plan(net).ranks))
    filtered = BudgetedRanks(0.2).plan(net, filter_fn=lambda m, name: name != first)
    assert first not in filtered.ranks and filtered.dense[first] == "excluded by filter_fn"
    with pytest.raises(TypeError, match="rank policy"):
        tucker_(net, {"rank_ratio": 0.3})
    for bad in (dict(rank_ratio=0), dict(min_rank=0), dict(round_to=1.5), dict(min_mac_saving=1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UniformRanks(**bad)
    with pytest.raises(ValueError, match="budget"):
        BudgetedRanks(1.0)


def test_one_eligibility_rule_for_every_policy():
    model = nn.Sequential(nn.Conv3d(1, 16, 3), nn.Conv3d(16, 32, 3, groups=4), nn.Conv3d(32, 32, 1),
                          nn.ConvTranspose3d(32, 32, 3, stride=2, padding=1, output_padding=1),
                          nn.Conv3d(32, 32, 3), nn.Conv3d(32, 64, 3))
    reasons = {str(i): dense_reason(m, min_rank=8) for i, m in enumerate(model)}
    assert "min_rank=8" in reasons["0"] and "groups=4" in reasons["1"] and "1x1" in reasons["2"]
    assert "output_padding" in reasons["3"] and reasons["4"] is None and reasons["5"] is None
    assert dense_reason(nn.Linear(4, 4)).startswith("not a supported conv type")
    for policy in (UniformRanks(0.3), BudgetedRanks(0.3)):
        plan = policy.plan(model)
        assert {k: plan.dense[k] for k, v in reasons.items() if v} == {k: v for k, v in reasons.items() if v}
        assert set(plan.ranks) <= {"4", "5"}
    records = tucker_(model, UniformRanks(1.0))  # full rank drops the min_rank floor, nothing else
    assert [r.factorized for r in records] == [True, False, False, False, True, True]


def test_cost_helpers_match_the_built_layer():
    # mac_fraction assumes what nnU-Net's convs do: input resolution = stride x output resolution (padded convs)
    for conv, size in ((nn.Conv3d(16, 24, 3, stride=2, padding=1), 8), (nn.Conv3d(16, 24, 3, padding=1, bias=False), 6),
                       (nn.ConvTranspose3d(24, 16, 2, stride=2), 4)):
        layer = TuckerConv.from_conv(conv, 8, 16)
        assert factorized_params(conv, 8, 16) == param_count(layer)
        shape = (1, conv.in_channels, size, size, size)
        assert math.isclose(count_macs(layer, shape) / count_macs(conv, shape), mac_fraction(conv, 8, 16))


def test_no_import_circle_between_compression_modules():
    """Module-level imports inside nnunet_green.compression form no cycle (api used to import rank_selection
    and the other way round)."""
    import ast
    from pathlib import Path

    import nnunet_green.compression as pkg

    root = Path(pkg.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nnunet_green.compression."):
                deps.add(node.module.split(".")[2])
        graph[path.stem] = deps - {path.stem}
    graph.pop("__init__")
    done, active = set(), []

    def visit(mod):
        assert mod not in active, f"import circle: {' -> '.join(active + [mod])}"
        if mod in done:
            return
        active.append(mod)
        for dep in graph.get(mod, ()):
            visit(dep)
        active.pop()
        done.add(mod)

    assert {"api", "policies", "rank_selection", "cost"} <= set(graph)
    for mod in graph:
        visit(mod)


# ---------------------------------------------------------------- model folders (tiny, TotalSegmentator-shaped)

TINY_DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 1,
                "file_ending": ".nii.gz"}


def tiny_model_folder(root, network_class=None):
    """A TotalSegmentator-shaped model folder (3 stages, 8-32 features) with random weights and the dense
    model's training files nnU-Net's exporter asks for."""
    from nnunet_green.testing.totalseg import random_model_folder

    folder = random_model_folder(root, TINY_DATASET, network_class=network_class)
    (folder / "fold_0" / "progress.png").write_bytes(b"\x89PNG not really")
    (folder / "fold_0" / "validation").mkdir()
    (folder / "fold_0" / "validation" / "summary.json").write_text('{"foreground_mean": {"Dice": 0.5}}')
    return folder


GROUPED_NET = """
from torch import nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet


class GroupedUNet(PlainConvUNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        block = self.encoder.stages[1][0].convs[1]  # 16 -> 16, 3x3x3
        grouped = nn.Conv3d(16, 16, 3, padding=1, groups=4)
        block.conv = block.all_modules[0] = grouped
"""


def test_grouped_conv_is_left_dense_and_the_folder_compresses(tmp_path, monkeypatch):
    from nnunet_green.compression.model_folder import compress_model_folder
    from nnunet_green.nnunet_io import ModelFolder

    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "grouped_tiny.py").write_text(GROUPED_NET)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    src = tiny_model_folder(tmp_path / "w", network_class="grouped_tiny.GroupedUNet")
    out = tmp_path / "out"
    m = compress_model_folder(src, out, TuckerConfig(rank_ratio=0.5), speed_check=False)
    layer = {lay["name"]: lay for lay in m["layers"]}["encoder.stages.1.0.convs.1.conv"]
    assert not layer["factorized"] and "groups=4" in layer["reason"]
    assert any(lay["factorized"] for lay in m["layers"]) and m["verification"]["strict_load"]
    loaded = ModelFolder(out).load("0")  # the stock predictor's path
    assert loaded.network.encoder.stages[1][0].convs[1].conv.groups == 4


OLD_MANIFEST = {  # compression.json as the previous version wrote it (its exact keys; layers trimmed to one)
    "format": "nnunet-green-compression/1", "nnunet_green_version": "0.1.0", "created": "2026-12-02T01:12:29+00:00",
    "source": {"path": "SOURCE", "checkpoints": {"fold_0/checkpoint_final.pth": "66aa8dbd"}},
    "config": {"rank_ratio": 0.25, "budget": None, "budget_cost": None, "min_rank": 8, "round_to": 8, "half": False},
    "rank_rule": "uniform rank ratio 0.25", "configuration": "3d_fullres", "patch_size": [32, 64, 64], "folds": ["0"],
    "checkpoint": "checkpoint_final.pth",
    "totals": {"params_before": 85406, "params_after": 30110, "macs_before": 1557135360, "macs_after": 953942016,
               "decomposition_s": 3.149},
    "layers": [{"name": "encoder.stages.0.0.convs.0.conv", "aliases": ["encoder.stages.0.0.convs.0.all_modules.0"],
                "kind": "Conv3d", "in_channels": 1, "out_channels": 8, "kernel_size": [3, 3, 3], "stride": [1, 1, 1],
                "rank_in": None, "rank_out": None, "params_before": 224, "params_after": 224,
                "macs_before": 28311552, "macs_after": 28311552, "rel_error": None, "factorized": False,
                "reason": "channels (1->8) below min_rank=8: input stem / tiny head, that mode cannot be compressed",
                "seconds": 0.0}],
    "recovery": None, "trainer_name": "nnUNetTrainer_4000epochs_NoMirroring",
    "dense_network_class": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "verification": {"strict_load": True, "input_shape": [1, 1, 16, 16, 16], "forward_rel_diff": {"fold_0": 0.97}},
}


def test_manifest_keys_and_old_manifests_still_read(tmp_path):
    """compression.json is written through contract.CompressionManifest with the previous version's keys (plus
    carried_over); a folder compressed the old way (same plans.json and checkpoint, old manifest, no carried-over
    files) still reads and loads through the stock predictor's path."""
    from nnunet_green.compression.model_folder import compress_model_folder
    from nnunet_green.contract import CompressionManifest
    from nnunet_green.nnunet_io import ModelFolder

    src = tiny_model_folder(tmp_path / "w")
    out = tmp_path / "out"
    m = compress_model_folder(src, out, TuckerConfig(rank_ratio=0.25), speed_check=False)
    written = json.loads((out / "compression.json").read_text())
    later = {"carried_over", "fast_path", "decomposition", "calibration", "layer_timing"}  # added since OLD_MANIFEST
    assert written == m and set(written) == set(OLD_MANIFEST) | later
    assert written["decomposition"] == "weight-only" and written["calibration"] is None
    assert set(written["totals"]) == set(OLD_MANIFEST["totals"])
    assert written["layer_timing"] is None  # the speed rule "macs" (default) times nothing
    assert set(written["config"]) == set(OLD_MANIFEST["config"]) | {"speed_rule"}
    assert written["config"]["speed_rule"] == "macs"
    assert set(written["layers"][0]) == set(OLD_MANIFEST["layers"][0]) | {"decomposition", "est_output_rel_error",
                                                                         "input_rank_deficient", "timing"}
    assert written["carried_over"] == {"fold_0/progress.png": "training curves of the dense source model",
                                       "fold_0/validation/summary.json": "validation metrics of the dense source model"}
    assert (out / "fold_0" / "progress.png").read_bytes() == (src / "fold_0" / "progress.png").read_bytes()

    old = CompressionManifest.from_json(copy.deepcopy(OLD_MANIFEST))
    assert old.rule_label == "ratio 0.25" and old.carried_over == {} and old.extra == {}
    assert math.isclose(old.kept_fraction, 30110 / 85406)
    assert {k: v for k, v in old.to_json().items() if k not in later} == OLD_MANIFEST

    # the old way: the previous version wrote the same plans.json and checkpoint, and no carried-over files
    for rel in written["carried_over"]:
        (out / rel).unlink()
    (out / "fold_0" / "validation").rmdir()
    old_json = {**OLD_MANIFEST, "source": written["source"], "layers": written["layers"]}
    (out / "compression.json").write_text(json.dumps(old_json, indent=2))
    folder = ModelFolder(out)
    assert folder.is_compressed and folder.manifest().rule_label == "ratio 0.25"
    compressed, dense = folder.load("0"), ModelFolder(src).load("0")
    assert any(isinstance(mod, TuckerConv) for mod in compressed.network.modules())
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        a, b = dense.network.eval()(x), compressed.network.eval()(x)
    assert b.shape == a.shape == (1, 3, 32, 64, 64) and torch.isfinite(b).all()


def test_budgeted_manifest_has_what_readers_key_on(tmp_path):
    """A budgeted model's ratio is null (its ranks follow no single ratio); budget, cost, rule and totals say
    what it is, and CompressionManifest.rule_label / kept_fraction read them."""
    from nnunet_green.compression.model_folder import compress_model_folder
    from nnunet_green.contract import CompressionManifest

    m = compress_model_folder(tiny_model_folder(tmp_path / "w"), tmp_path / "out",
                              TuckerConfig(budget=0.7, budget_cost="macs"))
    assert m["config"]["rank_ratio"] is None
    assert m["config"]["budget"] == 0.7 and m["config"]["budget_cost"] == "macs"
    assert m["rank_rule"].startswith("budgeted ranks: 0.7 of the factorizable layers' macs")
    manifest = CompressionManifest.read(tmp_path / "out" / "compression.json")
    assert manifest.rule_label == "budget 0.7 macs"
    t = m["totals"]
    assert manifest.kept_fraction == t["params_after"] / t["params_before"] < 1
    assert t["macs_after"] < t["macs_before"]
