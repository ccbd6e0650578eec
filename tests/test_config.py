"""Presets, the flat-dict round trip, and validation that names the field, the value and what is allowed."""

import dataclasses
import math

import pytest

from stawm import PRESETS, Config, ConfigError, preset
from stawm.config import field_types


def test_presets_carry_the_papers_values():
    c8 = preset("mnist-class-8")
    assert (c8.glimpse_size, c8.glimpses, c8.memory_size, c8.hidden_size) == (8, 8, 256, 512)
    assert (c8.delta, c8.eta, c8.theta) == (0.2, 0.4, 0.5)
    assert (c8.batch_size, c8.lr, c8.dropout, c8.grad_clip, c8.epochs) == (128, 1e-3, 0.5, 5.0, 200)
    assert c8.lr_milestones == (50, 100, 150, 190, 195) and c8.context_channels == (64, 128, 256)
    c28 = preset("mnist-class-28")
    assert (c28.glimpse_size, c28.glimpses, c28.memory_size, c28.glimpse_strides) == (28, 10, 512, (2, 2, 2))
    assert preset("mnist-draw-6").glimpses == 12 and preset("mnist-draw-6").glimpse_channels == (128,)
    assert preset("mnist-sketchpad").epochs == 20
    cifar = preset("cifar-class-mobilenetv2")
    assert (cifar.memory_size, cifar.hidden_size, cifar.epochs, cifar.lr_milestones) == (1024, 2048, 300, (150, 250))
    celeba = preset("celeba-draw-32")
    assert (celeba.canvas, celeba.glimpses, celeba.dropout, celeba.context_kernel) == ("bernoulli", 8, 0.3, 4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_flat_dict_round_trip(name):
    cfg = preset(name)
    flat = cfg.to_flat()
    assert all(isinstance(v, (int, float, str, bool, list)) for v in flat.values())
    assert Config.from_flat(flat) == cfg


def test_round_trip_from_mlflow_strings():
    cfg = preset("mnist-class-8", learnable_rates=True)
    as_strings = {k: str(v) for k, v in cfg.to_flat().items()}
    assert Config.from_flat(as_strings) == cfg
    assert field_types()["context_channels"] is tuple and field_types()["learnable_rates"] is bool


def test_overrides_field_by_field():
    cfg = preset("mnist-class-8", memory_size=128, glimpses=4)
    assert (cfg.memory_size, cfg.hidden_size, cfg.glimpses) == (128, 256, 4)  # hidden derived 2M, written back
    assert cfg.replace(delta=0.3).delta == 0.3


@pytest.mark.parametrize("changes, field, allowed", [
    (dict(glimpse_size=0), "glimpse_size", "between 1 and the image size"),
    (dict(glimpse_size=29), "glimpse_size", "between 1 and the image size (28)"),
    (dict(glimpses=0), "glimpses", "at least 1"),
    (dict(memory_size=0), "memory_size", "at least 1"),
    (dict(activation="tanh"), "activation", "choose one of"),
    (dict(canvas="oil"), "canvas", "choose one of"),
    (dict(delta=math.nan), "delta", "finite"),
    (dict(theta=math.inf), "theta", "finite"),
])
def test_invalid_values_name_field_value_and_allowed(changes, field, allowed):
    with pytest.raises(ConfigError) as err:
        preset("mnist-class-8", **changes)
    message = str(err.value)
    assert message.startswith(f"{field}=") and repr(next(iter(changes.values()))) in message and allowed in message


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset 'mnist-9'.*mnist-class-8"):
        preset("mnist-9")
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['glimpse'\]"):
        Config.from_flat({"glimpse": 3})
    with pytest.raises(ConfigError, match="glimpses='many' is not a valid int"):
        Config.from_flat({"glimpses": "many"})


def test_glimpse_cnn_that_leaves_nothing_is_rejected():
    with pytest.raises(ConfigError, match="glimpse_channels.*leave nothing of a 4x4 input"):
        preset("mnist-class-8", glimpse_size=4)


def test_unstable_rates_are_legal_configs():
    cfg = preset("mnist-class-8", delta=1.5, eta=-0.1, theta=0.0)  # the stability studies explore these
    assert (cfg.delta, cfg.eta) == (1.5, -0.1)


def test_presets_follow_the_paper_where_it_speaks_and_the_authors_where_it_is_silent():
    c8 = preset("mnist-class-8")
    assert c8.learnable_rates and c8.rotation_interpolation == "nearest" and c8.lr_schedule == "paper"
    assert not c8.authors_code and c8.query_dropout == 0.5 and c8.nll_reduction == "mean"
    pad = preset("mnist-sketchpad")  # Appendix D: the glimpse CNN of the 6 x 6 drawing model, S_g = 8
    assert (pad.glimpse_size, pad.glimpse_channels, pad.glimpses, pad.query_dropout) == (8, (128,), 6, 0.0)
    assert (pad.nll_reduction, pad.draw_loss_scale, pad.class_loss_scale) == ("sum", 1.0, 1.0)
    celeba = preset("celeba-draw-32")  # Appendix D's rates and dropout; the authors' blocks
    assert (celeba.lr, celeba.dropout, celeba.lr_schedule, celeba.epochs, celeba.beta) == (
        1e-3, 0.3, "exponential", 250, 2.0)
    assert (celeba.context_padding, celeba.glimpse_padding, celeba.batch_norm, celeba.conv_init) == (
        (1, 1, 1, 1), (2, 1, 1, 1), False, "default")
    assert celeba.decoder_output_padding and preset("mnist-draw-8").decoder_order == "mirror"
    assert not preset("tiny").learnable_rates  # the quick studies' preset keeps its rates fixed


# Every field in which the authors' script for a preset differs from the preset (tests/test_model.py checks
# what each changes in the networks).
AUTHORS_DIFFERENCES = {
    "mnist-class-8": {"lr_schedule": "exponential"},
    "mnist-class-28": {"lr_schedule": "exponential", "glimpses": 8},
    "mnist-draw-8": {"decoder_order": "forward"},
    "mnist-sketchpad": {"glimpse_channels": (64, 128), "glimpse_strides": (1, 2), "decoder_order": "forward"},
    "celeba-draw-32": {"dropout": 0.5, "lr": 1e-4, "lr_schedule": "constant", "epochs": 100,
                       "decoder_output_padding": False, "eval_sample": False},
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_authors_code_differs_from_the_preset_in_named_fields_only(name):
    paper, authors = preset(name), preset(name, authors_code=True)
    differ = {k: v for k, v in dataclasses.asdict(authors).items() if dataclasses.asdict(paper)[k] != v}
    assert differ == {"authors_code": True, **AUTHORS_DIFFERENCES.get(name, {})}
    assert Config.from_flat(authors.to_flat()) == authors  # the record round-trips, as MLflow params
    assert preset(name, authors_code="true") == authors  # as a --set value: the mode, not a bare flag


def test_new_fields_are_validated_naming_the_field():
    with pytest.raises(ConfigError, match=r"context_padding=\(1, 1\) is not allowed: \(\) for none, or one padding"):
        preset("mnist-class-8", context_padding=(1, 1))
    with pytest.raises(ConfigError, match="conv_init='he' is not allowed: choose one of"):
        preset("mnist-class-8", conv_init="he")
    with pytest.raises(ConfigError, match="rotation_interpolation='bicubic' is not allowed"):
        preset("mnist-class-8", rotation_interpolation="bicubic")
    with pytest.raises(ConfigError, match="decoder_order='backward' is not allowed"):
        preset("mnist-draw-8", decoder_order="backward")
    with pytest.raises(ConfigError, match="nll_reduction='max' is not allowed"):
        preset("mnist-sketchpad", nll_reduction="max")
    # CelebA's glimpse CNN on 2 x 2: 2 -> 3 (padding 2) -> 1 -> 0: nothing left
    with pytest.raises(ConfigError, match="leave nothing of a 2x2 input"):
        preset("celeba-draw-32", glimpse_size=2)
