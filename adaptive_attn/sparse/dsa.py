"""DeepSeek Sparse Attention layer: layout -> indexer -> budget -> causal top-k -> sparse attention op -> indexer KL.

Lives inside an MLA layer and receives its absorbed queries and shared latent rows. The indexer reads a
detached copy of the hidden state, so the LM loss trains the model and the indexer KL trains the
indexer. While `sparse_active` is off (the dense warm-up stage of training, set by the training module
through the model), it only trains the indexer on full causal rows and the layer attends densely.

A budget that returns a differentiable k (the adaptive controller) is trained by the LM loss through a
soft rank mask on the selected logits: slot j (the j-th best selected column) gets the logit bias
b_j = log sigmoid((k - j - 1/2) / tau) - stop_grad(log sigmoid(...)), exactly 0 in the forward pass (so
the computation is the hard top-k) while its gradient tells k how much the boundary positions matter.
Masking logits, not weights, keeps the softmax normalised over what remains, as a smaller hard top-k
would; and its gradient is the logits' own, which the attention backward computes anyway.

The layer returns its statistics with its output; the budget adjusts only when the model hands it the
realised compute after a training step (`update_budget`).
"""

from collections.abc import Callable

import torch
from torch import nn

from adaptive_attn.nn.component import component
from adaptive_attn.ops.dispatch import backend_function, check_backend, sparse_attention
from adaptive_attn.ops.layout import SparseLayout, check_blocks
from adaptive_attn.sparse import losses
from adaptive_attn.sparse.budget import fixed_pairs
from adaptive_attn.sparse.indexer import LightningIndexer
from adaptive_attn.sparse.selector import TopKTokenSelector


@torch.no_grad()
def selection_stats(indices: torch.Tensor, k, layout: SparseLayout, target: float) -> dict[str, torch.Tensor]:
    """Statistics of a selection: indices [B, R, K], k (whole columns: int, [B] or [B, R]).

    pairs_share: attended causal (query, key) pairs / all causal pairs. equivalent_keep: the keep of the
    fixed budget that would attend as many pairs (a fixed budget's own keep; adaptive budgets hold it at
    their target, so that they spend the compute of the fixed budget at that keep). Mean k / L is not
    the measure of compute: a query cannot attend more positions than precede it, so a budget that
    gives early queries less and late ones more attends more pairs than a fixed k of the same mean.
    k (columns) per sequence is the mean over its rows."""
    B = indices.shape[0]
    attended = layout.attended_pairs((indices >= 0).sum(-1))  # [B]
    k = torch.as_tensor(k, dtype=torch.float64, device=indices.device)
    k_seq = (k.reshape(B, -1) if k.dim() else k.expand(B, 1)).mean(-1)
    return {
        "pairs_share": (attended / layout.causal_pairs).mean(),
        "equivalent_keep": target * attended.mean() / fixed_pairs(target, layout),
        "k_mean": k_seq.mean(),
        "k_per_sequence": k_seq.float(),
        "k_values": k.float().flatten() if k.dim() else k.float().reshape(1),
    }


def selected_scores(scores: torch.Tensor, chunks: list[torch.Tensor] | None, indices: torch.Tensor) -> torch.Tensor:
    """The indexer's scores of the selected columns [B, R, K]: from `chunks` (token mode, see
    `DeepSeekSparseAttention.score`) where given, else from the scores themselves."""
    if chunks is None:
        return scores.gather(-1, indices.clamp(min=0))
    rows = indices.split([chunk.shape[1] for chunk in chunks], 1)
    return torch.cat([chunk.gather(-1, part.clamp(min=0)) for chunk, part in zip(chunks, rows)], 1)


