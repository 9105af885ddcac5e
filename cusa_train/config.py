"""Typed, frozen, validated configuration for CUSA training.

Every section is a frozen dataclass checked on construction: an unknown key or an out-of-range
value raises :class:`cusa.errors.ConfigError` naming the key or value and how to fix it.
A whole run is a :class:`TrainConfig`, loadable from YAML, JSON or TOML with
:meth:`TrainConfig.from_file`. :meth:`LossConfig.from_official` maps the official CUSA
``loss_config`` YAML tree (lerogo/aaai24_itr_cusa) onto this small config.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidationError,
    with_config,
)

from cusa.errors import ConfigError
from cusa.extract.teachers.defaults import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER
from cusa_train.clip_catalog import CLIP_STUDENTS

C = TypeVar("C")


# ---- dict -> dataclass, validated by pydantic ----------------------------------------------------

#: Every section refuses a key it does not have (pydantic reads this from each dataclass).
SECTION = ConfigDict(extra="forbid")

#: pydantic's error types, as the one-line fix a config author needs.
_TYPE_MESSAGES = {
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "too_long": "has too many items",
}


#: pydantic's two names for a key the dataclass does not have.
_UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden")


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def build(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build a config dataclass from a plain mapping, rejecting unknown keys.

    The types of the dataclass fields are checked by pydantic; each section's ``__post_init__``
    checks ranges.

    Raises:
        ConfigError: an unknown key, a wrongly typed value or a value out of range.
    """
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise _config_error(exc, cls, data, where) from None


def _section(tp: Any) -> type | None:
    """The config dataclass a field type holds (directly or as the one dataclass of a union)."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    found = [a for a in get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
    return found[0] if len(found) == 1 else None


def _config_error(exc: ValidationError, cls: type, data: Any, where: str) -> ConfigError:
    """pydantic's error as one line naming the key, the value and the fix.

    Of several errors the deepest is reported: for a union field (a temperature pair or
    ``"csa"``) that is the form the value was meant as.
    """
    errors = exc.errors(include_url=False)
    error = max(errors, key=lambda e: len(e["loc"]))
    raised = (error.get("ctx") or {}).get("error")
    if isinstance(raised, ConfigError):  # a section's own range check
        return raised
    kind, loc = error["type"], error["loc"]
    if kind in _UNKNOWN_KEY:  # the last part is the unknown key itself
        loc = loc[:-1]
    # Walk the location through the sections; a part that is not a field is a union member's tag.
    names, owners, value = [where] if where else [], [cls], data
    for part in loc:
        section = _section(owners[-1])
        if isinstance(part, int):
            if isinstance(value, (list, tuple)) and part < len(value):
                names[-1] += f"[{part}]"
                value = value[part]
        elif section is not None and part in {f.name for f in dataclasses.fields(section)}:
            names.append(part)
            owners.append(typing.get_type_hints(section)[part])
            value = value.get(part) if isinstance(value, dict) else value
    name = ".".join(names)
    if kind in _UNKNOWN_KEY:
        key = ".".join([*names, str(error["loc"][-1])])
        allowed = ", ".join(f.name for f in dataclasses.fields(_section(owners[-1])))
        return ConfigError(f"unknown config key {key!r}; allowed keys here: {allowed}")
    if loc and isinstance(loc[-1], str) and loc[-1] != names[-1]:  # no form of a union fits
        forms = " / ".join(e["msg"] for e in errors if len(e["loc"]) == len(loc))
        return ConfigError(f"{name}={value!r} fits none of its forms: {forms}")
    if kind == "literal_error":
        return ConfigError(
            f"{name}={value!r} is not allowed; use one of {list(get_args(owners[-1]))}"
        )
    if kind == "missing" and isinstance(loc[-1], int):
        return ConfigError(f"{name}={value!r} must have {len(get_args(owners[-1]))} items")
    if kind == "missing":
        return ConfigError(
            f"{'.'.join(names[:-1]) or cls.__name__}: missing required key {names[-1]!r}"
        )
    if kind == "dataclass_type":
        keys = [f.name for f in dataclasses.fields(_section(owners[-1]))]
        return ConfigError(f"{name} must be a mapping of {keys}, got {value!r}")
    return ConfigError(f"{name}={value!r} {_TYPE_MESSAGES.get(kind, error['msg'])}")


def to_dict(obj: Any) -> Any:
    """A config dataclass as plain JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _positive(value: float, name: str, fix: str = "use a value > 0") -> None:
    if not (value > 0) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is out of range; {fix}")


