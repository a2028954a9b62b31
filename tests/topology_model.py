"""A small attention model whose heads have clear block topologies, encoded in its weights.

q and k are linear projections of fixed positional features of each token's index i (cosines
and sines of `FREQUENCIES` frequencies, computed in the graph from the sequence length). The
projection weights decide what each head attends to:

- head 0, a local window: q = k = a * features, so q_i . k_j = a^2 sum_m cos(w_m (i - j)),
  largest at j = i and small beyond ~`PERIOD / FREQUENCIES` tokens;
- head 1, two fixed offsets: k scaled per frequency by 2 cos(w_m d), so q_i . k_j =
  a^2 sum_m [cos(w_m (i - j + d)) + cos(w_m (i - j - d))], largest at j = i +- d.

The topology holds at any batch and sequence length, and is in the parameters alone: a
calibration that replaced the weights with noise would find another one. v and the output
depend on the input and on the timestep (through an embedding added to the tokens).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

FREQUENCIES = 16
PERIOD = 4096.0  # longer than any sequence used, so no pattern wraps around
OFFSET = 256  # head 1's distance, in tokens
HEAD_DIM = 2 * FREQUENCIES
HEADS = 2


class TopologyAttention(nn.Module):
    def __init__(self, channels: int = 8, dim: int = 32, sharpness: float = 3.5) -> None:
        super().__init__()
        self.proj_in = nn.Linear(channels, dim)
        self.time_proj = nn.Linear(1, dim)
        self.to_q = nn.Linear(HEAD_DIM, HEADS * HEAD_DIM, bias=False)
        self.to_k = nn.Linear(HEAD_DIM, HEADS * HEAD_DIM, bias=False)
        self.to_v = nn.Linear(dim, HEADS * HEAD_DIM)
        self.proj_out = nn.Linear(HEADS * HEAD_DIM, channels)
        omega = 2 * math.pi * torch.arange(1, FREQUENCIES + 1, dtype=torch.float64) / PERIOD
        offset = (2 * torch.cos(omega * OFFSET)).repeat(2).float()  # per (cos, sin) feature
        eye = torch.eye(HEAD_DIM)
        with torch.no_grad():
            self.to_q.weight.copy_(sharpness * torch.cat([eye, eye]))
            self.to_k.weight.copy_(sharpness * torch.cat([eye, torch.diag(offset)]))

    def qk(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k, (1, H, S, D): they depend on the sequence length only."""
        positions = torch.arange(seq_len, dtype=torch.float32, device=self.to_q.weight.device)
        omega = (2 * math.pi / PERIOD) * torch.arange(1, FREQUENCIES + 1, dtype=torch.float32,
                                                      device=positions.device)
        angles = positions[:, None] * omega[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (S, HEAD_DIM)
        q = self.to_q(features).view(1, seq_len, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.to_k(features).view(1, seq_len, HEADS, HEAD_DIM).transpose(1, 2)
        return q, k

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        x = self.proj_in(hidden_states) + self.time_proj(timestep[:, None].float() / 1000.0)[:, None]
        q, k = self.qk(s)
        v = self.to_v(x).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), k.expand(b, -1, -1, -1), v)
        return self.proj_out(out.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))


def true_recall(model: TopologyAttention, seq_len: int, token_mask: torch.Tensor) -> list[float]:
    """Per head, the model's exact attention mass inside `token_mask` (bool (H, S, S)), mean over queries."""
    q, k = model.qk(seq_len)
    with torch.no_grad():
        probs = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(HEAD_DIM), dim=-1)[0]
    return (probs * token_mask).sum(-1).mean(-1).tolist()
