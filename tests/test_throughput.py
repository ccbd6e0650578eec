"""The throughput benchmark end to end (--quick, through a subprocess), and the engine's speed options.

No timing assertions: timings on shared CI machines are noise. What is checked is that every variant
runs, reports, and that the speed options change nothing by default and little when asked for.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stawm import preset
from stawm.train import train
from stawm.train.data import DataBundle, load_data

REPO = Path(__file__).resolve().parents[1]
TIMING = ("epoch_seconds", "images_per_second", "peak_memory_mb")


@pytest.fixture(scope="module")
def data() -> DataBundle:
    full = load_data("mnist-sample")
    return DataBundle(train=full.train.subset(torch.arange(256)), val=None, test=full.test.subset(torch.arange(64)),
                      num_classes=full.num_classes, mean=full.mean, std=full.std)


def records(cfg, **kw):
    return [{k: v for k, v in r.items() if k not in TIMING} for (r,) in train([cfg], **kw)]


def test_quick_benchmark_runs_every_variant_and_reports_accuracy(tmp_path):
    # --skip c: starting Ray and its trial processes alone takes 15-20 s on 2 cores; `packed_trial` is tested below
    out = tmp_path / "throughput.json"
    done = subprocess.run([sys.executable, str(REPO / "studies" / "throughput.py"), "--quick", "--skip", "c",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| variant | K | options | s/epoch | full-epoch s | images/s |" in done.stdout
    report = json.loads(out.read_text())
    rows = {(r["variant"], r["K"], r["options"]) for r in report["rows"]}
    assert {("a", 1, ""), ("b", 1, "none/fp32"), ("d", 1, "none/fp32"), ("d", 2, "none/fp32")} <= rows, report["notes"]
    for r in report["rows"]:
        assert r["images_per_second"] > 0 and r["seconds_per_epoch"] > 0
        assert 0 <= r["test_error"] <= 1, r
    assert report["accuracy"]["baseline"] is not None and report["accuracy"]["engine"] is not None
    assert "(a) baseline" in done.stdout and "(b) engine" in done.stdout and "Accuracy check" in done.stdout


def test_a_packed_trial_reports_each_epoch_with_its_training_window():
    from stawm.bench.benchmark import packed_trial

    cfg = preset("tiny", epochs=2, max_steps=1)
    reports = []
    packed_trial({"cfg": cfg.to_flat(), "device": "cpu", "data_root": None, "compile": "none", "precision": "fp32",
           "threads": 1, "memory_fraction": 1.0}, reports.append)
    assert [r["epoch"] for r in reports] == [1, 2]
    assert all(r["start"] < r["end"] and 0 <= r["test_error"] <= 1 for r in reports)
    assert reports[0]["end"] <= reports[1]["start"]


def test_speed_options_are_off_by_default_and_checked(data):
    cfg = preset("tiny", epochs=1, max_steps=2)
    assert records(cfg, data=data) == records(cfg, data=data, compile="none", precision="fp32")
    with pytest.raises(ValueError, match="compile='fast' is not allowed"):
        next(train([cfg], data=data, compile="fast"))
    with pytest.raises(ValueError, match="precision='fp16' is not allowed"):
        next(train([cfg], data=data, precision="fp16"))


def test_bf16_autocast_trains_with_the_same_records(data):
    cfg = preset("tiny", epochs=1, max_steps=3)
    fp32, bf16 = records(cfg, data=data), records(cfg, data=data, precision="bf16")
    assert fp32[0].keys() == bf16[0].keys()
    assert bf16[0]["train_loss"] == pytest.approx(fp32[0]["train_loss"], abs=0.05)  # bf16 keeps ~3 digits
    assert bf16[0]["stability_ok"] and 0 <= bf16[0]["test_error"] <= 1


def test_compiled_model_runs_the_training_and_evaluation_steps(data, monkeypatch):
    # inductor takes minutes on 2 CPU cores; aot_eager traces the same graphs (forward and backward) in seconds
    calls, real = [], torch.compile

    def traced(model, mode=None, dynamic=None):
        calls.append((mode, dynamic))
        return real(model, backend="aot_eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", traced)
    cfg = preset("tiny", epochs=1, max_steps=2, glimpses=1)  # one glimpse: a shorter graph to trace
    compiled = records(cfg, data=data, compile="reduce-overhead")
    assert calls == [("reduce-overhead", False)]  # static shapes
    for key in ("train_loss", "train_accuracy", "test_error", "max_abs_w", "readout_dead", "readout_saturated"):
        assert compiled[0][key] == pytest.approx(records(cfg, data=data)[0][key], abs=1e-4), key