def _non_negative(value: float, name: str, fix: str = "use a value >= 0") -> None:
    if not (value >= 0) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is out of range; {fix}")


# ---- losses and temperatures -------------------------------------------------------------------


@with_config(SECTION)
@dataclass(frozen=True)
class TemperatureConfig:
    """One temperature: its initial value, the [min, max] range it is clamped to before every
    use, and whether it is learned.

    Args:
        init: initial value, inside [min, max].
        min: lower clamp bound, > 0.
        max: upper clamp bound, >= min.
        learnable: learned by the optimiser (``True``) or fixed (``False``).
    """

    init: StrictFloat
    min: StrictFloat
    max: StrictFloat
    learnable: StrictBool = True

    def __post_init__(self) -> None:
        _positive(self.min, "temperature min", "temperatures must be > 0; use e.g. min: 0.01")
        _positive(self.max, "temperature max", "temperatures must be > 0")
        if self.min > self.max:
            raise ConfigError(
                f"temperature min={self.min!r} > max={self.max!r}; swap them or widen the range"
            )
        _positive(self.init, "temperature init", "temperatures must be > 0")
        if not (self.min <= self.init <= self.max):
            raise ConfigError(
                f"temperature init={self.init!r} is outside [min={self.min!r}, max={self.max!r}]; "
                "pick an init inside the range"
            )


@with_config(SECTION)
@dataclass(frozen=True)
class TemperaturePairConfig:
    """The temperatures of the image side and the text side of one loss term.

    With ``shared=True`` a single parameter serves both sides; like the official code it starts
    at the mean of the two inits and is clamped to the mean of the two ranges. A plain
    ``{init, min, max, learnable}`` mapping is shorthand for a shared pair.
    """

    image: TemperatureConfig
    text: TemperatureConfig
    shared: StrictBool = False

    def __post_init__(self) -> None:
        if self.shared and self.image.learnable != self.text.learnable:
            raise ConfigError(
                "a shared temperature pair has learnable=True on one side and False on the other; "
                "set the same 'learnable' on both"
            )

    @classmethod
    def single(
        cls, init: float, low: float, high: float, learnable: bool = True
    ) -> TemperaturePairConfig:
        """One temperature shared by both sides, starting at ``init`` and clamped to [low, high]."""
        t = TemperatureConfig(init, low, high, learnable)
        return cls(image=t, text=t, shared=True)

    @property
    def merged(self) -> TemperatureConfig:
        """The single temperature used when ``shared`` (means of the two sides)."""
        return TemperatureConfig(
            init=(self.image.init + self.text.init) / 2.0,
            min=(self.image.min + self.text.min) / 2.0,
            max=(self.image.max + self.text.max) / 2.0,
            learnable=self.image.learnable,
        )


def _shared_shorthand(data: Any) -> Any:
    """A plain ``{init, min, max, learnable}`` mapping is one temperature shared by both sides."""
    if isinstance(data, dict) and "init" in data:
        return {"image": data, "text": data, "shared": True}
    return data


#: A temperature pair as a config field: a full pair, or the shared shorthand.
TemperaturePair = Annotated[TemperaturePairConfig, BeforeValidator(_shared_shorthand)]

ItrMode = Literal["mean", "sum"]
CombineMode = Literal["each", "add", "dot"]
SoftObjective = Literal["kl", "cross-entropy"]


@with_config(SECTION)
@dataclass(frozen=True)
class ItrLossConfig:
    """Image-text retrieval InfoNCE with multi-positives.

    Args:
        enabled: compute the term.
        weight: its weight in the total.
        mode: ``"mean"`` (official: CE also averaged over columns) or ``"sum"`` (standard).
        tau: its temperature (official 0.05 in [0.01, 0.1], learned).
    """

    enabled: StrictBool = True
    weight: StrictFloat = 1.0
    mode: ItrMode = "mean"
    tau: TemperatureConfig = field(default_factory=lambda: TemperatureConfig(0.05, 0.01, 0.1))

    def __post_init__(self) -> None:
        _non_negative(self.weight, "loss.itr.weight")


