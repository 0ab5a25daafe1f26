"""Embeddings: the network's features of a dataset, projected and searched (Huff et al.
2021, sections 2.2 and 6).

* :func:`embed`: penultimate (or any layer's) features of every image, with labels,
  predictions, errors and splits.
* :func:`project`: 2D projections, PCA, t-SNE (after PCA to 50 dimensions, as Huff et al.
  recommend) and UMAP (optional, ``pip install umap-learn``), each with its
  trustworthiness (Venna and Kaski 2001; scikit-learn), the share of each point's
  projected neighbours that are neighbours in feature space too.
* :func:`knn_outliers`: the mean distance of each case to its k nearest reference
  (training) cases, the k-nearest-neighbour approach of Faust et al. 2018 to spot cases
  unlike anything the model was trained on.
* :func:`nearest_cases`: the k nearest training cases of any case (example-based
  explanations build on it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.errors import InputError
from trustmap.inspect.activations import as_images, extract, penultimate_layer

__all__ = [
    "PROJECTIONS",
    "Embedding",
    "Neighbours",
    "OutlierScores",
    "Projection",
    "embed",
    "knn_outliers",
    "nearest_cases",
    "project",
]

PROJECTIONS = ("pca", "tsne", "umap")


@dataclass(frozen=True)
class Embedding:
    """Features of a dataset and what is known about each case.

    ``features`` ``(N, D)`` float32; ``labels`` ``(N,)`` (None when unknown);
    ``predictions`` and ``probabilities`` from the same forward pass; ``errors``
    ``predictions != labels`` (None without labels); ``splits`` ``(N,)`` split names (None
    when unknown); ``ids`` one id per case.
    """

    layer: str
    features: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray
    ids: list[str]
    labels: np.ndarray | None = None
    splits: np.ndarray | None = None
    classes: tuple[str, ...] = ()

    @property
    def errors(self) -> np.ndarray | None:
        return None if self.labels is None else self.predictions != self.labels

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def select(self, mask: np.ndarray) -> Embedding:
        """The cases where ``mask`` (bool ``(N,)`` or indices) holds."""
        idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask)
        return Embedding(
            layer=self.layer,
            features=self.features[idx],
            predictions=self.predictions[idx],
            probabilities=self.probabilities[idx],
            ids=[self.ids[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            splits=None if self.splits is None else self.splits[idx],
            classes=self.classes,
        )


@dataclass(frozen=True)
class Projection:
    """A 2D projection of features: ``coords`` ``(N, 2)``, its ``trustworthiness`` in
    [0, 1] at ``n_neighbors``, the ``params`` used and the ``seconds`` it took."""

    method: str
    coords: np.ndarray
    trustworthiness: float
    n_neighbors: int
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "trustworthiness": self.trustworthiness,
            "n_neighbors": self.n_neighbors,
            "params": self.params,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class OutlierScores:
    """kNN outlier scores: ``scores[i]`` the mean distance of case ``i`` to its ``k``
    nearest reference cases (itself excluded); ``percentile[i]`` the share of reference
    cases scoring lower; ``threshold`` the reference scores' ``quantile``; ``flagged``
    the cases above it."""

    scores: np.ndarray
    percentile: np.ndarray
    k: int
    reference: np.ndarray
    threshold: float
    quantile: float
    flagged: np.ndarray

    def top(self, n: int) -> np.ndarray:
        """Indices of the ``n`` highest scores, highest first."""
        return np.argsort(-self.scores, kind="stable")[:n]

    def to_dict(self, ids: Sequence[str] | None = None) -> dict[str, Any]:
        order = self.top(min(20, len(self.scores)))
        return {
            "k": self.k,
            "quantile": self.quantile,
            "threshold": self.threshold,
            "n_flagged": int(self.flagged.sum()),
            "n_reference": len(self.reference),
            "top": [
                {
                    "index": int(i),
                    "id": ids[i] if ids is not None else str(i),
                    "score": float(self.scores[i]),
                    "percentile": float(self.percentile[i]),
                }
                for i in order
            ],
        }


@dataclass(frozen=True)
class Neighbours:
    """The ``k`` nearest reference cases of each query: ``indices`` ``(Q, k)`` into the
    reference embedding, ``distances`` ``(Q, k)``, nearest first."""

    indices: np.ndarray
    distances: np.ndarray
    k: int


def _dataset_info(
    data: Any, n: int
) -> tuple[np.ndarray | None, np.ndarray | None, list[str], tuple[str, ...]]:
    labels = splits = None
    ids = [str(i) for i in range(n)]
    classes: tuple[str, ...] = ()
    if hasattr(data, "labels") and hasattr(data, "ids"):
        labels = np.asarray(data.labels, dtype=np.int64).reshape(-1)
        ids = [str(i) for i in data.ids]
        raw = getattr(data, "splits", None)
        splits = None if raw is None else np.asarray(raw, dtype=object)
        classes = tuple(getattr(data, "classes", ()) or ())
    return labels, splits, ids, classes


def embed(
    model: nn.Module,
    data: Any,
    *,
    layer: str | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    splits: Sequence[str] | np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Embedding:
    """Features of every image of ``data`` at ``layer`` (default: the penultimate layer,
    :func:`~trustmap.inspect.activations.penultimate_layer`), in one pass.

    A spatial layer is average-pooled to one vector per image. Labels, splits and ids come
    from an :class:`~trustmap.data.ImageDataset` or a TensorData when not given.
    """
    images = as_images(data)
    n = images.shape[0]
    ds_labels, ds_splits, ds_ids, classes = _dataset_info(data, n)
    labels = ds_labels if labels is None else np.asarray(labels, dtype=np.int64)
    splits = ds_splits if splits is None else np.asarray(splits, dtype=object)
    ids = ds_ids if ids is None else [str(i) for i in ids]
    for name, value in (("labels", labels), ("splits", splits), ("ids", ids)):
        if value is not None and len(value) != n:
            raise InputError(f"{name} has {len(value)} entries for {n} images")
    name = penultimate_layer(model, images) if layer is None else layer
    acts = extract(model, images, [name], batch_size=batch_size, reduce="mean", progress=progress)
    out = acts.outputs.reshape(n, -1).double()
    if out.shape[1] == 1:
        p1 = torch.sigmoid(out[:, 0])
        probs = torch.stack([1 - p1, p1], 1)
    else:
        probs = torch.softmax(out, 1)
    return Embedding(
        layer=name,
        features=acts[name].numpy().astype(np.float32),
        predictions=probs.argmax(1).numpy(),
        probabilities=probs.numpy().astype(np.float32),
        ids=list(ids),
        labels=labels,
        splits=splits,
        classes=classes,
    )


def _features(data: Embedding | np.ndarray | torch.Tensor) -> np.ndarray:
    x = data.features if isinstance(data, Embedding) else data
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 3:
        raise InputError(f"features must be (N, D) with N >= 3, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("the features contain NaN or Inf")
    return x.astype(np.float64)


def project(
    data: Embedding | np.ndarray | torch.Tensor,
    method: str = "pca",
    *,
    seed: int = 0,
    n_neighbors: int = 5,
    pca_components: int = 50,
    perplexity: float = 30.0,
    max_iter: int = 1000,
    n_jobs: int | None = None,
) -> Projection:
    """Project features to 2D with ``"pca"``, ``"tsne"`` or ``"umap"`` (seeded).

    t-SNE and UMAP first reduce to ``pca_components`` dimensions with PCA (t-SNE's cost
    grows with the dimension; Huff et al. 2021 suggest it). The trustworthiness at
    ``n_neighbors`` (scikit-learn's ``trustworthiness``) is computed against the full
    features. UMAP needs the optional ``umap-learn`` package; without it a ValueError says
    how to install it. ``max_iter`` (at least 250) are t-SNE's gradient steps
    (scikit-learn's default 1000).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import trustworthiness

    if method not in PROJECTIONS:
        raise InputError(f"unknown projection {method!r}: choose one of {PROJECTIONS}")
    x = _features(data)
    n = x.shape[0]
    k = int(min(n_neighbors, max(1, n // 2 - 1)))
    started = time.perf_counter()
    params: dict[str, Any] = {"seed": seed}
    if method == "pca":
        coords = PCA(n_components=2, random_state=seed).fit_transform(x)
    else:
        dims = int(min(pca_components, x.shape[1], n))
        reduced = (
            PCA(n_components=dims, random_state=seed).fit_transform(x) if dims < x.shape[1] else x
        )
        params["pca_components"] = dims
        if method == "tsne":
            from sklearn.manifold import TSNE

            perp = float(min(perplexity, (n - 1) / 3))
            params["perplexity"] = perp
            params["max_iter"] = int(max_iter)
            coords = TSNE(
                n_components=2,
                perplexity=perp,
                init="pca",
                random_state=seed,
                max_iter=int(max_iter),
                n_jobs=n_jobs,
            ).fit_transform(reduced)
        else:
            try:
                import umap
            except ImportError as err:
                raise InputError(
                    "UMAP needs the optional package umap-learn: pip install 'trustmap[umap]'"
                ) from err
            coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(reduced)
    seconds = time.perf_counter() - started
    trust = float(trustworthiness(x, coords, n_neighbors=k))
    return Projection(
        method=method,
        coords=np.asarray(coords, dtype=np.float32),
        trustworthiness=trust,
        n_neighbors=k,
        params=params,
        seconds=seconds,
    )


def _standardize(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    mean = ref.mean(0)
    std = ref.std(0)
    return (x - mean) / np.where(std > 0, std, 1.0)


def _reference(n: int, reference: Any) -> np.ndarray:
    if reference is None:
        return np.arange(n)
    ref = np.asarray(reference)
    if ref.dtype == bool:
        if ref.shape != (n,):
            raise InputError(f"a boolean reference needs {n} entries, got {ref.shape}")
        ref = np.flatnonzero(ref)
    ref = ref.astype(np.int64)
    if ref.size == 0:
        raise InputError("the reference set is empty")
    if ref.min() < 0 or ref.max() >= n:
        raise InputError(f"reference indices must lie in 0..{n - 1}")
    return ref


def knn_outliers(
    data: Embedding | np.ndarray | torch.Tensor,
    *,
    reference: np.ndarray | Sequence[int] | None = None,
    k: int = 5,
    quantile: float = 0.95,
    standardize: bool = True,
) -> OutlierScores:
    """kNN outlier score of every case: the mean Euclidean distance to its ``k`` nearest
    reference cases (Faust et al. 2018), a case never counting as its own neighbour.

    Parameters
    ----------
    reference
        The cases that define "normal" (bool mask or indices; e.g. the training split).
        All cases by default.
    k
        Neighbours averaged.
    quantile
        Cases scoring above this quantile of the reference cases' scores are flagged.
    standardize
        z-score every feature with the reference cases' mean and standard deviation first,
        so that no feature dominates by its scale.
    """
    from sklearn.neighbors import NearestNeighbors

    x = _features(data)
    n = x.shape[0]
    ref = _reference(n, reference)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if len(ref) < k + 1:
        raise InputError(f"k={k} needs at least {k + 1} reference cases, got {len(ref)}")
    if not 0 < quantile < 1:
        raise InputError(f"quantile must lie in (0, 1), got {quantile!r}")
    if standardize:
        x = _standardize(x, x[ref])
    nn_index = NearestNeighbors(n_neighbors=k + 1).fit(x[ref])
    dist, idx = nn_index.kneighbors(x)
    # Drop each case itself from its neighbours (it is a reference case at distance 0).
    is_self = ref[idx] == np.arange(n)[:, None]
    keep = np.where(is_self.any(1)[:, None], ~is_self, np.arange(k + 1)[None] < k)
    scores = (dist * keep).sum(1) / k
    ref_scores = np.sort(scores[ref])
    threshold = float(np.quantile(ref_scores, quantile))
    percentile = np.searchsorted(ref_scores, scores, side="left") / len(ref_scores)
    return OutlierScores(
        scores=scores,
        percentile=percentile,
        k=k,
        reference=ref,
        threshold=threshold,
        quantile=float(quantile),
        flagged=scores > threshold,
    )


def nearest_cases(
    reference: Embedding | np.ndarray | torch.Tensor,
    queries: Embedding | np.ndarray | torch.Tensor,
    *,
    k: int = 5,
    standardize: bool = True,
) -> Neighbours:
    """The ``k`` nearest reference cases of each query in feature space (Euclidean, after
    z-scoring with the reference's statistics when ``standardize``)."""
    from sklearn.neighbors import NearestNeighbors

    ref = _features(reference)
    q = queries.features if isinstance(queries, Embedding) else queries
    q = q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    q = np.atleast_2d(q).astype(np.float64)
    if q.shape[1] != ref.shape[1]:
        raise InputError(
            f"queries have {q.shape[1]} features but the reference has {ref.shape[1]}; embed "
            "both at the same layer"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(ref):
        raise InputError(f"k must lie in 1..{len(ref)}, got {k!r}")
    if standardize:
        q, ref = _standardize(q, ref), _standardize(ref, ref)
    dist, idx = NearestNeighbors(n_neighbors=k).fit(ref).kneighbors(q)
    return Neighbours(indices=idx, distances=dist, k=k)
