"""The per-layer speed rule (compression/layer_timing.py, policies.MeasuredSpeed, TuckerConfig.speed_rule): a layer
stays dense when its factorization is not faster on this machine. Decisions are tested with given timings (an
injected timer), so nothing here depends on how busy the machine is; one real call checks the clock's records."""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import pytest
import torch

from test_compression_core import plain_unet, tiny_model_folder
from nnunet_green.compression import (LayerTiming, MeasuredSpeed, TuckerConfig, UniformRanks, input_shapes,
                                      speed_verdict, tucker_)
from nnunet_green.compression import layer_timing
from nnunet_green.compression.fast_folder import slower_warning

pytestmark = pytest.mark.filterwarnings("ignore")
SHAPE = (1, 1, 16, 24, 16)


def by_channels(conv, ranks, shape) -> LayerTiming:
    """Given timings: factorizing is 2x slower for layers with <= 16 input channels (high resolution, few
    channels: the expected losers), 2x faster for the others."""
    slow = conv.in_channels <= 16
    return LayerTiming(tuple(shape), 10.0, 20.0 if slow else 5.0, threads=1, repeats=3)


def test_verdict_from_given_timings():
    shape = (1, 32, 40, 48, 40)
    assert speed_verdict(LayerTiming(shape, 10.0, 9.0, 2, 3)) is None  # 10 % faster: pays at the 5 % margin
    slower = speed_verdict(LayerTiming(shape, 10.0, 12.5, 2, 3))
    assert slower == ("factorizing is slower on this machine: 12.50 ms factorized vs 10.00 ms dense at input "
                      "(1, 32, 40, 48, 40), 2 threads")
    assert "less than 5% faster" in speed_verdict(LayerTiming(shape, 10.0, 9.8, 2, 3))
    assert speed_verdict(LayerTiming(shape, 10.0, 9.8, 2, 3), margin=0.0) is None


def test_measured_rule_keeps_the_slower_layers_dense():
    net = plain_unet(3, [8, 16, 32], 3)
    base = UniformRanks(0.5, min_rank=4, round_to=4)
    plan0 = base.plan(net)
    plan = MeasuredSpeed(base, timer=by_channels).plan(net, input_shape=SHAPE)
    shapes = input_shapes(net, SHAPE)
    slow = {n for n in plan0.ranks if shapes[n][1] <= 16}
    assert slow and slow != set(plan0.ranks)
    assert set(plan.ranks) == set(plan0.ranks) - slow
    for name in slow:
        assert plan.dense[name].startswith("factorizing is slower on this machine: 20.00 ms factorized vs 10.00 ms")
        assert f"at input {shapes[name]}" in plan.dense[name]
    assert plan.rule == base.describe() + MeasuredSpeed.SUFFIX
    # the records carry the timings; factorized layers are the faster ones
    records = tucker_(copy.deepcopy(net), MeasuredSpeed(base, timer=by_channels), input_shape=SHAPE)
    timed = {r.name: r for r in records if r.timing}
    assert set(timed) == set(plan0.ranks)
    for name, r in timed.items():
        t = r.timing
        assert t["dense_ms"] == 10.0 and t["input_shape"] == list(shapes[name]) and t["ranks"] == list(plan0.ranks[name])
        assert r.factorized == (name not in slow) and (t["verdict"] is None) == r.factorized
        assert t["speedup"] == (0.5 if name in slow else 2.0)
    summary = layer_timing.timing_summary([r.to_dict() for r in records], load_avg=0.5)
    assert "warning" not in summary and summary["load_avg"] == 0.5
    busy = layer_timing.timing_summary([r.to_dict() for r in records], load_avg=os.cpu_count() + 2.0)
    assert "the machine was busy while the layers were timed" in busy["warning"]
    assert summary["kept_dense"] == sorted(slow, key=[r.name for r in records].index) and summary["timed"] == len(timed)
    kept_params = sum(timed[n].timing["dense_params"] - timed[n].timing["factorized_params"] for n in slow)
    assert summary["params_kept_dense"] == kept_params > 0
    assert summary["timed_layers_ms"] == {"dense": 10.0 * len(timed), "all_factorized": 20.0 * len(slow) +
                                          5.0 * (len(timed) - len(slow)),
                                          "as_planned": 10.0 * len(slow) + 5.0 * (len(timed) - len(slow))}


def test_time_bound_leaves_the_rest_to_the_multiply_add_rule():
    net = plain_unet(3, [8, 16, 32], 3)
    base = UniformRanks(0.5, min_rank=4, round_to=4)

    def slow_timer(conv, ranks, shape):
        time.sleep(0.05)
        return by_channels(conv, ranks, shape)

    plan = MeasuredSpeed(base, max_seconds=0.08, timer=slow_timer).plan(net, input_shape=SHAPE)
    timed = [n for n, t in plan.timings.items() if "dense_ms" in t]
    untimed = [n for n, t in plan.timings.items() if "untimed" in t]
    assert 1 <= len(timed) <= 2 and untimed and len(timed) + len(untimed) == len(base.plan(net).ranks)
    for name in untimed:  # the base rule's decision stands, and the record says so
        assert name in plan.ranks and "time bound of 0.08 s" in plan.timings[name]["untimed"]
        assert "multiply-add rule" in plan.timings[name]["untimed"]
    # the largest dense multiply-adds are timed first (where the time is)
    shapes = input_shapes(net, SHAPE)
    convs = dict(net.named_modules())
    macs = {n: layer_timing._dense_macs(convs[n], shapes[n]) for n in plan.timings}
    assert min(macs[n] for n in timed) >= max(macs[n] for n in untimed)