@with_config(SECTION)
@dataclass(frozen=True)
class CsaLossConfig:
    """Cross-modal soft-label alignment.

    Args:
        enabled: compute the term.
        weight: alpha (official 0.1).
        combine: ``"each"`` (official), ``"add"`` or ``"dot"``; see :class:`CrossModalSoftLabelLoss`.
        tau: student temperatures, ``image`` for i2t rows and ``text`` for t2i rows
            (official: one shared 0.45 in [0.1, 0.99], learned).
        teacher_tau: soft-label temperatures (official: one shared 1.0 in [0.1, 1.0], fixed).
        objective: ``"kl"`` (official ``use_loss: kl``) or ``"cross-entropy"`` (official
            ``use_loss: contrastive``: InfoNCE against the soft labels).
        mode: reduction of the ``cross-entropy`` objective, ``"mean"`` or ``"sum"``
            (official ``contrastive_loss_mode``); unused by ``kl``.
    """

    enabled: StrictBool = True
    weight: StrictFloat = 0.1
    combine: CombineMode = "each"
    objective: SoftObjective = "kl"
    mode: ItrMode = "mean"
    tau: TemperaturePair = field(
        default_factory=lambda: TemperaturePairConfig.single(0.45, 0.1, 0.99)
    )
    teacher_tau: TemperaturePair = field(
        default_factory=lambda: TemperaturePairConfig.single(1.0, 0.1, 1.0, learnable=False)
    )

    def __post_init__(self) -> None:
        _non_negative(self.weight, "loss.csa.weight", "use alpha >= 0 (official 0.1)")


@with_config(SECTION)
@dataclass(frozen=True)
class UsaLossConfig:
    """Uni-modal soft-label alignment.

    Args:
        enabled: compute the term (adds the uni-modal projector heads).
        weight: beta (official 0.5).
        tau: student temperatures for image-image and text-text, or ``"csa"`` to reuse CSA's
            (official: separate, 0.45 in [0.1, 1.0], learned).
        teacher_tau: soft-label temperatures, or ``"csa"`` to reuse CSA's (official).
        objective: ``"kl"`` (official) or ``"cross-entropy"`` (official ``use_loss: contrastive``).
        mode: reduction of the ``cross-entropy`` objective, ``"mean"`` or ``"sum"``.
    """

    enabled: StrictBool = True
    weight: StrictFloat = 0.5
    objective: SoftObjective = "kl"
    mode: ItrMode = "mean"
    tau: TemperaturePair | Literal["csa"] = field(
        default_factory=lambda: TemperaturePairConfig(
            image=TemperatureConfig(0.45, 0.1, 1.0), text=TemperatureConfig(0.45, 0.1, 1.0)
        )
    )
    teacher_tau: TemperaturePair | Literal["csa"] = "csa"

    def __post_init__(self) -> None:
        _non_negative(self.weight, "loss.usa.weight", "use beta >= 0 (official 0.5)")


