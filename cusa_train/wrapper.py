"""Plug-and-play CUSA for any dual-encoder student.

:class:`CusaModel` wraps a student that has ``encode_image(images)`` and ``encode_text(texts)``,
adds the cross-modal heads, the uni-modal projector heads and the temperatures, and returns
the CUSA losses from stored teacher features::

    model = CusaModel(student, LossConfig())
    out = model(images, texts, image_ids, teacher_image, teacher_text)
    out["loss"].backward()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from cusa.errors import ConfigError
from cusa_train.checkpoints import read_torch_file
from cusa_train.config.loss import LossConfig, TemperatureConfig, TemperaturePairConfig
from cusa_train.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    ids_to_codes,
    is_distributed,
)
from cusa_train.losses import CusaLoss, CusaTemperatures

logger = logging.getLogger(__name__)

#: All-gather modes of :class:`CusaModel` (``run.all_gather`` in the training config).
GATHER_MODES: tuple[str, ...] = ("off", "on", "official")


@runtime_checkable
class DualEncoder(Protocol):
    """What a student must provide. Output dims come from ``image_dim``/``text_dim`` (or
    ``embed_dim``/``output_dim``) attributes, or the ``image_dim``/``text_dim`` arguments of
    :class:`CusaModel`."""

    def encode_image(self, images: Any) -> Tensor: ...

    def encode_text(self, texts: Any) -> Tensor: ...


class ProjectionHead(nn.Module):
    """LayerNorm then Linear, as the official CUSA heads (weights ~ N(0, init_std))."""

    def __init__(self, in_dim: int, out_dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_dim) -> (B, out_dim)
        return self.proj(self.norm(x))


class Temperature(nn.Module):
    """One temperature: a learnable parameter or a fixed buffer, clamped to ``[min, max]``.

    :meth:`clamp_` is called by :class:`TemperatureBank` once per forward, before any use.
    """

    def __init__(self, config: TemperatureConfig) -> None:
        super().__init__()
        self.min = config.min
        self.max = config.max
        self.learnable = config.learnable
        value = torch.tensor(float(config.init))
        if config.learnable:
            self.value = nn.Parameter(value)
        else:
            self.register_buffer("value", value)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.value.clamp_(min=self.min, max=self.max)

    def forward(self) -> Tensor:
        return self.value

    def extra_repr(self) -> str:
        kind = "learnable" if self.learnable else "fixed"
        return f"{float(self.value):.4g} in [{self.min}, {self.max}], {kind}"


class TemperatureBank(nn.Module):
    """All temperatures of a CUSA model, one module per distinct parameter.

    Shared temperatures (``shared: true``, or USA reusing CSA's with ``"csa"``) are one module
    used by several roles, so they are trained and clamped together.
    """

    def __init__(self, loss: LossConfig) -> None:
        super().__init__()
        self.temps = nn.ModuleDict()
        self.roles: dict[str, str] = {}  # role in CusaTemperatures -> key in self.temps
        if loss.itr.enabled:
            self._add("itr", loss.itr.tau, "itr")
        if loss.csa.enabled:
            self._add_pair("csa", loss.csa.tau, ("csa_i2t", "csa_t2i"))
            self._add_pair(
                "csa_teacher", loss.csa.teacher_tau, ("csa_teacher_image", "csa_teacher_text")
            )
        if loss.usa.enabled:
            if loss.usa.tau == "csa":
                self.roles["usa_image"] = self.roles["csa_i2t"]
                self.roles["usa_text"] = self.roles["csa_t2i"]
            else:
                self._add_pair("usa", loss.usa.tau, ("usa_image", "usa_text"))
            if loss.usa.teacher_tau == "csa":
                self.roles["usa_teacher_image"] = self.roles["csa_teacher_image"]
                self.roles["usa_teacher_text"] = self.roles["csa_teacher_text"]
            else:
                self._add_pair(
                    "usa_teacher", loss.usa.teacher_tau, ("usa_teacher_image", "usa_teacher_text")
                )

    def _add(self, key: str, config: TemperatureConfig, *roles: str) -> None:
        self.temps[key] = Temperature(config)
        for role in roles:
            self.roles[role] = key

    def _add_pair(self, key: str, pair: TemperaturePairConfig, roles: tuple[str, str]) -> None:
        if pair.shared:
            self._add(key, pair.merged, *roles)
        else:
            self._add(f"{key}_image", pair.image, roles[0])
            self._add(f"{key}_text", pair.text, roles[1])

    def forward(self) -> CusaTemperatures:
        """Clamp every temperature in place, then hand them out by role."""
        for temp in self.temps.values():
            temp.clamp_()
        return CusaTemperatures(**{role: self.temps[key]() for role, key in self.roles.items()})

    def values(self) -> dict[str, float]:
        """Current values by name, for logging (``tau/<name>``)."""
        return {key: float(t.value.detach()) for key, t in self.temps.items()}


def _student_dim(student: Any, modality: str) -> int | None:
    for attr in (f"{modality}_dim", "embed_dim", "output_dim"):
        value = getattr(student, attr, None)
        if isinstance(value, int):
            return value
    return None


class CusaModel(nn.Module):
    """A student plus everything CUSA adds: heads, temperatures and the loss.

    Args:
        student: any module with ``encode_image(images) -> (B, image_dim)`` and
            ``encode_text(texts) -> (B, text_dim)``.
        loss: loss settings; defaults are the official ``cusa.yaml``.
        embed_dim: output size of the heads; defaults to the student's (both towers must agree).
        image_dim, text_dim: the student's output sizes when it has no ``image_dim``/``text_dim``
            (or ``embed_dim``/``output_dim``) attribute.
        head_init_std: std of the heads' Linear weights (official 0.02).
        gather: under DDP, ``"on"`` (or ``True``) all-gathers embeddings, teacher features and ids
            before the loss and scales the local gradient by the world size (the exact gradient of
            the global-batch loss); ``"official"`` gathers with the official unscaled backward;
            ``"off"`` (or ``False``, every official config) keeps each rank's loss local.

    The cross-modal heads (LayerNorm + Linear per modality) feed retrieval and the InfoNCE and CSA
    terms; the separate uni-modal projector heads feed USA only.
    """

    def __init__(
        self,
        student: nn.Module,
        loss: LossConfig | None = None,
        *,
        embed_dim: int | None = None,
        image_dim: int | None = None,
        text_dim: int | None = None,
        head_init_std: float = 0.02,
        gather: bool | str = "on",
    ) -> None:
        super().__init__()
        if not isinstance(student, DualEncoder):
            raise ConfigError(
                f"student {type(student).__name__!r} has no encode_image/encode_text; "
                "wrap it in an adapter (see cusa_train.students.adapters) or add those two methods"
            )
        self.loss_config = loss or LossConfig()
        image_dim = image_dim or _student_dim(student, "image")
        text_dim = text_dim or _student_dim(student, "text")
        if image_dim is None or text_dim is None:
            raise ConfigError(
                f"cannot tell the output sizes of student {type(student).__name__!r}; "
                "give it image_dim/text_dim attributes or pass image_dim=..., text_dim=... to CusaModel"
            )
        if embed_dim is None:
            if image_dim != text_dim:
                raise ConfigError(
                    f"student towers output {image_dim} (image) and {text_dim} (text) dims; "
                    "set embed_dim (model.embed_dim) so the heads map both to one size"
                )
            embed_dim = image_dim
        self.student = student
        self.image_dim, self.text_dim, self.embed_dim = image_dim, text_dim, embed_dim
        self.gather = gather
        self.cross_image_head = ProjectionHead(image_dim, embed_dim, head_init_std)
        self.cross_text_head = ProjectionHead(text_dim, embed_dim, head_init_std)
        self.uni_image_head: ProjectionHead | None = None
        self.uni_text_head: ProjectionHead | None = None
        if self.loss_config.usa.enabled:
            self.uni_image_head = ProjectionHead(image_dim, embed_dim, head_init_std)
            self.uni_text_head = ProjectionHead(text_dim, embed_dim, head_init_std)
        self.temperatures = TemperatureBank(self.loss_config)
        self.criterion = CusaLoss.from_config(self.loss_config)

    @property
    def needs_teachers(self) -> bool:
        return self.criterion.needs_teachers

    @property
    def gather(self) -> str:
        """The all-gather mode: ``"off"``, ``"on"`` or ``"official"`` (see the class docstring)."""
        return self._gather

    @gather.setter
    def gather(self, mode: bool | str) -> None:
        if isinstance(mode, bool):
            mode = "on" if mode else "off"
        if mode not in GATHER_MODES:
            raise ConfigError(f"gather={mode!r} is not supported; use one of {GATHER_MODES}")
        self._gather = mode

    def encode_image(self, images: Any, uni_modal: bool = False) -> Tensor:
        """Images -> head embeddings (B, embed_dim), not normalised; ``uni_modal`` picks the USA head."""
        return self._head("image", uni_modal)(self.student.encode_image(images))

    def encode_text(self, texts: Any, uni_modal: bool = False) -> Tensor:
        """Texts -> head embeddings (B, embed_dim), not normalised; ``uni_modal`` picks the USA head."""
        return self._head("text", uni_modal)(self.student.encode_text(texts))

    def official_encode_image(self, images: Any, cross_modal: bool = True) -> Tensor:
        """The official ``unire.encode_image(image, cross_modal)``: the cross-modal head, or with
        ``cross_modal=False`` the USA head, or the student's backbone features when the model was
        trained without USA heads (what ``evaluation_img.py`` scores)."""
        return self._official("image", self.student.encode_image(images), cross_modal)

    def official_encode_text(self, texts: Any, cross_modal: bool = True) -> Tensor:
        """The official ``unire.encode_text(text, cross_modal)`` (see :meth:`official_encode_image`;
        what ``evaluation_sts.py`` scores with ``cross_modal=False``)."""
        return self._official("text", self.student.encode_text(texts), cross_modal)

    def _official(self, modality: str, feats: Tensor, cross_modal: bool) -> Tensor:
        if cross_modal:
            return self._head(modality, False)(feats)
        head = getattr(self, f"uni_{modality}_head")
        return feats if head is None else head(feats)

    def _head(self, modality: str, uni_modal: bool) -> nn.Module:
        head = getattr(self, f"{'uni' if uni_modal else 'cross'}_{modality}_head")
        if head is None:
            raise ConfigError("this model has no uni-modal heads; enable loss.usa to train them")
        return head

    def forward(
        self,
        images: Any,
        texts: Any,
        image_ids: Tensor | Sequence[str | int] | None = None,
        teacher_image: Tensor | None = None,
        teacher_text: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Run the student on a batch of (image, caption) pairs and return the CUSA losses.

        Args:
            images: the student's image input for B pairs (an image may repeat).
            texts: the student's text input for the B captions.
            image_ids: (B,) image id of each pair (int64 tensor, or ids that
                :func:`cusa_train.distributed.ids_to_codes` maps); pairs sharing one are positives.
            teacher_image: (B, Ti) stored image teacher features of each pair's image.
            teacher_text: (B, Tt) stored text teacher features of each caption.

        Returns:
            dict with ``loss``, ``itr``, ``csa``, ``usa`` (see :class:`cusa_train.losses.CusaLoss`).
        """
        return self.forward_features(
            self.student.encode_image(images),
            self.student.encode_text(texts),
            image_ids,
            teacher_image,
            teacher_text,
        )

    def forward_features(
        self,
        image_features: Tensor,
        text_features: Tensor,
        image_ids: Tensor | Sequence[str | int] | None = None,
        teacher_image: Tensor | None = None,
        teacher_text: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The losses from student backbone outputs (B, image_dim) and (B, text_dim)."""
        temps = self.temperatures()
        ids = None if image_ids is None else ids_to_codes(image_ids).to(image_features.device)
        cross_image = self.cross_image_head(image_features)  # (B, E)
        cross_text = self.cross_text_head(text_features)  # (B, E)
        uni_image = uni_text = None
        if self.uni_image_head is not None and self.uni_text_head is not None:
            uni_image = self.uni_image_head(image_features)  # (B, E)
            uni_text = self.uni_text_head(text_features)  # (B, E)
        if self.needs_teachers and (teacher_image is None or teacher_text is None):
            raise ConfigError(
                "CSA/USA are enabled but the batch has no teacher features; attach them from the store "
                "(cusa_train.data) or disable loss.csa and loss.usa"
            )
        if not self.needs_teachers:
            teacher_image = teacher_text = None
        if teacher_image is not None:
            teacher_image = teacher_image.to(image_features.device)
            teacher_text = teacher_text.to(image_features.device)
        if self.gather != "off" and is_distributed():
            scale = self.gather == "on"
            cross_image, cross_text = (
                all_gather_with_grad(cross_image, scale),
                all_gather_with_grad(cross_text, scale),
            )
            if uni_image is not None:
                uni_image, uni_text = (
                    all_gather_with_grad(uni_image, scale),
                    all_gather_with_grad(uni_text, scale),
                )
            if teacher_image is not None:
                teacher_image, teacher_text = (
                    all_gather_no_grad(teacher_image),
                    all_gather_no_grad(teacher_text),
                )
            if ids is not None:
                ids = all_gather_no_grad(ids)
        return self.criterion(
            cross_image,
            cross_text,
            teacher_image,
            teacher_text,
            temps,
            image_ids=ids,
            uni_image_embeds=uni_image,
            uni_text_embeds=uni_text,
        )

    def temperature_values(self) -> dict[str, float]:
        """Current temperatures by name, e.g. ``{"itr": 0.05, "csa": 0.45, ...}``."""
        return self.temperatures.values()

    def cusa_parameters(self) -> list[nn.Parameter]:
        """Parameters CUSA adds (heads and learnable temperatures), not the student's."""
        student_ids = {id(p) for p in self.student.parameters()}
        return [p for p in self.parameters() if id(p) not in student_ids]


# Official ``unire`` parameter names -> CusaModel names.
_OFFICIAL_TEMPERATURES = {
    "tau": "itr",
    "cross_tau": "csa",
    "cross_the_softlabel_tau": "csa_teacher",
    "uni_tau": "usa",
    "uni_the_softlabel_tau": "usa_teacher",
}
_OFFICIAL_HEADS = {
    "ln_cross_image_projection": "cross_image_head.norm",
    "ln_cross_text_projection": "cross_text_head.norm",
    "cross_image_projection": "cross_image_head.proj",
    "cross_text_projection": "cross_text_head.proj",
    "ln_uni_image_projection": "uni_image_head.norm",
    "ln_uni_text_projection": "uni_text_head.norm",
    "uni_image_projection": "uni_image_head.proj",
    "uni_text_projection": "uni_text_head.proj",
}


def convert_official_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename an official CUSA (``unire``) state dict to :class:`CusaModel` keys.

    Heads and temperatures are renamed; ``clip_model.*`` becomes ``student.*`` (it loads only into
    a student with the same layout). Load the result with ``model.load_state_dict(..., strict=False)``
    when the student differs.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        head, _, leaf = key.rpartition(".")
        if key.startswith("clip_model."):
            out["student." + key[len("clip_model.") :]] = value
        elif head in _OFFICIAL_HEADS:
            out[f"{_OFFICIAL_HEADS[head]}.{leaf}"] = value
        else:
            base, side = key, ""
            for suffix in ("_image", "_text"):
                if key.endswith(suffix) and key[: -len(suffix)] in _OFFICIAL_TEMPERATURES:
                    base, side = key[: -len(suffix)], suffix
            if base not in _OFFICIAL_TEMPERATURES:
                raise ConfigError(
                    f"unknown official CUSA parameter {key!r}; expected heads, temperatures or clip_model.*"
                )
            out[f"temperatures.temps.{_OFFICIAL_TEMPERATURES[base]}{side}.value"] = value
    return out


def load_init_weights(model: CusaModel, path: str | os.PathLike) -> list[str]:
    """Start ``model`` from the state dict in ``path`` (``model.init_from`` in the config).

    Accepts a ``cusa train`` checkpoint (``{"model": ...}``), an official CUSA checkpoint
    (``{"model": unire_state_dict, ...}``) or a bare state dict of either naming; official
    ``unire`` names are converted with :func:`convert_official_state_dict`. The file is read with
    ``weights_only=True``.

    Returns:
        The model keys the file did not set (they keep their current values).

    Raises:
        ConfigError: the file is missing or unreadable, holds a key the model does not have, or a
            tensor of another shape.
    """
    p = Path(path)
    obj = read_torch_file(p, "model.init_from")
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"model.init_from={str(p)!r} holds no state dict of tensors")
    own = model.state_dict()
    if not set(k.removeprefix("module.") for k in state) <= set(own):
        state = convert_official_state_dict(state)
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ConfigError(
            f"model.init_from={str(p)!r} has {len(unknown)} key(s) this model lacks, e.g. "
            f"{unknown[:3]}; it was made for another student or loss configuration"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ConfigError(
                f"model.init_from={str(p)!r}: {key!r} has shape {tuple(value.shape)}, the model "
                f"{tuple(own[key].shape)}; it was made for another student or embed_dim"
            )
    model.load_state_dict(state, strict=False)
    return sorted(set(own) - set(state))
