"""The geometry of a sparse selection, in one object.

The indexer scores a matrix of *rows* (who selects) by *columns* (what can be selected):
- token mode (`block_size == 1`): one row per query, one column per key token;
- block mode: one row per query block of `query_block` tokens, one column per key block of
  `block_size` tokens of the padded length. A row may select the key blocks wholly before its query
  block, and always attends its own diagonal blocks causally (`diagonal_tokens` per row).

A row is decided by its first query (`row_positions`) and may choose among its first `n_eligible`
columns, so nothing it selects lies in its future. Budgets count k in columns; `columns_for_tokens`
is the one conversion from a number of tokens. `SparseLayout.build` caches one layout per length,
block sizes and device, so every layer and step shares it.
"""

import functools
import math

import torch


def check_blocks(block_size: int, query_block: int) -> None:
    """The block rule of `model.sparse`; ValueError naming the key."""
    if not (isinstance(block_size, int) and 1 <= block_size <= 4096):
        raise ValueError(f"model.sparse.block_size={block_size!r} is invalid: must be an integer in [1, 4096]")
    if not (isinstance(query_block, int) and query_block >= block_size and query_block % block_size == 0):
        raise ValueError(
            f"model.sparse.query_block={query_block!r} is invalid: must be a positive multiple of "
            f"model.sparse.block_size={block_size}"
        )


def visible_keys(query_block: int, past_keys: int, device) -> torch.Tensor:
    """What a query block sees when every slot of its row is in use, [Q, past_keys + Q] bool: its selected
    past keys, then its own block causally."""
    arange_q = torch.arange(query_block, device=device)
    past = torch.ones(query_block, past_keys, dtype=torch.bool, device=device)
    return torch.cat([past, arange_q[None, :] <= arange_q[:, None]], dim=1)