@with_config(SECTION)
@dataclass(frozen=True)
class LossConfig:
    """``L = w_itr * L_itr + alpha * L_CSA + beta * L_USA``; defaults are the official ``cusa.yaml``."""

    itr: ItrLossConfig = field(default_factory=ItrLossConfig)
    csa: CsaLossConfig = field(default_factory=CsaLossConfig)
    usa: UsaLossConfig = field(default_factory=UsaLossConfig)

    def __post_init__(self) -> None:
        if not (self.itr.enabled or self.csa.enabled):
            raise ConfigError(
                "loss.itr and loss.csa are both disabled; enable at least one cross-modal term"
            )
        if (
            self.usa.enabled
            and not self.csa.enabled
            and "csa" in (self.usa.tau, self.usa.teacher_tau)
        ):
            raise ConfigError(
                "loss.usa reuses CSA temperatures ('csa') but loss.csa is disabled; give usa its own"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossConfig:
        return build(cls, data, "loss")

    @classmethod
    def sharper_soft_labels(cls, tau: float = 0.5) -> LossConfig:
        """The official ``cusa.yaml`` loss with a fixed soft-label temperature ``tau`` (default
        0.5) instead of 1.0, shared by CSA and USA as in ``cusa.yaml``; everything else official.

        At τ = 1 the in-batch soft labels are almost uniform (126-128 effective neighbours out of
        128 for every teacher measured). In the sensitivity study (``docs/cusa_sensitivity.md``:
        150-600 COCO images, frozen towers) τ = 0.5 beat InfoNCE on average in all five
        (training-set size, schedule) combinations tried, on 13 of 15 seeds, by +3 to +24 RSUM,
        and with all 12 teacher pairs tried; the official τ = 1 ranged from -30 to +15 RSUM over
        the same five. Sharper values (τ <= 0.2) helped a lot with 150-300 images but lost up to
        29 RSUM with 600, so they are not a preset. The evidence is small-scale: the paper presets
        keep the official ``LossConfig()``, and this one should be checked against InfoNCE on
        held-out training pairs of your own.

        Raises:
            ConfigError: ``tau`` is not a positive number.
        """
        _positive(tau, "sharper_soft_labels tau", "use a soft-label temperature > 0, e.g. 0.5")
        teacher = TemperaturePairConfig.single(tau, min(tau, 0.1), max(tau, 1.0), learnable=False)
        base = cls()
        return dataclasses.replace(base, csa=dataclasses.replace(base.csa, teacher_tau=teacher))

    @classmethod
    def from_official(cls, loss_config: dict[str, Any]) -> LossConfig:
        """Map the official CUSA ``loss_config`` tree (``contrastive`` / ``cross_softlabel`` /
        ``uni_softlabel`` sections) to a :class:`LossConfig`.

        Initial temperatures outside their range are clamped, as the official forward does
        before first use. ``use_loss: kl`` maps to ``objective: kl`` and ``use_loss: contrastive``
        to ``objective: cross-entropy`` with the section's ``contrastive_loss_mode``.
        """
        try:
            con = loss_config["contrastive"]
            cross = loss_config["cross_softlabel"]
            uni = loss_config["uni_softlabel"]

            def temp(
                sec: dict[str, Any], prefix: str, side: str, block_key: str
            ) -> TemperatureConfig:
                lo, hi = sec[f"{prefix}{side}_tau_min"], sec[f"{prefix}{side}_tau_max"]
                init = min(max(sec[f"{prefix}{side}_tau"], lo), hi)
                return TemperatureConfig(init, lo, hi, learnable=not sec[block_key])

            def pair(
                sec: dict[str, Any], prefix: str, shared: bool, block_key: str
            ) -> TemperaturePairConfig:
                return TemperaturePairConfig(
                    image=temp(sec, prefix, "image", block_key),
                    text=temp(sec, prefix, "text", block_key),
                    shared=shared,
                )

            objectives = {"kl": "kl", "contrastive": "cross-entropy"}
            for name, sec in (("cross_softlabel", cross), ("uni_softlabel", uni)):
                if sec.get("use_loss", "kl") not in objectives:
                    raise ConfigError(
                        f"official {name}.use_loss={sec['use_loss']!r} is not known; "
                        "the official code accepts 'kl' or 'contrastive'"
                    )
            itr = ItrLossConfig(
                enabled=bool(con["is_on"]),
                weight=float(con["rate"]),
                mode=con["contrastive_loss_mode"],
                tau=TemperatureConfig(
                    min(max(con["tau"], con["tau_min"]), con["tau_max"]),
                    con["tau_min"],
                    con["tau_max"],
                    learnable=not con["is_block_tau"],
                ),
            )
            csa = CsaLossConfig(
                enabled=bool(cross["is_on"]),
                weight=float(cross["rate"]),
                combine=cross["cross_softlabel_mode"],
                objective=objectives[cross.get("use_loss", "kl")],
                mode=cross.get("contrastive_loss_mode", "mean"),
                tau=pair(cross, "", cross["use_same_tau"], "is_block_tau"),
                teacher_tau=pair(
                    cross,
                    "the_softlabel_",
                    cross["use_same_softlabel_tau"],
                    "is_block_softlabel_tau",
                ),
            )
            usa = UsaLossConfig(
                enabled=bool(uni["is_on"]),
                weight=float(uni["rate"]),
                objective=objectives[uni.get("use_loss", "kl")],
                mode=uni.get("contrastive_loss_mode", "mean"),
                tau="csa"
                if uni["use_cross_softlabel_same_tau"]
                else pair(uni, "", uni["use_same_tau"], "is_block_tau"),
                teacher_tau="csa"
                if uni["use_cross_softlabel_same_softlabel_tau"]
                else pair(
                    uni, "the_softlabel_", uni["use_same_softlabel_tau"], "is_block_softlabel_tau"
                ),
            )
        except KeyError as exc:
            raise ConfigError(f"official loss_config is missing key {exc.args[0]!r}") from exc
        if itr.mode not in ("mean", "sum"):
            raise ConfigError(f"official contrastive_loss_mode={itr.mode!r}; use 'mean' or 'sum'")
        for name, sec_mode in (("cross_softlabel", csa.mode), ("uni_softlabel", usa.mode)):
            if sec_mode not in ("mean", "sum"):
                raise ConfigError(
                    f"official {name}.contrastive_loss_mode={sec_mode!r}; use 'mean' or 'sum'"
                )
        if csa.combine not in ("each", "add", "dot"):
            raise ConfigError(
                f"official cross_softlabel_mode={csa.combine!r}; use 'each', 'add' or 'dot'"
            )
        return cls(itr=itr, csa=csa, usa=usa)


# ---- model, teachers, data, optimisation, run -------------------------------------------------


@with_config(SECTION)
@dataclass(frozen=True)
class ModelConfig:
    """The student and the CUSA heads.

    Args:
        student: name in the student registry (``cusa_train.student``), e.g. ``"mobilenetv2-minilm"``.
        student_options: keyword arguments for the student factory.
        embed_dim: output size of the heads; ``None`` keeps the student's (which must then be
            the same for both towers).
        head_init_std: std of the heads' Linear weights (official 0.02).
        init_from: a state dict to start from, read with ``weights_only=True``: a ``cusa train``
            checkpoint, or an official CUSA (``unire``) checkpoint or state dict, whose names are
            converted. Keys it lacks keep their fresh values (e.g. the student's pretrained
            weights); a key the model does not have is refused.
    """

    student: str = "mobilenetv2-minilm"
    student_options: dict[str, Any] = field(default_factory=dict)
    embed_dim: StrictInt | None = None
    head_init_std: StrictFloat = 0.02
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError(
                f"model.embed_dim={self.embed_dim!r} must be >= 1 (or null for the student's)"
            )
        _non_negative(self.head_init_std, "model.head_init_std")


@with_config(SECTION)
@dataclass(frozen=True)
class TeachersConfig:
    """Which stored teacher features to use.

    Args:
        image: image teacher name or spec fingerprint in the store (paper: Unicom ViT-B/32
            ``forward_features``, ``unicom-vit-b32-tokens``).
        text: text teacher name or spec fingerprint (paper: all-mpnet-base-v2).
        image_spec: expected spec fields of the image teacher (any subset of ``TeacherSpec``);
            the store is refused when a recorded field differs.
        text_spec: the same for the text teacher.
    """

    image: str = DEFAULT_IMAGE_TEACHER
    text: str = DEFAULT_TEXT_TEACHER
    image_spec: dict[str, Any] = field(default_factory=dict)
    text_spec: dict[str, Any] = field(default_factory=dict)


@with_config(SECTION)
@dataclass(frozen=True)
class DataConfig:
    """Training data and its soft labels.

    Args:
        dataset: dataset name or path for :func:`cusa.extract.readers.open_dataset`.
        root: the dataset folder, for registered names that need one (``coco``, ``flickr30k``).
        split: split to train on.
        store: feature store path or URL; ``None`` is :func:`cusa.paths.default_store`.
        store_dataset: dataset name the features were stored under (defaults to ``dataset``).
        batch_size: (image, caption) pairs per step and process; one pair per caption.
        num_workers: DataLoader worker processes.
        max_samples: keep only the first N images (for quick runs).
        captions: what the student reads: ``"raw"`` captions, or ``"pre_caption"``, the official
            normalisation (lower case, punctuation to spaces, 64 words) that the official code
            applies before ``clip.tokenize`` and that cusa applies for the text teacher.
        shuffle_seed: seed of the per-epoch shuffle (``seed + epoch``, as torch's
            ``DistributedSampler``); ``None`` uses ``run.seed``. The official code leaves the
            sampler at its default, 0.
    """

    dataset: str = "coco-sample"
    root: str | None = None
    split: str = "train"
    store: str | None = None
    store_dataset: str | None = None
    batch_size: StrictInt = 32
    num_workers: StrictInt = 0
    max_samples: StrictInt | None = None
    captions: Literal["raw", "pre_caption"] = "raw"
    shuffle_seed: StrictInt | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(
                f"data.batch_size={self.batch_size!r}; in-batch losses need at least 2"
            )
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers!r} must be >= 0")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"data.max_samples={self.max_samples!r} must be >= 1 or null")


