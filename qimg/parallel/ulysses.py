"""Ulysses sequence parallelism: each rank of a group holds a contiguous share of the image tokens.

Everything a transformer block does per token (norms, modulation, projections, MLPs, RoPE) runs on the share. Around
attention one all-to-all trades the token split for a head split: each rank then holds every token for H/U heads,
attends over the whole sequence (with the context tokens, whole on every rank, cut to the same heads), and a second
all-to-all trades back. Context queries (v1's text stream) come out with H/U heads and are gathered over heads, so the
text stream stays whole on every rank. Shares may differ by one token: the exchanges carry their exact sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class UlyssesSequence:
    """The token layout of one rank in a group of `size` ranks (`qimg.models.attention.WholeSequence`'s methods)."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.counts: list[int] | None = None  # every rank's share of the sequence being run (set by `shard`)

    def sizes(self, length: int) -> list[int]:
        base, extra = divmod(length, self.size)
        return [base + (1 if r < extra else 0) for r in range(self.size)]

    def span(self, length: int) -> tuple[int, int]:
        sizes = self.sizes(length)
        start = sum(sizes[:self.rank])
        return start, start + sizes[self.rank]

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's share of the token axis `dim`; the shares are remembered for the exchanges of the call (a
        model shards its tokens before its blocks run)."""
        self.counts = self.sizes(t.shape[dim])
        start, stop = self.span(t.shape[dim])
        return t.narrow(dim, start, stop - start)

    def gather(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The shares of every rank, in order, along `dim` (shares of unequal length are padded for the exchange)."""
        dim = dim % t.dim()
        lengths = self.counts
        longest = max(lengths)
        if t.shape[dim] < longest:
            pad = list(t.shape)
            pad[dim] = longest - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad)], dim)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], dim)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        per = t.shape[2] // self.size
        return t[:, :, self.rank * per:(self.rank + 1) * per]

    def _to_heads(self, parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """Token shares `[B, s, H, D]` (stacked, one exchange) -> whole sequences `[B, S, H/U, D]` of this rank's
        heads; also every rank's share length."""
        if self.counts is None or self.counts[self.rank] != parts[0].shape[1]:
            raise RuntimeError("sequence-parallel attention before the tokens were sharded")
        x = torch.stack(parts, dim=2)  # [B, s, n, H, D]
        b, s, n, h, d = x.shape
        counts = self.counts
        send = x.reshape(b, s, n, self.size, h // self.size, d).permute(3, 1, 0, 2, 4, 5)
        send = send.reshape(self.size * s, b, n, h // self.size, d).contiguous()
        received = send.new_empty(sum(counts), b, n, h // self.size, d)
        dist.all_to_all_single(received, send, output_split_sizes=counts, input_split_sizes=[s] * self.size,
                               group=self.group)
        whole = received.permute(2, 1, 0, 3, 4)  # [n, B, S, H/U, D]
        return list(whole.unbind(0)), counts

    def _to_tokens(self, out: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """`[B, S, H/U, D]` of this rank's heads -> its token share `[B, s, H, D]` of every head."""
        b, _, hl, d = out.shape
        s = counts[self.rank]
        send = out.permute(1, 0, 2, 3).contiguous()  # [S, B, H/U, D]
        received = send.new_empty(self.size * s, b, hl, d)
        dist.all_to_all_single(received, send, output_split_sizes=[s] * self.size, input_split_sizes=counts,
                               group=self.group)
        return received.reshape(self.size, s, b, hl, d).permute(2, 1, 0, 3, 4).reshape(b, s, self.size * hl, d)

    def attention(self, attend, q, k, v, mask=None, context=None):
        (q, k, v), counts = self._to_heads([q, k, v])
        context_out = None
        if context is not None:
            cq, ck, cv = context
            k, v = torch.cat([self._heads(ck), k], 1), torch.cat([self._heads(cv), v], 1)
            if cq is not None:
                q = torch.cat([self._heads(cq), q], 1)
        out = attend(q, k, v, mask)
        if context is not None and context[0] is not None:
            n = context[0].shape[1]
            context_out = self._all_heads(out[:, :n])
            out = out[:, n:]
        return context_out, self._to_tokens(out, counts)

    def _all_heads(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=2)
