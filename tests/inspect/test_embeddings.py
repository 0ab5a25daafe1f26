"""Embeddings, projections, kNN outliers and nearest cases against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness

from tests.conftest import make_input, make_tiny
from tests.models._toy import ToyDataset
from trustmap.inspect import embed, extract, knn_outliers, nearest_cases, project


def test_embedding_is_the_penultimate_layer_with_labels_predictions_and_splits():
    ds = ToyDataset(n=20, size=16)
    model = make_tiny(2, n_classes=2)
    emb = embed(model, ds, batch_size=6)
    assert emb.layer == "fc:input" and emb.features.shape == (20, 8)
    conv3 = extract(model, ds, "conv3")["conv3"]
    np.testing.assert_allclose(emb.features, conv3.clamp_min(0).mean((2, 3)), atol=1e-6)
    with torch.no_grad():
        logits = model.eval()(ds.tensors().images)
    assert (emb.predictions == logits.argmax(1).numpy()).all()
    np.testing.assert_allclose(emb.probabilities, torch.softmax(logits, 1).numpy(), atol=1e-6)
    assert (emb.labels == ds.labels).all() and list(emb.ids) == ds.ids
    assert (emb.errors == (emb.predictions != ds.labels)).all()
    assert set(emb.splits) == {"train", "val", "test"}
    sub = emb.select(emb.splits == "test")
    assert len(sub) == int((emb.splits == "test").sum())


def test_pca_and_trustworthiness_equal_scikit_learn_and_tsne_is_seeded():
    gen = np.random.default_rng(0)
    x = np.concatenate([gen.normal(0, 1, (60, 10)), gen.normal(4, 1, (60, 10))])
    pca = project(x, "pca", seed=0)
    ref = PCA(n_components=2, random_state=0).fit_transform(x)
    np.testing.assert_allclose(np.abs(pca.coords), np.abs(ref), atol=1e-4)
    assert pca.trustworthiness == pytest.approx(trustworthiness(x, ref, n_neighbors=5))
    a = project(x[::2], "tsne", seed=1, perplexity=10, max_iter=500)
    b = project(x[::2], "tsne", seed=1, perplexity=10, max_iter=500)
    assert np.array_equal(a.coords, b.coords)
    assert a.trustworthiness > 0.9 and a.params["perplexity"] == 10
    with pytest.raises(ValueError, match="unknown projection"):
        project(x, "isomap")


def test_umap_without_the_package_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_umap(name, *args, **kwargs):
        if name == "umap":
            raise ImportError("no umap")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_umap)
    with pytest.raises(ValueError, match=r"pip install 'trustmap\[umap\]'"):
        project(np.random.default_rng(0).normal(size=(20, 4)), "umap")


def test_knn_outlier_scores_are_mean_distances_to_the_reference_without_self():
    x = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    out = knn_outliers(x, reference=[0, 1, 2, 3], k=2, standardize=False)
    # Reference cases skip themselves; case 4 is not in the reference.
    np.testing.assert_allclose(out.scores, [1.5, 1.0, 1.0, 1.5, 7.5])
    assert out.top(1).tolist() == [4]
    assert out.flagged.tolist() == [False, False, False, False, True]
    assert out.percentile[4] == 1.0


def test_injected_out_of_distribution_images_rank_in_the_top_five_percent():
    # Radiograph-like toy discs and five checkerboards: the features of any CNN separate
    # them, and the outlier score puts them at the top against the training discs.
    ds = ToyDataset(n=100, size=16)
    images = ds.tensors().images
    board = torch.zeros(5, 1, 16, 16)
    board[:, :, ::2, ::2] = 1.0
    board[:, :, 1::2, 1::2] = 1.0
    model = make_tiny(2, n_classes=2)
    emb = embed(model, torch.cat([images, board]), batch_size=32)
    reference = np.r_[np.ones(100, bool), np.zeros(5, bool)]
    out = knn_outliers(emb, reference=reference, k=5)
    top = set(out.top(int(np.ceil(0.05 * 105))).tolist())
    assert set(range(100, 105)) <= top
    assert out.flagged[100:].all()


def test_nearest_cases_equal_brute_force():
    gen = np.random.default_rng(1)
    ref = gen.normal(size=(30, 4))
    q = gen.normal(size=(3, 4))
    found = nearest_cases(ref, q, k=4, standardize=False)
    dist = np.linalg.norm(q[:, None] - ref[None], axis=2)
    assert (found.indices == np.argsort(dist, 1)[:, :4]).all()
    np.testing.assert_allclose(found.distances, np.sort(dist, 1)[:, :4])
    with pytest.raises(ValueError, match="queries have 3 features"):
        nearest_cases(ref, q[:, :3], k=2)
    with pytest.raises(ValueError, match="k=31 needs at least 32"):
        knn_outliers(ref, k=31)


def test_embedding_checks_its_inputs():
    model = make_tiny(2)
    with pytest.raises(ValueError, match="labels has 2 entries for 3 images"):
        embed(model, make_input(2, 3), labels=[0, 1])
