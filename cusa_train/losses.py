"""CUSA losses: multi-positive InfoNCE, cross-modal (CSA) and uni-modal (USA) soft-label alignment.

Every loss is an ``nn.Module`` that takes tensors and returns a 0-d tensor. None of them runs a
model: student embeddings, teacher features and temperatures are computed by the caller
(usually :class:`cusa_train.wrapper.CusaModel`) and passed in.

Reference: Huang et al., *Cross-modal and Uni-modal Soft-label Alignment for Image-Text
Retrieval*, AAAI 2024 (https://arxiv.org/abs/2403.05261). The math matches the official
``unire/model.py`` (lerogo/aaai24_itr_cusa); ``tests/cusa_train/test_losses.py`` checks it against
golden outputs of that code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cusa.errors import ConfigError
from cusa.registry import Registry

if TYPE_CHECKING:
    from cusa_train.config.loss import LossConfig

ItrMode = Literal["mean", "sum"]
CombineMode = Literal["each", "add", "dot"]
SoftObjective = Literal["kl", "cross-entropy"]
ITR_MODES: tuple[str, ...] = ("mean", "sum")
COMBINE_MODES: tuple[str, ...] = ("each", "add", "dot")
SOFT_OBJECTIVES: tuple[str, ...] = ("kl", "cross-entropy")
#: The keys of the dict that :class:`CusaLoss` returns, always all present.
LOSS_KEYS: tuple[str, ...] = ("loss", "itr", "csa", "usa")

#: Loss classes by name, for configs and plugins.
losses: Registry[type[nn.Module]] = Registry("loss")


def cosine_similarity_matrix(a: Tensor, b: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Pairwise cosine similarity between the rows of ``a`` (N, D) and ``b`` (M, D), (N, M).

    ``b`` defaults to ``a``. Rows are L2-normalised first (like ``sentence_transformers.util.cos_sim``).
    """
    a = F.normalize(a, dim=-1, eps=eps)
    b = a if b is None else F.normalize(b, dim=-1, eps=eps)
    return a @ b.t()


def multi_positive_targets(
    image_ids: Tensor | None, n: int, device: torch.device | None = None
) -> Tensor:
    """Row-normalised positive mask, (n, n).

    Pairs ``i`` and ``j`` are positives when they share an image id, so several captions of one
    image in a batch are all positives of each other. ``None`` means only the diagonal.
    """
    if image_ids is None:
        return torch.eye(n, device=device)
    ids = image_ids.reshape(-1, 1)
    pos = torch.eq(ids, ids.t()).float()  # (n, n) 1 where the image ids match
    return pos / pos.sum(dim=1, keepdim=True)


def soft_label_kl(
    student_sim: Tensor, teacher_sim: Tensor, tau: Tensor | float, teacher_tau: Tensor | float
) -> Tensor:
    """``KL(softmax(teacher_sim / teacher_tau) || softmax(student_sim / tau))``, batchmean.

    Args:
        student_sim: (N, M) student cosine similarities (rows are queries).
        teacher_sim: (N, M) teacher cosine similarities; no gradient flows into them.
        tau: student temperature.
        teacher_tau: soft-label temperature.
    """
    targets = F.softmax(teacher_sim.detach() / teacher_tau, dim=1)  # (N, M) soft labels
    log_probs = F.log_softmax(student_sim / tau, dim=1)  # (N, M)
    return F.kl_div(log_probs, targets, reduction="batchmean")


def soft_label_cross_entropy(
    student_sim: Tensor,
    teacher_sim: Tensor,
    tau: Tensor | float,
    teacher_tau: Tensor | float,
    mode: ItrMode = "mean",
) -> Tensor:
    """InfoNCE against soft labels: ``-sum_j p_teacher(j) log p_student(j)``, averaged over rows.

    The official ``use_loss: contrastive``. With ``mode="mean"`` the row sum becomes a mean over
    the columns, as in the official ``contrastive_loss_mode: mean``. For the student it differs
    from :func:`soft_label_kl` only by the teacher entropy (and, in ``mean`` mode, a 1/M factor).
    """
    targets = F.softmax(teacher_sim.detach() / teacher_tau, dim=1)  # (N, M) soft labels
    log_probs = F.log_softmax(student_sim / tau, dim=1)  # (N, M)
    reduce = torch.mean if mode == "mean" else torch.sum
    return -reduce(log_probs * targets, dim=1).mean()


