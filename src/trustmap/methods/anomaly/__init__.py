"""Anomaly family: where an image differs from what a model of normal images expects.

ae_anomaly (Huff et al. 2021, section 2.3): the reconstruction error of an autoencoder
trained on normal images.
"""

from trustmap.methods.anomaly import ae_anomaly  # noqa: F401
