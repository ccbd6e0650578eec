"""The STAWM configuration: one typed dataclass, the Appendix D presets, and validation.

A Config round-trips through a flat dict of plain values (`to_flat` / `from_flat`): Ray Tune
search spaces set that dict, MLflow records it as params, the results library groups by it.
This module knows plain values only (no torch, Ray or MLflow).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from .schema import ParamError, parse_value

TASKS = ("classify", "draw", "sketchpad", "selfsup")
DATASETS = ("mnist", "mnist-sample", "cifar10", "celeba")
ACTIVATIONS = ("relu6", "sigmoid")
CANVASES = ("none", "addition", "bernoulli")
GLIMPSE_CNNS = ("conv", "mobilenetv2")
WHERE_SOURCES = ("pose", "rnn")
INVERSE_TRANSFORMS = ("learned", "inverse")
LR_SCHEDULES = ("paper", "exponential", "constant")
CLIP_MODES = ("value", "norm", "none")
AUGMENTATIONS = ("rotate", "crop-flip", "none")
INTERPOLATIONS = ("nearest", "bilinear")
CONV_INITS = ("xavier", "default")
DECODER_ORDERS = ("mirror", "forward")
REDUCTIONS = ("mean", "sum")
# The fields that take one of a few names: validation checks them, and their flags offer the names (stawm.flags).
CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS, "dataset": DATASETS, "activation": ACTIVATIONS, "canvas": CANVASES, "glimpse_cnn": GLIMPSE_CNNS,
    "where_source": WHERE_SOURCES, "inverse_transform": INVERSE_TRANSFORMS, "lr_schedule": LR_SCHEDULES,
    "grad_clip_mode": CLIP_MODES, "augment": AUGMENTATIONS, "rotation_interpolation": INTERPOLATIONS,
    "conv_init": CONV_INITS, "decoder_order": DECODER_ORDERS, "nll_reduction": REDUCTIONS,
}


class ConfigError(ParamError):
    """A configuration value is out of range or of the wrong kind; the message names the field."""


@dataclass
class Config:
    # --- what is trained, on what ---------------------------------------------------------------
    preset: str = "mnist-class-8"  # the Appendix D configuration these values started from
    authors_code: bool = False  # they started from the authors' script for it instead: preset(name, authors_code=True)
    task: str = "classify"  # classify | draw | sketchpad | selfsup
    dataset: str = "mnist"  # mnist | mnist-sample | cifar10 | celeba
    image_size: int = 28  # side of the (square) input image in pixels
    channels: int = 1  # image channels
    num_classes: int = 10  # classes of the classification head
    # --- attention ------------------------------------------------------------------------------
    glimpse_size: int = 8  # S_g: side of each glimpse in pixels
    glimpses: int = 8  # N: glimpses per image
    align_corners: bool = True  # affine_grid/grid_sample convention (the authors' 2018 PyTorch behaved as True)
    # "pose": where = Linear(6 -> M)(A), the pose pathway (authors' code); "rnn": from the emission output
    where_source: str = "pose"
    # --- Hebb-Rosenblatt memory (Eq. 2) ---------------------------------------------------------
    memory_size: int = 256  # M: W is M x M per image
    delta: float = 0.2  # decay rate of W
    eta: float = 0.4  # learning rate of the Hebbian increment
    theta: float = 0.5  # Rosenblatt identity term
    # The paper: "for some of the experiments these are learnable", without saying which; in every one of the
    # authors' scripts they are (the published numbers were trained so), hence learnable in every paper preset.
    learnable_rates: bool = True  # train delta, eta, theta with the optimiser; False: fixed constants
    activation: str = "relu6"  # sigma of memory layers I and II: relu6 | sigmoid
    # --- networks -------------------------------------------------------------------------------
    hidden_size: int = 0  # LSTM hidden size; 0 means 2 * memory_size (Appendix D), written back
    context_channels: tuple[int, ...] = (64, 128, 256)  # context CNN filters per layer
    context_strides: tuple[int, ...] = (2, 2, 2)  # context CNN strides per layer
    context_kernel: int = 3  # context CNN kernel side
    context_padding: tuple[int, ...] = ()  # zero padding per context CNN layer; () = none (authors' MNIST blocks)
    glimpse_cnn: str = "conv"  # conv | mobilenetv2 (torchvision's, for CIFAR-10 classification)
    glimpse_channels: tuple[int, ...] = (64, 128)  # glimpse CNN filters per layer
    glimpse_strides: tuple[int, ...] = (1, 2)  # glimpse CNN strides per layer
    glimpse_kernel: int = 3  # glimpse CNN kernel side
    glimpse_padding: tuple[int, ...] = ()  # zero padding per glimpse CNN layer; () = none
    # The paper names filters, kernels and strides only; the blocks follow the authors' code for each dataset.
    # conv blocks: Conv without bias + BatchNorm + ReLU (authors' MNIST); False: Conv with bias + ReLU (authors' CelebA)
    batch_norm: bool = True
    # conv and transpose-conv weights: xavier (uniform; authors' MNIST) | default (PyTorch's; authors' CelebA)
    conv_init: str = "xavier"
    dropout: float = 0.5  # dropout after the Linear layers
    query_dropout: float = 0.5  # dropout on the classification query, before its ReLU6 (authors' classifiers)
    # --- drawing --------------------------------------------------------------------------------
    canvas: str = "none"  # none | addition (Eq. 3) | bernoulli (Eq. 4)
    latent_size: int = 4  # K: Gaussian latent components per glimpse
    beta: float = 4.0  # weight of the joint KL of Eq. 25
    concrete_temperature: float = 2.0  # tau of the Concrete mask (authors' code)
    # "learned": the emission network also outputs A^-1 (paper, Sec. 3.3; authors' code); "inverse": invert A
    inverse_transform: str = "learned"
    # The paper: a transpose CNN "with the same structure as the glimpse CNN in reverse", its sketch Hg x Wg.
    # mirror: undo the glimpse CNN's last layer first (paper) | forward: its strides in forward order (authors'
    # MNIST scripts: the draw-8 sketch is 10x10)
    decoder_order: str = "mirror"
    # output padding that gives back each glimpse-CNN side, so the sketch is S_g x S_g (paper); False: none
    # (authors' CelebA: 31x31)
    decoder_output_padding: bool = True
    # eval mode samples z as training does (authors' MNIST drawing scripts); False: z = mu (authors' CelebA
    # script: its `sample` returns mu outside training)
    eval_sample: bool = True
    # eval mode samples the Concrete mask of a Bernoulli canvas (authors' code, CelebA too; the paper shows
    # sampled masks); False: the mask's probability
    eval_sample_mask: bool = True
    nll_reduction: str = "mean"  # classification loss over the batch: mean | sum (authors' sketchpad)
    class_loss_scale: float = 1.0  # sketchpad: scale of the classification loss
    draw_loss_scale: float = 1.0  # sketchpad: scale of the drawing loss
    pretrained: str = ""  # selfsup: checkpoint of the trained drawing model to freeze ("" = its fresh init)
    # --- training -------------------------------------------------------------------------------
    epochs: int = 200  # passes over the training set
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # Adam learning rate
    lr_schedule: str = "paper"  # paper: x0.99 per epoch and /10 at milestones | exponential | constant
    lr_decay: float = 0.99  # per-epoch exponential factor
    lr_milestones: tuple[int, ...] = (50, 100, 150, 190, 195)  # epochs where the paper schedule divides by 10
    grad_clip: float = 5.0  # clipping threshold
    grad_clip_mode: str = "value"  # value (authors' code, per element) | norm | none
    augment: str = "rotate"  # rotate | crop-flip | none
    rotation_degrees: float = 20.0  # MNIST rotation range, +-degrees
    # nearest (authors' torchvision RandomRotation on the PIL image; the paper is silent) | bilinear
    rotation_interpolation: str = "nearest"
    normalize: bool = True  # normalise inputs with the dataset mean/std (classification)
    validation_size: int = 0  # images carved from the training set for searches (0 = none)
    max_steps: int = 0  # stop each epoch after this many steps (0 = the whole epoch); for benchmarks
    # a run whose memory is provably stuck (stawm.conditions.provably_stuck: W = 0 through an epoch, theta = 0,
    # ReLU6; a derived rule) stops after that epoch, its last measured test error its final one; False: every epoch
    stop_stuck: bool = True
    seed: int = 0  # sets model init, data order, augmentation and dropout

    def replace(self, **changes) -> "Config":
        return validate(dataclasses.replace(self, **changes))

    def to_flat(self) -> dict:
        """Flat dict of plain values (tuples become lists), the project's lingua franca."""
        flat = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}

    @classmethod
    def from_flat(cls, flat: dict) -> "Config":
        """Inverse of `to_flat`; also accepts the strings MLflow gives back for params."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(flat) - set(known))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        try:
            values = {name: parse_value(name, value, _base_type(known[name])) for name, value in flat.items()}
        except ParamError as err:
            raise ConfigError(str(err)) from None
        return validate(cls(**values))


def field_types() -> dict[str, type]:
    """The plain type of each field (tuple fields: tuple); the results library casts params with it."""
    return {f.name: _base_type(f) for f in fields(Config)}


def _base_type(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, str) else f.type.__name__
    return {"int": int, "float": float, "bool": bool, "str": str}.get(t, tuple)


# --- presets (Appendix D) -----------------------------------------------------------------------
# Each follows the paper where it states a choice and the authors' script where it is silent; the
# comments say which. AUTHORS_CODE below holds what their scripts did where the paper says otherwise.

_MNIST_DRAW = dict(
    task="draw", canvas="addition", glimpses=12, memory_size=256, epochs=100,
    lr_schedule="exponential", normalize=False, glimpse_channels=(128,), glimpse_strides=(1,),
)
_CIFAR = dict(
    dataset="cifar10", image_size=32, channels=3, augment="crop-flip", rotation_degrees=0.0,
)
_CIFAR_DRAW = dict(
    _CIFAR, task="draw", canvas="addition", glimpses=12, memory_size=256, hidden_size=256,
    epochs=50, lr_schedule="exponential", normalize=False,
    glimpse_channels=(64, 128, 256), glimpse_strides=(1, 2, 1),
)

PRESETS: dict[str, dict] = {
    "mnist-class-8": dict(),
    "mnist-class-28": dict(
        glimpse_size=28, glimpses=10, memory_size=512,
        glimpse_channels=(64, 128, 256), glimpse_strides=(2, 2, 2),
    ),
    "mnist-draw-4": dict(_MNIST_DRAW, glimpse_size=4),
    "mnist-draw-6": dict(_MNIST_DRAW, glimpse_size=6),
    "mnist-draw-8": dict(_MNIST_DRAW, glimpse_size=8, glimpse_channels=(64, 128), glimpse_strides=(1, 2)),
    "mnist-selfsup-6": dict(_MNIST_DRAW, task="selfsup", glimpse_size=6),
    # Appendix D: "Glimpse CNN: same as 6 x 6 drawing mode", S_g = 8 (Sec. 4.4). Silent on N, on dropout of
    # the class query and on the scales that keep either loss from "taking precedence": the authors' script
    # has N = 6, no query dropout, and the NLL summed over the batch beside the (summed) drawing loss.
    "mnist-sketchpad": dict(_MNIST_DRAW, task="sketchpad", glimpse_size=8, glimpses=6, epochs=20,
                            query_dropout=0.0, nll_reduction="sum"),
    "cifar-class-mobilenetv2": dict(
        _CIFAR, glimpse_size=32, glimpses=8, memory_size=1024, hidden_size=2048, glimpse_cnn="mobilenetv2",
        epochs=300, lr_milestones=(150, 250),
    ),
    "cifar-draw-12": dict(_CIFAR_DRAW, glimpse_size=12),
    "cifar-draw-16": dict(_CIFAR_DRAW, glimpse_size=16),
    # Appendix D gives filters, 4 x 4 kernels and strides; padding, bias, no BatchNorm and PyTorch's init are the
    # authors' (1024 features from each CNN); beta is the authors' later value (the paper gives none).
    "celeba-draw-32": dict(
        dataset="celeba", image_size=64, channels=3, task="draw", canvas="bernoulli", glimpse_size=32,
        glimpses=8, memory_size=256, hidden_size=256, dropout=0.3, augment="none", epochs=250,
        lr_schedule="exponential", normalize=False, beta=2.0, batch_norm=False, conv_init="default",
        context_channels=(32, 32, 64, 64), context_strides=(2, 2, 2, 2), context_kernel=4, context_padding=(1, 1, 1, 1),
        glimpse_channels=(32, 32, 64, 64), glimpse_strides=(1, 2, 2, 2), glimpse_kernel=4, glimpse_padding=(2, 1, 1, 1),
    ),
    # Not a paper setting: the 8 x 8 classifier shrunk to the scale of one CPU core. On mnist-sample's 4,000
    # training digits it reaches under 5% test error (of 1,000) at the paper's rates in its 12 epochs, 10-30 s
    # a trial: the scale of the studies shipped in analysis/results/.
    "cpu-small": dict(
        dataset="mnist-sample", memory_size=64, context_channels=(16, 32, 64), glimpse_channels=(16, 32),
        glimpses=6, dropout=0.1, query_dropout=0.1, epochs=12, lr=4e-3, lr_schedule="exponential", lr_decay=0.9,
        rotation_degrees=10.0,
    ),
    # Trains on 2 CPU cores in seconds: small nets, few glimpses, fixed rates, the no-network digit sample.
    "tiny": dict(
        dataset="mnist-sample", glimpse_size=8, glimpses=3, memory_size=32, hidden_size=64, learnable_rates=False,
        context_channels=(8, 16), context_strides=(2, 2), glimpse_channels=(8, 16), glimpse_strides=(1, 2),
        dropout=0.0, query_dropout=0.0, epochs=3, batch_size=64, lr=3e-3, lr_schedule="constant",
        augment="none",
    ),
}

# What the authors' script for a preset did where the paper says otherwise (github ethanwharris/STAWM, 2018).
# Every script: the schedule its training library applied (torchbearer's ExponentialLR, stepped after its
# MultiStepLR, overwrote the milestone decay; classification only differs). Presets not listed (CIFAR-10,
# self-supervised, tiny) have no script here that differs from the preset.
AUTHORS_CODE: dict[str, dict] = {
    "mnist-class-8": dict(lr_schedule="exponential"),
    "mnist-class-28": dict(lr_schedule="exponential", glimpses=8),  # mnist_class_28.py: run(8, 512)
    "mnist-draw-8": dict(decoder_order="forward"),  # stride-1 layer first: a 10 x 10 sketch
    "mnist-sketchpad": dict(glimpse_channels=(64, 128), glimpse_strides=(1, 2), decoder_order="forward"),  # as draw-8
    "celeba-draw-32": dict(dropout=0.5, lr=1e-4, lr_schedule="constant", epochs=100,  # Memory's default dropout
                           decoder_output_padding=False,  # 4 -> 8 -> 16 -> 32 -> 31
                           eval_sample=False),  # z = mu in eval (their `sample`), the mask still sampled
}


def preset(name: str, authors_code: bool = False, **overrides) -> Config:
    """The named Appendix D configuration, with any field overridden.

    authors_code=True starts from what the authors' script for it did instead (AUTHORS_CODE); the
    result records it in the field `authors_code`.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    authors_code = parse_value("authors_code", overrides.pop("authors_code", authors_code), bool)
    base = {f.name: f.default for f in fields(Config)}
    scripts = AUTHORS_CODE.get(name, {}) if authors_code else {}
    values = {**base, **PRESETS[name], **scripts, "preset": name, "authors_code": authors_code, **overrides}
    return Config.from_flat(values)