def _check_objective(objective: str, mode: str, where: str) -> None:
    if objective not in SOFT_OBJECTIVES:
        raise ConfigError(
            f"{where} objective {objective!r} is not supported; use one of {SOFT_OBJECTIVES}"
        )
    if mode not in ITR_MODES:
        raise ConfigError(f"{where} mode {mode!r} is not supported; use one of {ITR_MODES}")


def soft_label_loss(
    student_sim: Tensor,
    teacher_sim: Tensor,
    tau: Tensor | float,
    teacher_tau: Tensor | float,
    objective: SoftObjective = "kl",
    mode: ItrMode = "mean",
) -> Tensor:
    """:func:`soft_label_kl` (``objective="kl"``) or :func:`soft_label_cross_entropy`."""
    if objective == "kl":
        return soft_label_kl(student_sim, teacher_sim, tau, teacher_tau)
    return soft_label_cross_entropy(student_sim, teacher_sim, tau, teacher_tau, mode)


@losses.register("infonce")
class MultiPositiveInfoNCELoss(nn.Module):
    """Symmetric InfoNCE over the batch with multiple positives per row (image-text retrieval loss).

    Rows of the similarity matrix are images and columns are their paired captions; every pair
    whose image id matches is a positive, each weighted ``1 / #positives`` in its row.

    ``mode="mean"`` averages the per-entry cross-entropy over the columns as well (the official
    CUSA configs use it: it equals the usual loss divided by the batch size); ``mode="sum"`` is the
    standard InfoNCE. The result is ``(L_i2t + L_t2i) / 2``.

    Args:
        mode: ``"mean"`` (official) or ``"sum"`` (standard).

    Inputs:
        ============== ======== ==============================================
        similarity     (B, B)   student cosine, image rows x text columns
        tau            ()       temperature (already clamped)
        image_ids      (B,)     int64 image id of each pair, or None
        ============== ======== ==============================================

    Returns:
        0-d tensor.

    Example::

        loss_fn = MultiPositiveInfoNCELoss(mode="sum")
        sim = cosine_similarity_matrix(img_emb, txt_emb)
        loss = loss_fn(sim, torch.tensor(0.05), image_ids)
    """

    def __init__(self, mode: ItrMode = "mean") -> None:
        super().__init__()
        if mode not in ITR_MODES:
            raise ConfigError(f"InfoNCE mode {mode!r} is not supported; use one of {ITR_MODES}")
        self.mode = mode

    def forward(
        self, similarity: Tensor, tau: Tensor | float, image_ids: Tensor | None = None
    ) -> Tensor:
        targets = multi_positive_targets(
            image_ids, similarity.shape[0], similarity.device
        )  # (B, B)
        reduce = torch.mean if self.mode == "mean" else torch.sum
        loss_i2t = -reduce(F.log_softmax(similarity / tau, dim=1) * targets, dim=1).mean()
        loss_t2i = -reduce(F.log_softmax(similarity.t() / tau, dim=1) * targets, dim=1).mean()
        return (loss_i2t + loss_t2i) / 2.0

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def combine_teacher_similarities(
    image_sim: Tensor, text_sim: Tensor, combine: CombineMode
) -> tuple[Tensor, Tensor]:
    """The soft-label targets for the (i2t, t2i) rows of CSA.

    ``each``: image teacher's image-image cosine for i2t, text teacher's text-text cosine for t2i.
    ``add``: their average for both. ``dot``: ``sqrt(relu(img) * relu(txt))`` for both.
    """
    if combine == "each":
        return image_sim, text_sim
    if combine == "add":
        both = (image_sim + text_sim) / 2.0
    elif combine == "dot":
        both = torch.sqrt(image_sim.clamp(min=0.0) * text_sim.clamp(min=0.0))
    else:
        raise ConfigError(
            f"CSA combine mode {combine!r} is not supported; use one of {COMBINE_MODES}"
        )
    return both, both


