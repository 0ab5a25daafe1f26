"""trustmap: explain medical-image classifiers and test whether the explanations hold.

>>> import trustmap
>>> trustmap.list_methods()[:3]
['ablation_cam', 'cam', 'deconvnet']
>>> attr = trustmap.explain(model, x, "grad_cam")  # doctest: +SKIP
"""

from trustmap.core import Explainer, Explanation, explain, get_method, list_methods

__version__ = "0.1.0"

__all__ = ["Explainer", "Explanation", "__version__", "explain", "get_method", "list_methods"]
