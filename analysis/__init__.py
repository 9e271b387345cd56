"""Sweep results -> paired loss gaps, their scaling with size, S*, scaling-law fits, figures and
report.md / report.json.

Modules: load (tidy tables, the parameter-count convention), gap (paired ΔL, β(S), censored S*),
fit (laws, identifiability, cluster bootstrap, hold-out by size), derived (from a fitted law;
structure penalty), figures (one function per figure), report (sections of the report).
Command line: `python -m analysis` (analysis/__main__.py).
"""
