"""Sweep results -> scaling-law fits, derived results, figures and report.md.

Modules: load (tidy tables), fit (laws + bootstrap), derived (tolerance, multipliers,
compute-optimal sparsity, structure penalty), figures (one function per figure, CLI), report.
"""
