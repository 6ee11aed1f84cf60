"""DeepSeekMoE feed-forward: shared experts plus top-k routed experts.

Routing follows DeepSeek-V3: sigmoid affinities, a per-expert bias that only affects *which* experts
are chosen (auxiliary-loss-free balancing, updated outside the forward pass so a forward stays a pure
function of its input), gate weights normalised over the chosen experts, and an optional small
sequence-wise balance loss. No capacity limit: a token is never dropped, so its output depends on that
token alone.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] -> [N, D]"""
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DeepSeekMoE(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_routed: int = 8,
        n_shared: int = 1,
        top_k: int = 2,
        d_ff_expert: int = 256,
        bias_update_rate: float = 1e-3,
        balance_loss_weight: float = 1e-4,
    ):
        super().__init__()
        if not 1 <= top_k <= n_routed:
            raise ValueError(f"moe.top_k must be in [1, n_routed={n_routed}], got {top_k}")
        self.n_routed, self.top_k = n_routed, top_k
        self.bias_update_rate = bias_update_rate
        self.balance_loss_weight = balance_loss_weight
        self.shared = SwiGLU(d_model, d_ff_expert * n_shared) if n_shared > 0 else None
        self.experts = nn.ModuleList(SwiGLU(d_model, d_ff_expert) for _ in range(n_routed))
        self.router = nn.Linear(d_model, n_routed, bias=False)
        self.register_buffer("router_bias", torch.zeros(n_routed))
        # tokens routed to each expert in the last training forward, consumed by update_router_bias()
        self.register_buffer("last_load", torch.zeros(n_routed), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, L, D] -> (y [B, L, D], balance loss scalar)"""
        B, L, D = x.shape
        flat = x.reshape(-1, D)
        affinity = torch.sigmoid(self.router(flat))  # [N, E]
        _, chosen = torch.topk(affinity + self.router_bias, self.top_k, dim=-1)  # [N, K]
        gates = affinity.gather(-1, chosen)
        gates = gates / gates.sum(-1, keepdim=True)

        # summed in the residual stream's dtype (experts run in bf16 under autocast)
        routed = self._run_routed(flat, chosen).to(flat.dtype)  # [N, K, D]
        out = (routed * gates[..., None].to(flat.dtype)).sum(1)
        if self.shared is not None:
            out = out + self.shared(flat)

        counts = F.one_hot(chosen, self.n_routed).sum(1).to(x.dtype)  # [N, E]
        if self.training:
            self.last_load = counts.sum(0).detach().float()
        return out.view(B, L, D), self._balance_loss(affinity.view(B, L, -1), counts.view(B, L, -1))

    def _run_routed(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """flat [N, D], chosen experts [N, K] -> each choice's expert output [N, K, D].

        The N * K choices are sorted by expert once, so that each expert takes one contiguous slice and the
        backward scatters into the input's gradient once, not once per expert (a per-expert gather's backward
        writes a zeroed gradient of all N tokens)."""
        experts = chosen.flatten()
        order = experts.argsort(stable=True)
        counts = torch.bincount(experts, minlength=self.n_routed).tolist()
        parts = flat.index_select(0, order // self.top_k).split(counts)
        outputs = torch.cat([self._run_padded(e, part) if len(part) else part for e, part in zip(self.experts, parts)])
        return outputs.index_select(0, order.argsort()).view(*chosen.shape, -1)

    @staticmethod
    def _run_padded(expert: nn.Module, x: torch.Tensor, multiple: int = 16) -> torch.Tensor:
        """expert(x) with the row count padded to a multiple of 16.

        BLAS kernels treat a GEMM's leftover rows with other code paths, so a token's result could
        change in the last bits with how many tokens share its expert, i.e. with *other* (even future)
        tokens. With whole 16-row tiles every row takes the same path.
        """
        pad = -x.shape[0] % multiple
        return expert(torch.nn.functional.pad(x, (0, 0, 0, pad)))[: x.shape[0]] if pad else expert(x)

    def _balance_loss(self, affinity: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss: sum_i f_i * P_i per sequence, averaged."""
        if self.balance_loss_weight == 0:
            return affinity.new_zeros(())
        E, K, L = self.n_routed, self.top_k, affinity.shape[1]
        f = counts.sum(1) * E / (K * L)  # [B, E]
        p = (affinity / affinity.sum(-1, keepdim=True)).mean(1)  # [B, E]
        return self.balance_loss_weight * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded."""
        if self.bias_update_rate == 0 or self.last_load.sum() == 0:
            return
        self.router_bias += self.bias_update_rate * torch.sign(self.last_load.mean() - self.last_load)
        self.last_load.zero_()
