"""The training loop with one member (a plain run): the textbook loop bit for bit, seeds, exact resume,
checkpoints, schedules, divergence, and a tiny model that learns. (K fused members: tests/test_fused.py.)"""


import pytest
import torch

from stawm import STAWM, preset
from stawm.train import CHECKPOINT, CheckpointError, train
from stawm.train.checkpoints import member_weights
from stawm.train.data import iterate_batches, load_data, prepare_batch
from stawm.train.loop import lr_factor
from stawm.train.step import EpochStats, OneModel

QUICK = dict(epochs=2, max_steps=4)  # tiny preset: a few CPU seconds


def records(cfg, **kw):
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_second", "peak_memory_mb")}
            for (r,) in train([cfg], **kw)]


def test_one_member_is_the_textbook_loop_bit_for_bit(tmp_path):
    """The loop with one member against the plain loop written out here (seed, build, Adam, clip by value,
    each epoch's rate from the schedule): the same losses and, bit for bit, the same weights. Augmentation,
    dropout and a schedule that changes the rate each epoch make every random stream and the rate count."""
    cfg = preset("tiny", dataset="mnist-sample", augment="rotate", dropout=0.2, lr_schedule="exponential",
                 lr_decay=0.5, epochs=2, max_steps=3)
    data = load_data("mnist-sample")
    losses = [r["train_loss"] for r in records(cfg, data=data, checkpoint_dir=tmp_path)]

    torch.manual_seed(cfg.seed)  # the reference: what a plain PyTorch loop does with the same seed
    generator = torch.Generator().manual_seed(cfg.seed)
    model = STAWM(cfg).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    expected = []
    for epoch in range(cfg.epochs):
        optimizer.param_groups[0]["lr"] = cfg.lr * cfg.lr_decay**epoch
        total = 0.0
        batches = iterate_batches(data.train, cfg.batch_size, generator=generator, shuffle=True, drop_last=True)
        for _, (images, labels) in zip(range(cfg.max_steps), batches):
            x01 = prepare_batch(images, augment="rotate", generator=generator, rotation_degrees=cfg.rotation_degrees,
                                rotation_interpolation=cfg.rotation_interpolation)
            x = (x01 - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(1, -1, 1, 1)
            loss, _ = model.loss(model(x), x01, labels)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(model.parameters(), cfg.grad_clip)  # the preset clips by value
            optimizer.step()
            total += float(loss.detach())
        expected.append(total / cfg.max_steps)

    assert (cfg.normalize, cfg.grad_clip_mode) == (True, "value")
    assert losses == pytest.approx(expected, rel=1e-6)  # sums of the same float32 losses, in another order
    weights = member_weights(tmp_path / CHECKPOINT)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_same_seed_gives_identical_metrics():
    cfg = preset("tiny", augment="rotate", dropout=0.2, epochs=2, max_steps=2)  # augmentation, dropout draw too
    assert records(cfg) == records(cfg)
    assert records(cfg)[-1]["train_loss"] != records(cfg.replace(seed=1))[-1]["train_loss"]


def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path):
    cfg = preset("tiny", augment="rotate", dropout=0.2, epochs=3, max_steps=3)
    straight = records(cfg, checkpoint_dir=tmp_path / "a")
    run = train([cfg], checkpoint_dir=tmp_path / "b")
    next(run)
    run.close()  # killed after epoch 1: only its checkpoint survives
    resumed = records(cfg, checkpoint_dir=tmp_path / "b", resume=True)
    assert [r["epoch"] for r in resumed] == [2, 3]
    assert resumed == straight[1:]
    a, b = member_weights(tmp_path / "a" / CHECKPOINT), member_weights(tmp_path / "b" / CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(path / CHECKPOINT, weights_only=True)["members"]["optimizer"]["state"]
            for path in (tmp_path / "a", tmp_path / "b"))  # Adam's moments too
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_corrupt_or_mismatched_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    cfg = preset("tiny", epochs=1, max_steps=2)
    records(cfg, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="memory_size: checkpoint 32 vs now 16"):
        next(train([cfg.replace(memory_size=16, epochs=2)], checkpoint_dir=tmp_path, resume=True))
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        next(train([cfg.replace(epochs=2)], checkpoint_dir=tmp_path, resume=True))
    torch.save({"model": {}, "epoch": 1}, tmp_path / CHECKPOINT)  # what stawm wrote before the loops merged
    with pytest.raises(CheckpointError, match="is not a STAWM checkpoint of format 'stawm-3' \\(no format\\)"):
        next(train([cfg.replace(epochs=2)], checkpoint_dir=tmp_path, resume=True))


def test_paper_schedule_by_hand():
    cfg = preset("mnist-class-8")
    assert lr_factor(cfg, 0) == 1.0
    assert lr_factor(cfg, 49) == pytest.approx(0.99**49)
    assert lr_factor(cfg, 50) == pytest.approx(0.99**50 * 0.1)
    assert lr_factor(cfg, 196) == pytest.approx(0.99**196 * 1e-5)
    assert lr_factor(cfg.replace(lr_schedule="exponential"), 196) == pytest.approx(0.99**196)


def test_records_carry_the_contract():
    (r,) = next(train([preset("tiny", epochs=1, max_steps=2)]))
    for key in ("epoch", "train_loss", "train_accuracy", "test_error", "delta", "eta", "theta", "max_abs_w",
                "max_readout", "readout_dead", "readout_saturated", "memory_bound_ratio", "epoch_seconds",
                "images_per_second", "lr", "peak_memory_mb", "stability_ok", "stability_flags", "diverged",
                "stability"):
        assert key in r, key
    assert 0 <= r["test_error"] <= 1 and r["stability_ok"] and r["stability"]["ok"]
    assert 0 <= r["readout_dead"] + r["readout_saturated"] <= 1 and 0 < r["memory_bound_ratio"] <= 1 + 1e-4


def test_drawing_records_reconstruction():
    cfg = preset("mnist-draw-6", dataset="mnist-sample", memory_size=16, hidden_size=32, glimpses=2,
                 batch_size=32, epochs=1, max_steps=2, augment="none")
    (r,) = next(train([cfg]))
    assert r["recon_loss"] > 0 and r["kl"] >= 0 and r["test_recon_loss"] > 0 and "test_error" not in r


def test_overflowing_memory_diverges_and_stops():
    # eta = 1e38: one Hebbian write overflows float32, so W, the loss and the gradients go non-finite
    out = [r for (r,) in train([preset("tiny", eta=1e38, epochs=3, max_steps=2)])]
    assert len(out) == 1 and out[0]["diverged"]
    assert out[0]["stability_flags"] == [] and "test_error" not in out[0]  # diverging is an outcome, not a flag


def test_validation_split_is_reported():
    (r,) = next(train([preset("tiny", validation_size=200, epochs=1, max_steps=1)]))
    assert 0 <= r["val_error"] <= 1


def test_tiny_model_fits_64_digits():
    cfg = preset("tiny", batch_size=64)
    data = load_data("mnist-sample")
    x = prepare_batch(data.train.images[:64], augment="none", generator=None)
    y = data.train.labels[:64]
    member = OneModel(cfg, torch.device("cpu"))
    for _ in range(40):  # 20 steps reach 100% here; 40 leaves room across platforms
        member.step(x[None], x[None], y[None], EpochStats.zeros("cpu", 1))
    model = member.model.eval()
    with torch.no_grad():
        accuracy = float((model(x).log_probs.argmax(1) == y).float().mean())
    assert accuracy >= 0.95