# --- validation ---------------------------------------------------------------------------------


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: {allowed}")


def _choice(cfg: Config, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    _require(value in choices, name, value, f"choose one of {list(choices)}")


def padding_per_layer(padding: tuple[int, ...], layers: int) -> tuple[int, ...]:
    """A CNN's padding field as one number per layer: () means no padding anywhere."""
    return tuple(padding) if padding else (0,) * layers


def conv_sides(side: int, kernel: int, strides: tuple[int, ...], padding: tuple[int, ...] = ()) -> list[int]:
    """The input side of each conv layer, then the output side (0 once nothing is left)."""
    sides = [side]
    for stride, pad in zip(strides, padding_per_layer(padding, len(strides))):
        inner = sides[-1] + 2 * pad
        sides.append((inner - kernel) // stride + 1 if sides[-1] > 0 and inner >= kernel else 0)
    return sides


def validate(cfg: Config) -> Config:
    """Reject values that cannot run; write back derived values.

    Rates that are legal numbers but break Appendix A pass: the stability studies explore them.
    """
    for name, choices in CHOICES.items():
        _choice(cfg, name, choices)
    if cfg.preset not in PRESETS:
        raise ConfigError(f"preset={cfg.preset!r} is not allowed: choose one of {sorted(PRESETS)}")
    for name in ("delta", "eta", "theta", "lr", "beta", "lr_decay", "concrete_temperature", "grad_clip",
                 "dropout", "query_dropout", "rotation_degrees", "class_loss_scale", "draw_loss_scale"):
        value = getattr(cfg, name)
        _require(math.isfinite(value), name, value, "a finite number (not NaN or infinity)")
    _require(cfg.image_size >= 1, "image_size", cfg.image_size, "at least 1")
    _require(1 <= cfg.glimpse_size <= cfg.image_size, "glimpse_size", cfg.glimpse_size,
             f"between 1 and the image size ({cfg.image_size})")
    _require(cfg.glimpses >= 1, "glimpses", cfg.glimpses, "at least 1")
    _require(cfg.memory_size >= 1, "memory_size", cfg.memory_size, "at least 1")
    _require(cfg.hidden_size >= 0, "hidden_size", cfg.hidden_size, "0 (= 2 * memory_size) or more")
    for name in ("channels", "num_classes", "latent_size", "batch_size", "context_kernel", "glimpse_kernel"):
        _require(getattr(cfg, name) >= 1, name, getattr(cfg, name), "at least 1")
    for name in ("epochs", "validation_size", "max_steps"):
        _require(getattr(cfg, name) >= 0, name, getattr(cfg, name), "0 or more")
    _require(0 <= cfg.dropout < 1, "dropout", cfg.dropout, "in [0, 1)")
    _require(0 <= cfg.query_dropout < 1, "query_dropout", cfg.query_dropout, "in [0, 1)")
    _require(cfg.lr > 0, "lr", cfg.lr, "greater than 0")
    _require(cfg.concrete_temperature > 0, "concrete_temperature", cfg.concrete_temperature, "greater than 0")
    for prefix in ("context", "glimpse"):
        chans, strides = getattr(cfg, f"{prefix}_channels"), getattr(cfg, f"{prefix}_strides")
        _require(len(chans) >= 1 and min(chans) >= 1, f"{prefix}_channels", chans, "one or more positive ints")
        _require(len(strides) == len(chans) and min(strides) >= 1, f"{prefix}_strides", strides,
                 f"one positive stride per layer ({len(chans)})")
        padding = getattr(cfg, f"{prefix}_padding")
        _require(not padding or (len(padding) == len(chans) and min(padding) >= 0), f"{prefix}_padding", padding,
                 f"() for none, or one padding >= 0 per layer ({len(chans)})")
        if prefix == "glimpse" and cfg.glimpse_cnn == "mobilenetv2":
            continue  # torchvision's MobileNetV2 pads and pools: any glimpse size gives a feature
        side = cfg.glimpse_size if prefix == "glimpse" else cfg.image_size
        kernel = getattr(cfg, f"{prefix}_kernel")
        _require(conv_sides(side, kernel, strides, padding)[-1] >= 1, f"{prefix}_channels", chans,
                 f"{len(chans)} {kernel}x{kernel} convolutions with strides {list(strides)} and padding "
                 f"{list(padding_per_layer(padding, len(chans)))} leave nothing of a {side}x{side} input; "
                 f"use fewer layers or a larger {'glimpse_size' if prefix == 'glimpse' else 'image_size'}")
    drawing = cfg.task in ("draw", "sketchpad", "selfsup")
    _require(not drawing or cfg.canvas != "none", "canvas", cfg.canvas,
             f"task {cfg.task!r} draws: choose 'addition' or 'bernoulli'")
    _require(not drawing or cfg.glimpse_cnn == "conv", "glimpse_cnn", cfg.glimpse_cnn,
             "drawing needs the conv glimpse CNN (its transpose draws the sketches)")
    if cfg.hidden_size == 0:  # derived once, written back so that it is logged
        cfg.hidden_size = 2 * cfg.memory_size
    return cfg