class DeepSeekSparseAttention(nn.Module):
    def __init__(
        self,
        indexer: LightningIndexer,
        budget: nn.Module,
        block_size: int = 1,
        query_block: int | None = None,
        backend: str = "auto",
        soft_rank_tau: float = 0.1,
        measure_recall: bool = True,
        sink_tokens: int = 0,
        kl_row_fraction: float = 1.0,
        rank_row_fraction: float = 1.0,
    ):
        super().__init__()
        self.block_size, self.query_block = block_size, block_size if query_block is None else query_block
        check_blocks(self.block_size, self.query_block)
        check_backend(backend, self.block_size, self.query_block)
        self.indexer, self.budget, self.selector = indexer, budget, TopKTokenSelector(sink_tokens)
        self.backend, self.soft_rank_tau = backend, soft_rank_tau
        self.measure_recall = measure_recall  # in evaluation only: one dense attention pass per layer
        self.kl_row_fraction = kl_row_fraction  # block mode, training: rows without the op's KL target, from a draw
        self.rank_row_fraction = rank_row_fraction  # block mode, training: the rank mask's gradient likewise
        self.register_buffer("sparse_active", torch.tensor(True))
        self._attention: dict[torch.device, Callable] = {}  # the backend, resolved once per device
        # random streams of the layer's own (`seed_draws`), so that nothing else that draws (evaluation, a data
        # loader) moves training's draws, and a checkpoint can carry them (`draw_states`)
        self.draws, self.control_draws = torch.Generator(), torch.Generator()
        self.seed_draws(torch.initial_seed())

    def seed_draws(self, seed: int) -> None:
        """Seed the training draws (query blocks of `losses.draw_rows`) and evaluation's random control."""
        self.draws.manual_seed(2 * seed % 2**64)
        self.control_draws.manual_seed((2 * seed + 1) % 2**64)

    def draw_states(self) -> dict[str, torch.Tensor]:
        return {"training": self.draws.get_state(), "control": self.control_draws.get_state()}

    def load_draw_states(self, states: dict[str, torch.Tensor]) -> None:
        self.draws.set_state(states["training"])
        self.control_draws.set_state(states["control"])

    def layout(self, seq_len: int, device: torch.device) -> SparseLayout:
        return SparseLayout.build(seq_len, self.block_size, self.query_block, device)

    def attention(self, device: torch.device) -> Callable:
        if device not in self._attention:
            self._attention[device] = backend_function(self.backend, device, self.block_size, self.query_block)
        return self._attention[device]

    def rank_bias(self, k_soft: torch.Tensor, indices: torch.Tensor, layout: SparseLayout):
        """k_soft [B, R] (columns, differentiable) -> (logit bias [B, R, K], exactly 0 in the forward pass;
        the rows whose bias carries a gradient [R], or None for all).

        In block mode, while training, only the query blocks `losses.draw_rows` draws (`rank_row_fraction`
        of them) carry the gradient, scaled by C / m: an unbiased estimate of the controller's gradient;
        the other blocks attend without the bias column. The draw comes from the layer's own stream
        (`self.draws`): a training forward pass is a function of its input and that stream's state."""
        slot_middle = torch.arange(indices.shape[-1], device=k_soft.device, dtype=k_soft.dtype) + 0.5
        tau = self.soft_rank_tau * k_soft.detach().clamp_min(1)[..., None]
        soft = torch.nn.functional.logsigmoid((k_soft[..., None] - slot_middle) / tau)
        bias = soft - soft.detach()
        if layout.token_level or self.rank_row_fraction >= 1 or not self.training:
            return bias, None
        rows, scale = losses.draw_rows(layout, self.rank_row_fraction, self.draws)
        drawn = torch.zeros(layout.n_rows, dtype=torch.bool, device=bias.device)
        drawn[rows] = True
        return bias * (drawn.to(bias.dtype) * scale)[None, :, None], drawn

    def forward(self, x, q, latents, *, scale: float, v_dim: int):
        """x [B, L, D_model], q [B, H, L, D], latents [B, L, D] -> (out [B, H, L, v_dim] or None in the dense
        warm-up, aux: "indexer_kl" (the indexer's loss) and "stats" (this call's detached statistics))"""
        x = x.detach()
        layout = self.layout(x.shape[1], x.device)
        if not bool(self.sparse_active):
            return None, self.warmup(x, q.detach(), latents.detach(), layout, scale)
        with component("indexer"):
            scores, score_chunks = self.score(x, layout)
        with component("budget"):
            # the oracle control selects by the true dense attention; every other budget by the indexer
            oracle = hasattr(self.budget, "attention_scores")
            chooser = self.budget.attention_scores(q, latents, layout, scale) if oracle else scores
            k = self.budget(x, chooser, layout)
            k_hard = layout.hard_columns(k)
        with component("selection"):
            indices = self.selector(chooser, k_hard, layout)
        with component("sparse_attention"):
            learns = torch.is_tensor(k) and k.requires_grad
            bias, biased_rows = self.rank_bias(k, indices, layout) if learns else (None, None)
            attend = self.attention(q.device)
            out, slot_probs = sparse_attention(
                q,
                latents,
                indices,
                layout,
                scale=scale,
                v_dim=v_dim,
                backend=attend,
                slot_bias=bias,
                biased_rows=biased_rows,
            )
        with component("indexer_kl"):
            fraction = self.kl_row_fraction if self.training else 1.0
            options = dict(scale=scale, row_fraction=fraction, generator=self.draws)
            selected = selected_scores(scores, score_chunks, indices)
            kl = losses.kl_selected(q.detach(), latents.detach(), selected, indices, slot_probs, layout, **options)
        stats = {"indexer_kl": kl.detach(), **selection_stats(indices, k_hard, layout, self.budget.target_keep(layout))}
        stats.update(self.budget.stats())
        if self.measure_recall and not self.training:
            with component("recall"):
                stats.update(self.recall(q, latents, indices, scores, k_hard, layout, scale))
        return out, {"indexer_kl": kl, "stats": stats}

    def score(self, x, layout: SparseLayout) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """-> (indexer scores [B, R, C], for the budget and the selector; in token mode the chunks of queries
        they come from, [B, C_i, c_i], which alone carry the gradient: the KL gathers the selected keys' scores
        from them, so no [B, L, L] tensor takes part in backward)"""
        if not layout.token_level:
            return self.indexer(x, layout), None
        chunks = self.indexer.token_score_chunks(x)
        with torch.no_grad():
            return self.indexer.join_chunks(chunks, layout), chunks

    def warmup(self, x, q, latents, layout: SparseLayout, scale: float) -> dict:
        """The dense warm-up stage: the indexer trains on whole causal rows, attention stays dense -> aux.
        In token mode its scores stay in chunks of queries (never a [B, L, L] tensor)."""
        with component("indexer"):
            scores = self.indexer.token_score_chunks(x) if layout.token_level else self.indexer(x, layout)
        with component("indexer_kl"):
            if layout.token_level:
                kl = losses.kl_dense_tokens(q, latents, scores, scale=scale)
            else:
                kl = losses.kl_dense_blocks(q, latents, scores, layout, scale=scale)
        dense = torch.ones((), dtype=torch.float64)
        return {"indexer_kl": kl, "stats": {"indexer_kl": kl.detach(), "pairs_share": dense, "equivalent_keep": dense}}

    @torch.no_grad()
    def recall(self, q, latents, indices, scores, k_hard, layout: SparseLayout, scale: float) -> dict:
        """Evaluation diagnostics: the attended positions ("selected" [B, L, L], for needed-key recall) and the
        share of the dense attention mass they hold, against as many positions chosen at random (scores
        [B, R, C] drawn from the layer's control stream in place of the indexer's)."""
        selected = layout.selection_mask(indices)
        # the stream stays on the CPU (checkpoints carry it); the draws are made on the scores' device
        seed = int(torch.randint(2**62, (), generator=self.control_draws))
        device_draws = torch.Generator(device=scores.device).manual_seed(seed)
        random_scores = torch.rand(scores.shape, generator=device_draws, dtype=scores.dtype, device=scores.device)
        random_selected = layout.selection_mask(self.selector(random_scores, k_hard, layout))
        recall, random_recall = losses.attention_mass_recall(q, latents, [selected, random_selected], scale=scale)
        return {"selected": selected, "attn_mass_recall": recall, "attn_mass_recall_random": random_recall}

    def update_budget(self, stats: dict[str, torch.Tensor]) -> None:
        """After a training step in the sparse stage: the budget adjusts to the compute it realised."""
        if bool(self.sparse_active) and "equivalent_keep" in stats:
            self.budget.update(float(stats["equivalent_keep"]))