@losses.register("csa")
class CrossModalSoftLabelLoss(nn.Module):
    """Cross-modal soft-label alignment (CSA) of the CUSA paper.

    The student's image-to-text (and text-to-image) distribution over the batch is pulled towards
    the teachers' uni-modal distribution: ``KL(softmax(teacher_cos / tau_soft) ||
    softmax(student_cos / tau))`` with batchmean, averaged over the two directions.

    Args:
        combine: which teacher similarities are the targets. ``"each"`` (official default): i2t rows
            use the image teacher's image-image cosine and t2i rows the text teacher's text-text
            cosine; ``"add"``: the average of both for both directions; ``"dot"``: the geometric
            mean of their positive parts for both directions.
        objective: ``"kl"`` (official default) or ``"cross-entropy"`` (official ``use_loss:
            contrastive``), see :func:`soft_label_loss`.
        mode: reduction of ``cross-entropy``: ``"mean"`` (official) or ``"sum"``.

    Inputs:
        ================== ======= ==============================================
        similarity         (B, B)  student cosine, image rows x text columns
        teacher_image_sim  (B, B)  image teacher cosine between the batch images
        teacher_text_sim   (B, B)  text teacher cosine between the batch captions
        tau_i2t, tau_t2i   ()      student temperatures per direction
        teacher_tau_image  ()      soft-label temperature of the i2t targets
        teacher_tau_text   ()      soft-label temperature of the t2i targets
        ================== ======= ==============================================

    Returns:
        0-d tensor (unweighted; :class:`CusaLoss` applies ``alpha``).

    Example::

        csa = CrossModalSoftLabelLoss()
        t_img = cosine_similarity_matrix(teacher_image_features)
        t_txt = cosine_similarity_matrix(teacher_text_features)
        loss = csa(sim, t_img, t_txt, tau_i2t=0.45, tau_t2i=0.45,
                   teacher_tau_image=1.0, teacher_tau_text=1.0)
    """

    def __init__(
        self, combine: CombineMode = "each", objective: SoftObjective = "kl", mode: ItrMode = "mean"
    ) -> None:
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ConfigError(
                f"CSA combine mode {combine!r} is not supported; use one of {COMBINE_MODES}"
            )
        _check_objective(objective, mode, "CSA")
        self.combine = combine
        self.objective = objective
        self.mode = mode

    def forward(
        self,
        similarity: Tensor,
        teacher_image_sim: Tensor,
        teacher_text_sim: Tensor,
        *,
        tau_i2t: Tensor | float,
        tau_t2i: Tensor | float,
        teacher_tau_image: Tensor | float,
        teacher_tau_text: Tensor | float,
    ) -> Tensor:
        target_i2t, target_t2i = combine_teacher_similarities(
            teacher_image_sim, teacher_text_sim, self.combine
        )
        loss_i2t = soft_label_loss(
            similarity, target_i2t, tau_i2t, teacher_tau_image, self.objective, self.mode
        )
        loss_t2i = soft_label_loss(
            similarity.t(), target_t2i, tau_t2i, teacher_tau_text, self.objective, self.mode
        )
        return (loss_i2t + loss_t2i) / 2.0

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}, objective={self.objective!r}"


