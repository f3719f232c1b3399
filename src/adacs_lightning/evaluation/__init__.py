"""Evaluation of trained registration networks: per-case metrics, summaries and paired comparisons."""

from .cases import METRICS, CaseEvaluator, iterate_pairs
from .compare import compare, summarise
from .report import Report, evaluate, evaluate_run
from .runs import Run, data_config, data_key, resolve_run
from .stats import PairedTest, mean_std, paired_test

__all__ = [
    "METRICS",
    "CaseEvaluator",
    "PairedTest",
    "Report",
    "Run",
    "compare",
    "data_config",
    "data_key",
    "evaluate",
    "evaluate_run",
    "iterate_pairs",
    "mean_std",
    "paired_test",
    "resolve_run",
    "summarise",
]
