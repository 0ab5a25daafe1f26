"""Model inspection: what a network learned (Huff et al. 2021, section 2).

Pure functions that return frozen dataclasses; :mod:`trustmap.inspect.plots` draws them
and :mod:`trustmap.inspect.report` writes ``inspect.json`` and ``inspect.html``.

* :func:`filters`, :func:`compare_filters`: first-layer kernels, and per-filter norms and
  cosine similarity between two checkpoints (e.g. trained against initial weights).
* :func:`feature_maps`, :func:`unit_rates`, :func:`activation_maps`: feature maps of one
  image, dead and saturated units over a dataset, layer activation maps upsampled.
* :func:`embed`, :func:`project`, :func:`knn_outliers`, :func:`nearest_cases`: penultimate
  (or any layer's) features, PCA / t-SNE / UMAP with their trustworthiness, kNN outlier
  scores and nearest training cases.
* :func:`maximize`, :func:`deep_dream`: class-model visualization and Deep Dream.
* :func:`dissect`, :func:`influential_units`, :func:`load_concepts`: network dissection
  against concept masks, and the DeepMiner-like table of influential units.
* :func:`cohort_map`: the mean attribution of a method over a class.
* :func:`extract`, :func:`iter_activations`: the activation-extraction API everything
  above is built on (any layer, batched, one pass, hooks always removed).
"""

from trustmap.inspect.activations import (
    ActivationBatch,
    Activations,
    LayerInfo,
    as_images,
    extract,
    iter_activations,
    layer_table,
    penultimate_layer,
    resolve_layer,
)
from trustmap.inspect.cohort import CohortMap, cohort_map
from trustmap.inspect.dissect import (
    ConceptMasks,
    Dissection,
    InfluenceRow,
    InfluenceTable,
    concept_masks,
    dissect,
    influential_units,
    load_concepts,
)
from trustmap.inspect.embeddings import (
    Embedding,
    Neighbours,
    OutlierScores,
    Projection,
    embed,
    knn_outliers,
    nearest_cases,
    project,
)
from trustmap.inspect.features import (
    FeatureMaps,
    LayerRates,
    UnitRates,
    activation_maps,
    feature_maps,
    unit_rates,
)
from trustmap.inspect.filters import (
    FilterComparison,
    Filters,
    compare_filters,
    filters,
    initial_model,
)
from trustmap.inspect.maximize import Maximization, deep_dream, maximize

__all__ = [
    "ActivationBatch",
    "Activations",
    "CohortMap",
    "ConceptMasks",
    "Dissection",
    "Embedding",
    "FeatureMaps",
    "FilterComparison",
    "Filters",
    "InfluenceRow",
    "InfluenceTable",
    "LayerInfo",
    "LayerRates",
    "Maximization",
    "Neighbours",
    "OutlierScores",
    "Projection",
    "UnitRates",
    "activation_maps",
    "as_images",
    "cohort_map",
    "compare_filters",
    "concept_masks",
    "deep_dream",
    "dissect",
    "embed",
    "extract",
    "feature_maps",
    "filters",
    "influential_units",
    "initial_model",
    "iter_activations",
    "knn_outliers",
    "layer_table",
    "load_concepts",
    "maximize",
    "nearest_cases",
    "penultimate_layer",
    "project",
    "resolve_layer",
    "unit_rates",
]
