"""The loss section of a training config: ITR, CSA and USA terms and their temperatures.

Defaults are the official ``cusa.yaml``; :meth:`LossConfig.from_official` maps the official CUSA
``loss_config`` YAML tree (lerogo/aaai24_itr_cusa) onto it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    StrictBool,
    StrictFloat,
    with_config,
)

from cusa.errors import ConfigError
from cusa_train.config.parsing import SECTION, build, check_positive, check_ranges, in_range

# ---- losses and temperatures -------------------------------------------------------------------

#: A temperature out of range: ``{name}`` is where it is (e.g. ``loss.itr.tau.min``).
_TEMPERATURE = (
    "temperature {key}={{value!r}} is out of range (at {{name}}); temperatures must be > 0"
)


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

    init: Annotated[StrictFloat, in_range(gt=0, message=_TEMPERATURE.format(key="init"))]
    min: Annotated[
        StrictFloat, in_range(gt=0, message=_TEMPERATURE.format(key="min") + "; use e.g. min: 0.01")
    ]
    max: Annotated[StrictFloat, in_range(gt=0, message=_TEMPERATURE.format(key="max"))]
    learnable: StrictBool = True

    def __post_init__(self) -> None:
        check_ranges(self, "temperature")
        if self.min > self.max:
            raise ConfigError(
                f"temperature min={self.min!r} > max={self.max!r}; swap them or widen the range"
            )
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
    weight: Annotated[StrictFloat, in_range(ge=0)] = 1.0
    mode: ItrMode = "mean"
    tau: TemperatureConfig = field(default_factory=lambda: TemperatureConfig(0.05, 0.01, 0.1))

    def __post_init__(self) -> None:
        check_ranges(self, "loss.itr")


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
    weight: Annotated[StrictFloat, in_range(ge=0, fix="use alpha >= 0 (official 0.1)")] = 0.1
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
        check_ranges(self, "loss.csa")


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
    weight: Annotated[StrictFloat, in_range(ge=0, fix="use beta >= 0 (official 0.5)")] = 0.5
    objective: SoftObjective = "kl"
    mode: ItrMode = "mean"
    tau: TemperaturePair | Literal["csa"] = field(
        default_factory=lambda: TemperaturePairConfig(
            image=TemperatureConfig(0.45, 0.1, 1.0), text=TemperatureConfig(0.45, 0.1, 1.0)
        )
    )
    teacher_tau: TemperaturePair | Literal["csa"] = "csa"

    def __post_init__(self) -> None:
        check_ranges(self, "loss.usa")


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
        150-600 COCO images, frozen towers, 95% intervals of the paired difference from InfoNCE)
        τ = 0.5 is the only setting whose interval is never below zero in the headline cells; it
        helps with a longer schedule (lr 3e-3 x 40 epochs: +28.5 [+20.9, +36.1] RSUM at 600
        images, +11.2 [+3.4, +19.0] at 150) and does nothing measurable with InfoNCE's short one
        (-0.1 [-2.9, +2.7] at 600). It is an option to test, not a better default: the paper
        presets keep the official ``LossConfig()``; check it against InfoNCE on held-out training
        pairs of your own.

        Raises:
            ConfigError: ``tau`` is not a positive number.
        """
        check_positive(tau, "sharper_soft_labels tau", "use a soft-label temperature > 0, e.g. 0.5")
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
