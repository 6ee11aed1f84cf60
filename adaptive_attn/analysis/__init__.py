"""Sweep analysis: `python -m adaptive_attn.analysis SWEEP_DIR`."""

from adaptive_attn.analysis.results import aggregate, analyse, load_k_vs_difficulty, load_runs, paired_comparison

__all__ = ["aggregate", "analyse", "load_k_vs_difficulty", "load_runs", "paired_comparison"]