@losses.register("usa")
class UniModalSoftLabelLoss(nn.Module):
    """Uni-modal soft-label alignment (USA) of the CUSA paper.

    The student's image-image and text-text distributions, computed from the uni-modal projector
    heads, are pulled towards the teachers' with ``KL`` (batchmean), averaged over the two modalities.

    Inputs:
        =================== ======= ============================================
        student_image_sim   (B, B)  cosine between uni-head image embeddings
        student_text_sim    (B, B)  cosine between uni-head text embeddings
        teacher_image_sim   (B, B)  image teacher cosine
        teacher_text_sim    (B, B)  text teacher cosine
        tau_image, tau_text ()      student temperatures
        teacher_tau_image   ()      soft-label temperatures
        teacher_tau_text    ()
        =================== ======= ============================================

    Args:
        objective: ``"kl"`` (official default) or ``"cross-entropy"``, see :func:`soft_label_loss`.
        mode: reduction of ``cross-entropy``: ``"mean"`` (official) or ``"sum"``.

    Returns:
        0-d tensor (unweighted; :class:`CusaLoss` applies ``beta``).

    Example::

        usa = UniModalSoftLabelLoss()
        loss = usa(cosine_similarity_matrix(uni_img), cosine_similarity_matrix(uni_txt),
                   t_img, t_txt, tau_image=0.45, tau_text=0.45,
                   teacher_tau_image=1.0, teacher_tau_text=1.0)
    """

    def __init__(self, objective: SoftObjective = "kl", mode: ItrMode = "mean") -> None:
        super().__init__()
        _check_objective(objective, mode, "USA")
        self.objective = objective
        self.mode = mode

    def forward(
        self,
        student_image_sim: Tensor,
        student_text_sim: Tensor,
        teacher_image_sim: Tensor,
        teacher_text_sim: Tensor,
        *,
        tau_image: Tensor | float,
        tau_text: Tensor | float,
        teacher_tau_image: Tensor | float,
        teacher_tau_text: Tensor | float,
    ) -> Tensor:
        loss_image = soft_label_loss(
            student_image_sim,
            teacher_image_sim,
            tau_image,
            teacher_tau_image,
            self.objective,
            self.mode,
        )
        loss_text = soft_label_loss(
            student_text_sim,
            teacher_text_sim,
            tau_text,
            teacher_tau_text,
            self.objective,
            self.mode,
        )
        return (loss_image + loss_text) / 2.0

    def extra_repr(self) -> str:
        return f"objective={self.objective!r}"


@dataclass(frozen=True)
class CusaTemperatures:
    """Clamped 0-d temperature tensors for every term, as the model wrapper hands them out.

    Terms that are switched off leave their temperatures as ``None``.
    """

    itr: Tensor | None = None
    csa_i2t: Tensor | None = None
    csa_t2i: Tensor | None = None
    csa_teacher_image: Tensor | None = None
    csa_teacher_text: Tensor | None = None
    usa_image: Tensor | None = None
    usa_text: Tensor | None = None
    usa_teacher_image: Tensor | None = None
    usa_teacher_text: Tensor | None = None


def _require(value: Tensor | None, name: str) -> Tensor:
    if value is None:
        raise ConfigError(
            f"temperature {name!r} is None but its loss term is enabled; build it with CusaModel"
        )
    return value


