"""Named ranges around a step's components, so that a profile can say where its time goes
(`adaptive_attn.lit.breakdown`). A range costs a few microseconds when no profiler runs."""

import torch

PREFIX = "component::"
COMPONENTS = (
    "indexer",  # indexer scores
    "budget",  # how many keys each row gets
    "selection",  # causal top-k
    "sparse_attention",  # the sparse attention op
    "dense_attention",  # causal SDPA (dense models, and sparse ones in their dense warm-up)
    "indexer_kl",  # the indexer's training signal
    "recall",  # evaluation diagnostics (attention-mass recall)
    "moe",  # the feed-forward experts
    "optimizer",  # the optimiser step
)


def component(name: str) -> torch.profiler.record_function:
    return torch.profiler.record_function(PREFIX + name)