def test_real_timing_records_and_full_rank_still_matches():
    """One real (tiny) timed call: every planned layer has a record from the clock, and at full rank the model
    reproduces the dense output whichever layers the timings kept dense."""
    torch.manual_seed(0)
    dense = plain_unet(3, [8, 16], 3).eval()
    net = copy.deepcopy(dense)
    records = tucker_(net, TuckerConfig(rank_ratio=1.0, speed_rule="measured"), input_shape=SHAPE)
    timed = [r for r in records if r.timing]
    assert timed and all(r.timing["dense_ms"] > 0 and r.timing["factorized_ms"] > 0 for r in timed)
    assert all(r.timing["threads"] == torch.get_num_threads() and r.timing["repeats"] == 3 for r in timed)
    assert all(r.factorized == (r.timing["verdict"] is None) for r in timed)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        a, b = dense(x), net(x)
    assert float((a - b).norm() / a.norm()) < 1e-4


def test_bad_speed_rule_settings_say_which():
    for bad in ("fast", "", None, True, "MEASURED"):
        with pytest.raises(ValueError, match="speed_rule must be one of 'macs', 'measured'"):
            TuckerConfig(speed_rule=bad)
    for kwargs, field in ((dict(margin=1.0), "margin"), (dict(margin=-0.1), "margin"),
                          (dict(max_seconds=0), "max_seconds"), (dict(max_seconds=float("nan")), "max_seconds")):
        with pytest.raises(ValueError, match=field):
            MeasuredSpeed(UniformRanks(), **kwargs)
    with pytest.raises(ValueError, match="input_shape"):
        tucker_(plain_unet(3, [8, 16], 3), TuckerConfig(speed_rule="measured"))
    assert TuckerConfig().speed_rule == "macs" and TuckerConfig().policy() == UniformRanks()
    assert TuckerConfig(speed_rule="measured").policy() == MeasuredSpeed(UniformRanks())
    assert TuckerConfig(speed_rule="measured").ranks_from_first_fold and not TuckerConfig().ranks_from_first_fold


def test_cli_flag_in_help_and_recorded_in_compression_json(tmp_path, monkeypatch, capsys):
    from nnunet_green.compression.cli import build_parser, main

    assert "--speed-rule {macs,measured}" in build_parser().format_help()
    monkeypatch.setattr(layer_timing, "time_factorization", by_channels)  # the clock, replaced by given timings
    src = tiny_model_folder(tmp_path / "w")
    out = tmp_path / "out"
    assert main(["-i", str(src), "-o", str(out), "-q", "--rank-ratio", "0.5", "--speed-rule", "measured",
                 "--no-fast-path"]) == 0
    stdout = capsys.readouterr().out
    m = json.loads((out / "compression.json").read_text())
    assert m["config"]["speed_rule"] == "measured" and m["rank_rule"].endswith(MeasuredSpeed.SUFFIX)
    timing = m["layer_timing"]
    kept = [lay["name"] for lay in m["layers"] if lay["timing"] and lay["timing"]["verdict"]]
    assert kept and timing["kept_dense"] == kept and timing["untimed"] == [] and timing["margin"] == 0.05
    for lay in m["layers"]:
        if lay["name"] in kept:
            assert not lay["factorized"] and lay["reason"] == lay["timing"]["verdict"]
            assert lay["timing"]["input_shape"][1] <= 16
    assert f"{len(kept)} kept dense" in stdout and f"{timing['params_kept_dense']:,} parameters more" in stdout
    # the default rule times nothing and says so in the config
    assert main(["-i", str(src), "-o", str(tmp_path / "macs"), "-q", "--rank-ratio", "0.5", "--no-fast-path"]) == 0
    m = json.loads((tmp_path / "macs" / "compression.json").read_text())
    assert m["config"]["speed_rule"] == "macs" and m["layer_timing"] is None
    assert all(lay["timing"] is None for lay in m["layers"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["-i", str(src), "-o", str(tmp_path / "bad"), "--speed-rule", "fast"])
    assert e.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def test_slower_warning_says_what_the_user_can_do():
    speed = {"speedup": 0.95, "input_shape": [1, 1, 40, 48, 40], "threads": 2, "fast_path_used": False}
    text = slower_warning(speed, "macs", "unavailable")
    assert "0.95x at input (1, 1, 40, 48, 40), 2 threads, eager PyTorch" in text
    for option in ("--speed-rule measured", "--rank-ratio", "install onnx and onnxruntime", "GPU"):
        assert option in text
    done = slower_warning(speed, "measured", "unsupported")  # only what was not done, and what can apply
    assert "--speed-rule" not in done and "fast CPU path" not in done and "--rank-ratio" in done and "GPU" in done
    fast = slower_warning({**speed, "fast_path_used": True}, "macs", "built")
    assert "fast CPU path)" in fast and "--speed-rule" not in fast and "GPU" in fast


def test_whole_model_checked_without_onnxruntime(tmp_path, monkeypatch):
    """Never slower without saying so: without onnxruntime the compressed model runs eagerly, and compression still
    times it against the dense one (the record, and the warning where it is slower)."""
    from nnunet_green.compression.model_folder import compress_model_folder

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    m = compress_model_folder(tiny_model_folder(tmp_path / "w"), tmp_path / "out", TuckerConfig(rank_ratio=0.5))
    fast = m["fast_path"]
    assert fast["status"] == "unavailable" and "onnxruntime" in fast["reason"]
    measured = fast["measured"]
    assert measured["fast_path_used"] is False and measured["dense_s"] > 0 and measured["compressed_s"] > 0
    assert ("warning" in fast) == (measured["speedup"] < 1.0)