class CusaLoss(nn.Module):
    """The total CUSA objective ``L = w_itr * L_itr + alpha * L_CSA + beta * L_USA``.

    Args:
        itr_weight, csa_weight, usa_weight: term weights; 0 switches a term off (official: 1, 0.1, 0.5).
        itr_mode: InfoNCE reduction, ``"mean"`` (official) or ``"sum"``.
        csa_combine: CSA target mode, ``"each"`` (official), ``"add"`` or ``"dot"``.
        csa_objective, usa_objective: ``"kl"`` (official) or ``"cross-entropy"``.
        csa_mode, usa_mode: reduction of a ``cross-entropy`` objective, ``"mean"`` or ``"sum"``.

    Inputs:
        ======================= ========= =======================================================
        image_embeds            (B, E)    cross-modal head output for images
        text_embeds             (B, E)    cross-modal head output for captions
        teacher_image_features  (B, Ti)   stored image teacher features (any norm; cosine is used)
        teacher_text_features   (B, Tt)   stored text teacher features
        temperatures            -         :class:`CusaTemperatures`, clamped
        image_ids               (B,)      int64 image id per pair (multi-positives), or None
        uni_image_embeds        (B, E)    uni-modal head output for images (needed for USA)
        uni_text_embeds         (B, E)    uni-modal head output for captions (needed for USA)
        ======================= ========= =======================================================

    Returns:
        ``dict`` with exactly the keys :data:`LOSS_KEYS`: ``loss`` (the total to backpropagate),
        and the *weighted* terms ``itr``, ``csa``, ``usa`` (0-d tensors, zero when switched off),
        so that ``loss == itr + csa + usa``.
    """

    def __init__(
        self,
        itr_weight: float = 1.0,
        csa_weight: float = 0.1,
        usa_weight: float = 0.5,
        itr_mode: ItrMode = "mean",
        csa_combine: CombineMode = "each",
        csa_objective: SoftObjective = "kl",
        csa_mode: ItrMode = "mean",
        usa_objective: SoftObjective = "kl",
        usa_mode: ItrMode = "mean",
    ) -> None:
        super().__init__()
        for name, w in (
            ("itr_weight", itr_weight),
            ("csa_weight", csa_weight),
            ("usa_weight", usa_weight),
        ):
            if w < 0:
                raise ConfigError(
                    f"{name}={w!r} is negative; use a weight >= 0 (0 switches the term off)"
                )
        self.itr_weight = float(itr_weight)
        self.csa_weight = float(csa_weight)
        self.usa_weight = float(usa_weight)
        self.itr = MultiPositiveInfoNCELoss(itr_mode)
        self.csa = CrossModalSoftLabelLoss(csa_combine, csa_objective, csa_mode)
        self.usa = UniModalSoftLabelLoss(usa_objective, usa_mode)

    @classmethod
    def from_config(cls, config: LossConfig) -> CusaLoss:
        """Build from a validated :class:`cusa_train.config.loss.LossConfig`."""
        return cls(
            itr_weight=config.itr.weight if config.itr.enabled else 0.0,
            csa_weight=config.csa.weight if config.csa.enabled else 0.0,
            usa_weight=config.usa.weight if config.usa.enabled else 0.0,
            itr_mode=config.itr.mode,
            csa_combine=config.csa.combine,
            csa_objective=config.csa.objective,
            csa_mode=config.csa.mode,
            usa_objective=config.usa.objective,
            usa_mode=config.usa.mode,
        )

    @property
    def needs_teachers(self) -> bool:
        return self.csa_weight > 0 or self.usa_weight > 0

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        teacher_image_features: Tensor | None,
        teacher_text_features: Tensor | None,
        temperatures: CusaTemperatures,
        image_ids: Tensor | None = None,
        uni_image_embeds: Tensor | None = None,
        uni_text_embeds: Tensor | None = None,
    ) -> dict[str, Tensor]:
        zero = image_embeds.new_zeros(())
        out = {"itr": zero, "csa": zero, "usa": zero}
        similarity = cosine_similarity_matrix(
            image_embeds, text_embeds
        )  # (B, B) image rows, text cols
        if self.itr_weight > 0:
            out["itr"] = self.itr_weight * self.itr(
                similarity, _require(temperatures.itr, "itr"), image_ids
            )
        if self.needs_teachers:
            if teacher_image_features is None or teacher_text_features is None:
                raise ConfigError(
                    "CSA/USA are enabled but no teacher features were given; attach them from the store"
                )
            with torch.no_grad():
                t_img = cosine_similarity_matrix(
                    teacher_image_features.float()
                )  # (B, B) teacher image-image
                t_txt = cosine_similarity_matrix(
                    teacher_text_features.float()
                )  # (B, B) teacher text-text
            if self.csa_weight > 0:
                csa = self.csa(
                    similarity,
                    t_img,
                    t_txt,
                    tau_i2t=_require(temperatures.csa_i2t, "csa_i2t"),
                    tau_t2i=_require(temperatures.csa_t2i, "csa_t2i"),
                    teacher_tau_image=_require(temperatures.csa_teacher_image, "csa_teacher_image"),
                    teacher_tau_text=_require(temperatures.csa_teacher_text, "csa_teacher_text"),
                )
                out["csa"] = self.csa_weight * csa
            if self.usa_weight > 0:
                if uni_image_embeds is None or uni_text_embeds is None:
                    raise ConfigError("USA is enabled but no uni-modal embeddings were given")
                usa = self.usa(
                    cosine_similarity_matrix(uni_image_embeds),  # (B, B)
                    cosine_similarity_matrix(uni_text_embeds),  # (B, B)
                    t_img,
                    t_txt,
                    tau_image=_require(temperatures.usa_image, "usa_image"),
                    tau_text=_require(temperatures.usa_text, "usa_text"),
                    teacher_tau_image=_require(temperatures.usa_teacher_image, "usa_teacher_image"),
                    teacher_tau_text=_require(temperatures.usa_teacher_text, "usa_teacher_text"),
                )
                out["usa"] = self.usa_weight * usa
        return {"loss": out["itr"] + out["csa"] + out["usa"], **out}

    def extra_repr(self) -> str:
        return f"itr_weight={self.itr_weight}, csa_weight={self.csa_weight}, usa_weight={self.usa_weight}"
