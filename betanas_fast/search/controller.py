"""ENAS's controller: an LSTM that chooses one path per choice block, each decision fed back as the next input, and
its REINFORCE update with a moving-average baseline and an entropy bonus (Pham et al., ICML 2018; the
reference code melodyguan/enas)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn


class Controller(nn.Module):
    """The policy over architectures: an LSTM cell (`hidden` units, ENAS's lstm_size 64) run once per block, its
    logits `tanh_constant`·tanh(W h) (ENAS's 1.5) over the block's remaining paths; the chosen path's embedding is
    the next step's input, a learned start vector the first's. Parameters uniform in ±0.1, as the reference's."""

    def __init__(self, num_blocks: int, num_candidates: int, hidden: int = 64, tanh_constant: float = 1.5):
        super().__init__()
        self.num_blocks, self.tanh_constant = num_blocks, tanh_constant
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.start = nn.Parameter(torch.empty(1, hidden))
        self.embedding = nn.Embedding(num_candidates, hidden)
        self.logits_layer = nn.Linear(hidden, num_candidates, bias=False)
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def forward(self, remaining: torch.Tensor, generator: Optional[torch.Generator] = None, greedy: bool = False
                ) -> Tuple[List[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(one path per block, the sum of their log-probabilities, the sum of the blocks' entropies, the [L, M]
        logits each block's choice was drawn from, -inf off the remaining paths): sampled with `generator`, or the
        most likely path at each step with `greedy`."""
        h = c = torch.zeros_like(self.start)
        x = self.start
        arch, log_probs, entropies, rows = [], [], [], []
        for l in range(self.num_blocks):
            h, c = self.lstm(x, (h, c))
            logits = (self.tanh_constant * torch.tanh(self.logits_layer(h)[0])).masked_fill(~remaining[l],
                                                                                          float("-inf"))
            log_p = torch.log_softmax(logits, 0)
            p = log_p.exp()
            m = int(p.argmax()) if greedy else int(torch.multinomial(p.detach(), 1, generator=generator))
            arch.append(m)
            log_probs.append(log_p[m])
            entropies.append(-(p * log_p.masked_fill(~remaining[l], 0.0)).sum())
            rows.append(logits)
            x = self.embedding.weight[m][None]
        return arch, torch.stack(log_probs).sum(), torch.stack(entropies).sum(), torch.stack(rows)


class Reinforce:
    """ENAS's update of the controller from one sampled architecture's reward R: the entropy bonus is added to the
    reward (R + entropy_weight · H, as the reference adds it), the baseline b moves toward it first,
    b ← b − (1 − decay)(b − R), and Adam minimises −(R − b) · log π(architecture): a reward above the baseline makes
    the sampled architecture more likely. Defaults: the reference's controller lr 1e-3 (Adam), entropy weight 1e-4,
    baseline decay 0.99, baseline starting at 0."""

    def __init__(self, controller: Controller, lr: float = 1e-3, entropy_weight: float = 1e-4,
                 baseline_decay: float = 0.99):
        self.controller, self.entropy_weight, self.baseline_decay = controller, entropy_weight, baseline_decay
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=lr)
        self.baseline = 0.0

    def step(self, log_prob: torch.Tensor, entropy: torch.Tensor, reward: float) -> dict:
        """One update; returns what the history records of it."""
        reward = float(reward) + self.entropy_weight * float(entropy.detach())
        self.baseline -= (1 - self.baseline_decay) * (self.baseline - reward)
        advantage = reward - self.baseline
        loss = -advantage * log_prob
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"reward": reward, "baseline": self.baseline, "advantage": advantage,
                "entropy": float(entropy.detach())}

    def state_dict(self) -> dict:
        return {"controller": {k: v.detach().clone() for k, v in self.controller.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "baseline": self.baseline}

    def load_state_dict(self, d: dict) -> None:
        self.controller.load_state_dict(d["controller"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.baseline = float(d["baseline"])
