"""Blinded reader studies of explanations: build, serve, analyse.

Katzmann et al. 2021 (Neurocomputing), section 3.4, rated explanations in a double-blind
questionnaire (criteria on an integer scale, randomized panel order, questionnaire
variants A and B, z-normalised scores, ranks, t-tests, inter-observer reliability, KMO and
a PCA general factor); Huff et al. 2021 (Phys Med Biol), section 6, describe the
reader-performance design of Sayres et al. 2019 (reader alone, with the prediction, with
the map: accuracy, confidence and reading time). This package runs both:

>>> from trustmap.study import create_study, analyze_study  # doctest: +SKIP
>>> made = create_study("study/", methods=["grad_cam", "integrated_gradients"],
...                     dataset="ct-nodule", model="runs/clf", n_cases=24, n_readers=8)
>>> # trustmap study serve study/ ; readers open their URLs ; then
>>> result = analyze_study("study/", out="analysis/")  # doctest: +SKIP
"""

from trustmap.study.create import CreatedStudy, create_study, reader_url
from trustmap.study.design import DEFAULT_CRITERIA, Criterion, Scale, parse_criteria, parse_scale
from trustmap.study.store import STUDY_VERSION, Study

__all__ = [
    "DEFAULT_CRITERIA",
    "STUDY_VERSION",
    "CreatedStudy",
    "Criterion",
    "Scale",
    "Study",
    "create_study",
    "parse_criteria",
    "parse_scale",
    "reader_url",
]
