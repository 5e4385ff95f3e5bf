"""Measurements: a policy with a search strategy on problems with gold answers (`evaluate`),
a PRM against step truth (`prm`: AUROC, best-of-N), and ProcessBench's first-error F1
(`processbench`).
"""
