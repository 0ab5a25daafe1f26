"""Attention family: the maps of trainable attention built into a model.

attention (Jetley et al. 2018; Huff et al. 2021, section 3.4): the attention maps of
``attention_cnn``'s gates or of MONAI's ``AttentionUnet``.
"""

from trustmap.methods.attention import attention  # noqa: F401
