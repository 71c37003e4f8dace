"""Evaluation: FID / MFID with bootstrap CIs, and the paper's classifier experiments.

Modules: ``frechet`` (exact Fréchet distance), ``bootstrap`` (percentile CI), ``inception`` and
``radimagenet`` (feature networks), ``weights`` (finding weight files), ``preprocessing``,
``feature_cache``, ``features``, ``fid`` (the FID/MFID API), ``augment``, ``classifier_data``,
``classifier`` (Table 2 experiments), ``roc``, ``quick_probe`` (a labelled rough estimate).
Import the submodule you need; this package imports nothing heavy by itself.
"""
