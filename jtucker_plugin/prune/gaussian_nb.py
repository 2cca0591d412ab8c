"""A two-class Gaussian naive Bayes with missing features (NaN), for ``NaiveBayesImportance``.

It is written out here (``fit_gaussian_nb``, ``nb_log_odds``) rather than taken from
scikit-learn, for two reasons. A sample may lack a feature (no batch norm after a Tucker core,
no gradient for frozen layers): leaving a missing feature out of the product of likelihoods is a
one-line change here, while ``sklearn.naive_bayes.GaussianNB`` rejects NaN. And the classes share
one variance per feature (pooled), so that the posterior is monotone in every feature (see
``fit_gaussian_nb``). With ``shared_variance=False`` it gives exactly ``GaussianNB``'s posterior,
which a test checks. ``nanmean`` and ``nanvar`` are the NaN-skipping statistics it is fitted with.

Examples
--------
>>> X = torch.tensor([[0.0], [0.1], [1.0], [1.1]])
>>> classifier = fit_gaussian_nb(X, torch.tensor([0, 0, 1, 1]))
>>> nb_log_odds(classifier, torch.tensor([[0.0], [1.0], [float("nan")]])).sign().tolist()
[-1.0, 1.0, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from jtucker_plugin import defaults


@dataclass(frozen=True)
class GaussianNB:
    """A fitted two-class Gaussian naive Bayes: class 0 unimportant, class 1 important.

    ``log_prior`` (2,), ``mean`` and ``var`` (2 x features), all float64.
    """

    log_prior: Tensor
    mean: Tensor
    var: Tensor


def fit_gaussian_nb(
    X: Tensor,
    y: Tensor,
    *,
    var_smoothing: float = defaults.NAIVE_BAYES_VAR_SMOOTHING,
    shared_variance: bool = True,
) -> GaussianNB:
    """Fit a two-class Gaussian naive Bayes on ``X`` (n x features, NaN = missing), ``y`` in {0, 1}.

    Per class and feature: the mean and biased variance of the non-missing values, plus
    ``var_smoothing`` times the largest variance of any feature. With
    ``shared_variance=False`` this is exactly ``sklearn.naive_bayes.GaussianNB``. With
    ``shared_variance=True`` (the default) both classes get the pooled within-class variance:
    with unequal variances the log-odds are quadratic in each feature, so a channel far outside
    the labelled range (a dead one, a huge one) goes to whichever class is wider instead of the
    side its values point to; pooled, the posterior is monotone in every feature. A feature a
    class never has gets mean 0 and variance 1 (uninformative after standardisation).

    Raises
    ------
    ValueError
        If a class has no sample, or the shapes disagree.
    """
    X = X.to(torch.float64)
    y = y.to(torch.long)
    if X.dim() != 2 or y.shape != (X.shape[0],):
        raise ValueError(
            f"fit_gaussian_nb: expected X (n x f) and y (n,), got {tuple(X.shape)} and {tuple(y.shape)}"
        )
    counts = torch.stack([(y == c).sum() for c in (0, 1)])
    if (counts == 0).any():
        raise ValueError(f"fit_gaussian_nb: both classes need samples, got counts {counts.tolist()}")
    epsilon = var_smoothing * float(torch.nan_to_num(nanvar(X), nan=0.0).max())
    mean = torch.stack([torch.nan_to_num(nanmean(X[y == c]), nan=0.0) for c in (0, 1)])
    var = torch.stack([torch.nan_to_num(nanvar(X[y == c]), nan=1.0) for c in (0, 1)])
    if shared_variance:
        present = torch.stack([(~X[y == c].isnan()).sum(0) for c in (0, 1)]).double()
        pooled = (var * present).sum(0) / present.sum(0).clamp_min(1)
        var = pooled.expand(2, -1)
    # A feature constant everywhere would give a zero variance: floor it.
    var = (var + epsilon).clamp_min(1e-12)
    return GaussianNB((counts / counts.sum()).log(), mean, var)


def nb_log_odds(model: GaussianNB, X: Tensor) -> Tensor:
    """log P(important | x) - log P(unimportant | x) per row of ``X``; NaN features are left out."""
    X = X.to(torch.float64)
    log_lik = -0.5 * (
        (X[None] - model.mean[:, None]) ** 2 / model.var[:, None]
        + torch.log(2 * math.pi * model.var[:, None])
    )
    log_lik = torch.nan_to_num(log_lik, nan=0.0).sum(-1)  # 2 x n
    return (model.log_prior[1] + log_lik[1]) - (model.log_prior[0] + log_lik[0])


def nanmean(X: Tensor) -> Tensor:
    """Mean of each column of ``X`` over its non-NaN values; NaN for a column with none."""
    present = ~X.isnan()
    n = present.sum(0)
    mean = torch.where(present, X, 0.0).sum(0) / n.clamp_min(1)
    return torch.where(n > 0, mean, torch.nan)


def nanvar(X: Tensor) -> Tensor:
    """Biased variance of each column of ``X`` over its non-NaN values; NaN for a column with none."""
    present = ~X.isnan()
    n = present.sum(0)
    mean = nanmean(X)
    var = torch.where(present, (X - mean) ** 2, 0.0).sum(0) / n.clamp_min(1)
    return torch.where(n > 0, var, torch.nan)
