"""Objectives read off Pyro traces: ELBO terms, the training ELBO, evaluation, importance weights."""

from .elbo import CodeELBO, surrogate_terms
from .evaluate import PointTerms, evaluate, point_terms, summarise
from .importance import iwae_bound, log_weights
from .terms import ElboTerms, code_indices, elbo_terms, log_weight, run_traces, site_terms

__all__ = [
    "CodeELBO",
    "ElboTerms",
    "PointTerms",
    "code_indices",
    "elbo_terms",
    "evaluate",
    "iwae_bound",
    "log_weight",
    "log_weights",
    "point_terms",
    "run_traces",
    "site_terms",
    "summarise",
    "surrogate_terms",
]