@with_config(SECTION)
@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a cosine schedule.

    Two schedules:

    - ``"step-cosine"`` (default): linear warmup over ``warmup_steps``, then a cosine decay to
      ``min_lr_ratio * lr`` (or ``min_lr``), updated every step.
    - ``"epoch-cosine"``: the official CUSA schedule (timm's ``CosineLRScheduler`` with
      ``t_initial = epochs``, stepped once per epoch before its first batch):
      ``lr(e) = min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2``, after a linear warmup
      from ``warmup_lr`` over ``warmup_epochs`` (0 in every official config).

    Two weight-decay groupings:

    - ``"matrices"`` (default): decay on tensors with 2 or more dimensions only.
    - ``"official"``: timm's ``add_weight_decay`` as the official code uses it: no decay on 1-d
      tensors and on names ending in ``.bias``, decay on the rest, so the 0-d temperatures *are*
      decayed.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay, applied as ``decay_groups`` says.
        betas: AdamW betas.
        eps: AdamW epsilon.
        schedule: ``"step-cosine"`` or ``"epoch-cosine"`` (official).
        warmup_steps: linear warmup steps (``step-cosine``).
        warmup_epochs: linear warmup epochs (``epoch-cosine``).
        warmup_lr: lr at the start of the warmup (``epoch-cosine``; default ``lr``).
        epochs: passes over the data (ignored when ``max_steps`` is set).
        max_steps: total optimiser steps; ``None`` derives it from ``epochs``.
        min_lr_ratio: final lr as a fraction of ``lr`` (when ``min_lr`` is not set).
        min_lr: final lr, absolute (official ``min_lr``); overrides ``min_lr_ratio``.
        decay_groups: ``"matrices"`` or ``"official"``.
        grad_clip_norm: clip the global grad norm; ``None`` disables (the official code does not clip).
    """

    lr: StrictFloat = 1e-4
    weight_decay: StrictFloat = 0.2
    betas: tuple[StrictFloat, StrictFloat] = (0.9, 0.98)
    eps: StrictFloat = 1e-6
    schedule: Literal["step-cosine", "epoch-cosine"] = "step-cosine"
    warmup_steps: StrictInt = 100
    warmup_epochs: StrictInt = 0
    warmup_lr: StrictFloat | None = None
    epochs: StrictInt = 1
    max_steps: StrictInt | None = None
    min_lr_ratio: StrictFloat = 0.0
    min_lr: StrictFloat | None = None
    decay_groups: Literal["matrices", "official"] = "matrices"
    grad_clip_norm: StrictFloat | None = None

    @property
    def final_lr(self) -> float:
        """The lr the cosine ends at."""
        return self.min_lr if self.min_lr is not None else self.lr * self.min_lr_ratio

    def __post_init__(self) -> None:
        _positive(self.lr, "optim.lr", "use e.g. 1e-4")
        _non_negative(self.weight_decay, "optim.weight_decay")
        for b in self.betas:
            if not 0 <= b < 1:
                raise ConfigError(f"optim.betas={self.betas!r}; each beta must be in [0, 1)")
        _positive(self.eps, "optim.eps")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps!r} must be >= 0")
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs={self.epochs!r} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"optim.max_steps={self.max_steps!r} must be >= 1 or null")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(
                f"optim.min_lr={self.min_lr!r} must be in [0, lr={self.lr!r}] (or null for min_lr_ratio)"
            )
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs={self.warmup_epochs!r} must be >= 0")
        if self.warmup_lr is not None:
            _non_negative(self.warmup_lr, "optim.warmup_lr")
        if self.grad_clip_norm is not None:
            _positive(self.grad_clip_norm, "optim.grad_clip_norm", "use a value > 0 or null")


@with_config(SECTION)
@dataclass(frozen=True)
class RunConfig:
    """Where and how the run executes.

    Args:
        output_dir: checkpoints, ``metrics.jsonl`` and ``config.json`` go here.
        seed: seed for python, numpy and torch (offset by rank under DDP).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
        log_every: write a metrics line every N steps.
        checkpoint_every: save a checkpoint every N steps (and always at the end); 0 = only at the end.
        resume: continue from ``output_dir/checkpoint-last.pt`` when it exists.
        progress: show a progress bar.
        all_gather: under DDP, whether the in-batch losses see the global batch.
            ``"off"`` (every official config, ``is_all_gather: False``): each rank's loss is over
            its own ``batch_size`` pairs. ``"on"``: embeddings, teacher features and ids are
            all-gathered, and the local gradient is multiplied by the world size so that DDP's
            averaging yields exactly the gradient of the global-batch loss. ``"official"``: the
            official ``AllGather`` backward (no scaling), whose backbone gradient is
            ``world_size`` times smaller than the global-batch loss's; for parity only.
        on_config_change: what a rerun into an ``output_dir`` whose checkpoint was made with a
            different config does: ``"refuse"`` (default; the message names every differing
            field), ``"resume-anyway"`` (continue; the old ``config.json`` is kept as
            ``config-before-step-<N>.json``) or ``"overwrite"`` (start again; the old checkpoints
            and metrics are moved to ``previous-<time>/``). Settings that do not change the result
            (``run.progress``, ``run.log_every``, ``run.checkpoint_every``, ``run.device``,
            ``data.num_workers``, ``optim.max_steps``, ``eval.batch_size``) may always differ.
    """

    output_dir: str = "runs/cusa"
    seed: StrictInt = 0
    device: str = "auto"
    log_every: StrictInt = 1
    checkpoint_every: StrictInt = 0
    resume: StrictBool = True
    progress: StrictBool = True
    all_gather: Literal["off", "on", "official"] = "on"
    on_config_change: Literal["refuse", "resume-anyway", "overwrite"] = "refuse"

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ConfigError(f"run.log_every={self.log_every!r} must be >= 1")
        if self.checkpoint_every < 0:
            raise ConfigError(f"run.checkpoint_every={self.checkpoint_every!r} must be >= 0")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"run.device={self.device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


@with_config(SECTION)
@dataclass(frozen=True)
class ValidationConfig:
    """Evaluation after every epoch, and which checkpoint is kept as the best.

    The official code evaluates val and test after every epoch and keeps the checkpoint with the
    best **test** ``r_mean``. Choosing on test reports an optimistic test score, so cusa chooses
    on ``val`` unless ``select_on: test`` asks for the official behaviour.

    Args:
        splits: splits of ``data.dataset`` to evaluate after every epoch (e.g. ``[val, test]``);
            empty: no evaluation, only ``checkpoint-last.pt``.
        select_on: the split whose ``metric`` picks ``checkpoint-best.pt``; ``None`` keeps no best.
        metric: a key of the retrieval report, higher is better (official ``r_mean``).
        max_images: evaluate only the first N images of each split.
        batch_size: items encoded at once.
    """

    splits: tuple[str, ...] = ()
    select_on: str | None = "val"
    metric: str = "r_mean"
    max_images: StrictInt | None = None
    batch_size: StrictInt = 128

    def __post_init__(self) -> None:
        if self.splits and self.select_on is not None and self.select_on not in self.splits:
            raise ConfigError(
                f"eval.select_on={self.select_on!r} is not one of eval.splits={list(self.splits)}; "
                "add it to the splits or set select_on: null"
            )
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"eval.max_images={self.max_images!r} must be >= 1 or null")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size!r} must be >= 1")


@with_config(SECTION)
@dataclass(frozen=True)
class TrainConfig:
    """A whole training run; every section has defaults (the official CUSA loss settings)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: ValidationConfig = field(default_factory=ValidationConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build and validate from a plain mapping."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"a training config must be a mapping of sections, got {type(data).__name__}"
            )
        return build(cls, data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load from a ``.yaml``/``.yml`` (needs pyyaml), ``.json`` or ``.toml`` file."""
        return cls.from_dict(load_mapping(path))

    @classmethod
    def from_official(
        cls, official: dict[str, Any] | str | Path, *, dataset: str | None = None
    ) -> TrainConfig:
        """Map an official CUSA training YAML (``configs/<arch>/<dataset>/<name>.yaml`` of
        lerogo/aaai24_itr_cusa) onto a :class:`TrainConfig`.

        Every value the official run depends on is carried over; the result equals the preset
        in ``configs/paper/`` made from the same file. ``data_path`` becomes ``data.root`` (set
        it with ``--set data.root=...`` when the file leaves it empty). Model selection is on
        ``val`` (the official code selects on test; set ``eval.select_on: test`` for that).

        Args:
            official: the parsed YAML, or its path.
            dataset: the cusa dataset to train on. The official Flickr30K configs say
                ``dataset_name: cross_coco`` too (that class reads ``new_{split}.json`` from
                ``data_path``, whatever the dataset), so pass ``"flickr30k"`` for them; by
                default ``cross_coco`` is ``coco`` and ``cross_flickr`` is ``flickr30k``.

        Raises:
            ConfigError: a key is missing, or an option the official code has but this mapping
                does not reproduce (another optimiser or scheduler, LR noise, cooldown).
        """
        data = load_mapping(official) if isinstance(official, (str, Path)) else official
        try:
            return _from_official(data, dataset)
        except KeyError as exc:
            raise ConfigError(f"official CUSA config is missing key {exc.args[0]!r}") from exc

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **sections: Any) -> TrainConfig:
        return dataclasses.replace(self, **sections)


#: ``dataset_name`` of the official configs -> the registered Karpathy readers (same splits).
OFFICIAL_DATASETS: dict[str, str] = {"cross_coco": "coco", "cross_flickr": "flickr30k"}
#: What the official ``retrieval.py`` fixes in code rather than in the YAML.
OFFICIAL_SEED = 23  # argparse default of --seed
OFFICIAL_NUM_WORKERS = 16
OFFICIAL_PRINT_FREQ = 50


def _from_official(cfg: dict[str, Any], dataset: str | None) -> TrainConfig:
    students = {arch: name for name, arch in CLIP_STUDENTS.items()}
    clip_name = cfg["clip_model"]
    if clip_name not in students:
        raise ConfigError(
            f"official clip_model={clip_name!r} is not one the official code accepts; "
            f"use one of {list(students)}"
        )
    if dataset is None and cfg["dataset_name"] not in OFFICIAL_DATASETS:
        raise ConfigError(
            f"official dataset_name={cfg['dataset_name']!r}; use one of {list(OFFICIAL_DATASETS)}"
        )
    opt, sched = cfg["optimizer"], cfg["schedular"]
    if str(opt["opt"]).lower() != "adamw":
        raise ConfigError(f"official optimizer.opt={opt['opt']!r}; only adamW is reproduced")
    if sched["sched"] != "cosine":
        raise ConfigError(f"official schedular.sched={sched['sched']!r}; only cosine is reproduced")
    for key, neutral in (("decay_rate", 1), ("cooldown_epochs", 0)):
        if sched.get(key, neutral) != neutral:
            raise ConfigError(
                f"official schedular.{key}={sched[key]!r} is not reproduced; "
                f"every official config uses {neutral}"
            )
    for key in ("lr_noise", "opt_eps", "opt_betas", "opt_args", "lr_cycle_mul"):
        if (opt.get(key) if key.startswith("opt") else sched.get(key)) is not None:
            raise ConfigError(f"official option {key!r} is not reproduced; remove it")
    return TrainConfig(
        model=ModelConfig(student=students[clip_name]),
        loss=LossConfig.from_official(cfg["loss_config"]),
        teachers=TeachersConfig(image=DEFAULT_IMAGE_TEACHER, text=DEFAULT_TEXT_TEACHER),
        data=DataConfig(
            dataset=dataset or OFFICIAL_DATASETS[cfg["dataset_name"]],
            root=cfg.get("data_path") or None,
            split="train",
            batch_size=int(cfg["batch_size_train"]),
            num_workers=OFFICIAL_NUM_WORKERS,
            captions="pre_caption",
            shuffle_seed=0,  # DistributedSampler's default seed; --seed does not reach it
        ),
        optim=OptimConfig(
            lr=float(opt["lr"]),
            weight_decay=float(opt["weight_decay"]),
            betas=(0.9, 0.999),  # torch AdamW defaults: the official code passes none
            eps=1e-8,
            schedule="epoch-cosine",
            warmup_steps=0,
            warmup_epochs=int(sched["warmup_epochs"]),
            warmup_lr=float(sched["warmup_lr"]),
            epochs=int(sched["epochs"]),
            min_lr=float(sched["min_lr"]),
            decay_groups="official",
            grad_clip_norm=None,
        ),
        run=RunConfig(
            output_dir=str(cfg.get("save_path") or "runs/cusa"),
            seed=OFFICIAL_SEED,
            log_every=OFFICIAL_PRINT_FREQ,
            all_gather="official" if cfg.get("is_all_gather") else "off",
        ),
        eval=ValidationConfig(
            splits=("val", "test"),
            select_on="val",
            metric="r_mean",
            batch_size=int(cfg.get("batch_size_test", 128)),
        ),
    )


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars) to a config mapping.

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override {item!r} must look like section.key=value, e.g. optim.lr=3e-4"
            )
        try:
            value = yaml.load(raw, Loader=ConfigLoader) if raw.strip() else None
        except yaml.YAMLError:  # not YAML: keep the string
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {key!r}; each key may appear once per section")
        seen[key] = value
    return seen


#: Numbers YAML 1.2 reads as floats and PyYAML's YAML 1.1 reads as strings: ``3e-4``, ``1.0e5``.
_YAML12_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")


class ConfigLoader(yaml.SafeLoader):
    """The YAML loader of configs: a ``SafeLoader`` that reads ``3e-4`` as a number and refuses
    a key given twice in one mapping (PyYAML would keep the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(
                    f"duplicate key {key!r} at line {line}; each key may appear once per section"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789"))


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML, JSON or TOML file into a dict, with errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist; give the path of a .yaml, .json or .toml file"
        )
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=ConfigLoader)  # ConfigLoader is a SafeLoader
        elif suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_json_object)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ImportError as exc:
                    raise ConfigError(
                        f"reading {str(p)!r} needs Python 3.11+ or 'pip install tomli'"
                    ) from exc
            data = tomllib.loads(text)
        else:
            raise ConfigError(
                f"config file {str(p)!r} has suffix {suffix!r}; use .yaml, .yml, .json or .toml"
            )
    except ConfigError:
        raise
    except Exception as exc:  # parse errors of three different libraries
        raise ConfigError(f"cannot parse config file {str(p)!r}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data