class SparseLayout:
    def __init__(self, seq_len: int, block_size: int = 1, query_block: int | None = None, device="cpu"):
        query_block = block_size if query_block is None else query_block
        check_blocks(block_size, query_block)
        self.seq_len, self.block_size, self.query_block = seq_len, block_size, query_block
        self.device = torch.device(device)
        self.token_level = block_size == 1
        n_qb = math.ceil(seq_len / query_block)
        self.blocks_per_query_block = query_block // block_size
        self.n_rows = n_qb if not self.token_level else seq_len
        self.n_columns = n_qb * self.blocks_per_query_block if not self.token_level else seq_len
        self.padded_len = n_qb * query_block
        self.diagonal_tokens = 0 if self.token_level else query_block
        rows = torch.arange(self.n_rows, device=self.device)
        self.row_positions = rows * query_block  # [R] the deciding query of each row
        self.n_eligible = rows + 1 if self.token_level else rows * self.blocks_per_query_block  # [R]
        self.row_queries = (seq_len - self.row_positions).clamp(max=query_block)  # [R] queries per row
        self.eligible = torch.arange(self.n_columns, device=self.device)[None, :] < self.n_eligible[:, None]  # [R, C]

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def build(seq_len: int, block_size: int, query_block: int, device: torch.device) -> "SparseLayout":
        with torch.inference_mode(False):  # a layout first made in validation serves training too
            return SparseLayout(seq_len, block_size, query_block, device)

    @property
    def causal_pairs(self) -> int:
        return self.seq_len * (self.seq_len + 1) // 2

    def columns_for_tokens(self, k):
        """k tokens (int, float or tensor; float keeps its gradient) -> columns: the tokens themselves, or
        the key blocks a row selects besides its diagonal ones."""
        return k if self.token_level else (k - self.diagonal_tokens) / self.block_size

    def hard_columns(self, k):
        """A budget's k in columns (int, float or tensor) -> whole columns to select, at least the query's
        own token in token mode, at most every column."""
        low = 1 if self.token_level else 0
        if torch.is_tensor(k):
            return k.detach().ceil().long().clamp(low, self.n_columns)
        return min(max(low, math.ceil(k)), self.n_columns)

    def attended_pairs(self, used: torch.Tensor) -> torch.Tensor:
        """Columns in use per row [..., R] -> attended causal (query, key) pairs [...] (float64)."""
        if self.token_level:
            return used.sum(-1).double()
        queries = self.row_queries.double()
        diagonal = (queries * (queries + 1) / 2).sum()  # causal pairs inside each query block
        return (used * self.block_size * queries).sum(-1).double() + diagonal

    def per_key(self, per_column: torch.Tensor) -> torch.Tensor:
        """Values per row and column [B, R, C] -> per (query, key) [B, L, L]: a block row holds for every
        query of its query block, a block column for every key of its block."""
        if self.token_level:
            return per_column
        B, R, C = per_column.shape  # each row and column repeated in place: a copy, not an index per element
        rows = per_column[:, :, None].expand(B, R, self.query_block, C).reshape(B, R * self.query_block, C)
        keys = rows[:, : self.seq_len, :, None].expand(-1, -1, -1, self.block_size)
        return keys.reshape(B, self.seq_len, C * self.block_size)[..., : self.seq_len]

    def scatter_slots(self, values: torch.Tensor, indices: torch.Tensor, fill) -> torch.Tensor:
        """Slot values [B, R, K] -> [B, R, C] at the columns the slots name (-1 = unused), `fill` elsewhere."""
        B, R, _ = indices.shape
        out = values.new_full((B, R, self.n_columns + 1), fill)
        spare = indices.masked_fill(indices < 0, self.n_columns)  # unused slots write a spare column
        return out.scatter(-1, spare, values)[..., : self.n_columns]

    def selection_mask(self, indices: torch.Tensor) -> torch.Tensor:
        """The key positions each query attends -> bool [B, L, L]."""
        pos = torch.arange(self.seq_len, device=indices.device)
        causal = pos[None, :] <= pos[:, None]
        chosen = self.per_key(self.scatter_slots(torch.ones_like(indices, dtype=torch.bool), indices, False))
        if self.token_level:
            return chosen & causal
        diagonal = (pos[None, :] // self.query_block) == (pos[:, None] // self.query_block)
        return (chosen | diagonal) & causal

    def pad(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Zero-pad the sequence dimension `dim` of x to the padded length."""
        extra = self.padded_len - x.shape[dim]
        if extra == 0:
            return x
        pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
        return torch.nn.functional.pad(x, pad)

    def query_blocks(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, H, Lp, D] (padded) -> [B, nQB, Q, H, D]; a view when q is a transposed [B, Lp, H, D]
        tensor, as MLA's absorbed queries are."""
        B, H, Lp, D = q.shape
        return q.transpose(1, 2).reshape(B, Lp // self.query_block, self.query_block, H, D)

    def real_queries(self, rows: torch.Tensor) -> torch.Tensor:
        """Query blocks [n] -> which of their queries are real, not padding [n, Q] (bool)."""
        return rows[:, None] * self.query_block + torch.arange(self.query_block, device=rows.device) < self.seq_len

    def key_blocks(self, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The key blocks of n (sequence, query block) rows: indices [n, K] (each row's selected past blocks,
        -1 = unused), rows [n] (each row's query block) -> their selected blocks, then their diagonal blocks
        [n, K + m]."""
        m = self.blocks_per_query_block
        diagonal = rows[:, None] * m + torch.arange(m, device=indices.device)
        return torch.cat([indices, diagonal], dim=-1)

    def gather_blocks(self, latents: torch.Tensor, blocks: list[torch.Tensor], seqs: list[torch.Tensor]):
        """latents [B, Lp, D] (padded); per group of rows their key blocks [n, Kb] (-1 = unused) and sequences
        [n] -> per group keys [n, Kb * block_size, D]. One index_select serves every group, so backward
        scatters into the latents' gradient once, not once per group."""
        B, Lp, D = latents.shape
        n_kb = Lp // self.block_size  # whole blocks are contiguous rows of [B * nKB, bs * D]
        flat = torch.cat([(b.clamp(min=0) + s[:, None] * n_kb).reshape(-1) for b, s in zip(blocks, seqs)])
        rows = latents.reshape(B * n_kb, self.block_size * D).index_select(0, flat)
        parts = rows.split([b.numel() for b in blocks]) if len(blocks) > 1 else [rows]
        return [part.view(b.shape[0], -1, D) for part, b in zip(parts, blocks)]

    def key_mask(self, blocks: torch.Tensor, rows: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Key blocks [n, Kb] of rows [n] (`key_blocks`) -> the attention mask [n, Q, S] of their queries. With
        `shared` (every slot in use) it is the same for all rows, [1, Q, S]: past blocks fully visible, the
        diagonal causal."""
        m, bs, qb = self.blocks_per_query_block, self.block_size, self.query_block
        n, Kb = blocks.shape
        if shared:
            return visible_keys(qb, (Kb - m) * bs, blocks.device)[None]
        arange_q = torch.arange(qb, device=blocks.device)
        key_pos = (blocks[..., None] * bs + torch.arange(bs, device=blocks.device)).view(n, -1)
        key_ok = (blocks >= 0)[..., None].expand(-1, -1, bs).reshape(n, -1)
        q_pos = rows[:, None] * qb + arange_q
        return key_ok[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])

    def gather_key_blocks(self, latents, indices, seqs, rows, shared_mask: bool = False):
        """The key blocks of n rows (`key_blocks`) and their mask (`key_mask`): latents [B, Lp, D] (padded),
        indices [n, K], seqs and rows [n] -> keys [n, S, D], attention mask [n, Q, S] or [1, Q, S]."""
        blocks = self.key_blocks(indices, rows)
        return self.gather_blocks(latents, [blocks], [seqs])[0], self.key_mask(blocks, rows, shared_mask)
