"""AR2's two objectives: the ranker's cross-entropy and the retriever's adversarial distillation."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class AR2RankerLoss(nn.Module):
    """Cross-entropy that puts the positive first among the positive and the retrieved negatives.

    The ranker (a cross-encoder) is the discriminator of AR2's minimax game: it learns to tell the
    positive from the negatives the retriever currently retrieves.

    Args:
        temperature: divides the ranker logits before the softmax.

    Requirements:
        1. Candidates per query: the positive in column 0, then negatives retrieved by the retriever.

    Inputs:
        +----------------+--------+-----------------------------------------------+
        | argument       | shape  | meaning                                       |
        +================+========+===============================================+
        | ranker_scores  | [B, C] | cross-encoder logits, positive in column 0    |
        +----------------+--------+-----------------------------------------------+

    References:
        - Zhang et al., "Adversarial Retriever-Ranker for Dense Text Retrieval", ICLR 2022 (AR2).
          https://arxiv.org/abs/2110.03611 ; code: github.com/microsoft/AR2
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, ranker_scores: torch.Tensor) -> torch.Tensor:
        target = torch.zeros(ranker_scores.shape[0], dtype=torch.long, device=ranker_scores.device)
        return F.cross_entropy(ranker_scores.float() / self.temperature, target)


class AR2RetrieverLoss(nn.Module):
    """The retriever's AR2 objective: follow the ranker's distribution, and chase the negatives the
    ranker finds hardest.

    With ``p_θ`` the retriever's softmax over the candidates and ``p_φ`` the (frozen for this step)
    ranker's softmax over the same candidates, the loss is

    ``(1 - λ) · mean_q KL(p_φ ‖ p_θ)  +  λ · Σ_q Σ_d  log σ(r_pos - r_d) · log p_θ(d)``

    The first term distils the ranker into the retriever (averaged over the queries). The adversarial
    term is *summed* over the queries of the (micro-)batch, as microsoft/AR2's retriever step does
    (``adv_loss.sum()``; its distillation term is divided by the batch size): with ``adv_reduction="mean"``
    it is averaged like the KL, which makes λ B times weaker than the reference's. The second is AR2's adversarial term
    (the REINFORCE-style retriever update of the minimax game): ``log σ(r_pos - r_d)`` is the
    ranker's log-probability of preferring the positive over ``d``; it is most negative for the
    candidates the ranker confuses with the positive, and minimising the product raises the
    retriever's probability of exactly those, so it retrieves harder negatives for the ranker.
    Rewards carry no gradient.

    Args:
        adv_lambda: λ, the weight of the adversarial term (AR2's ``adv_lambda``; 0 = pure distillation).
        scale: multiplier on the retriever's scores before the softmax (20 for cosine scores).
        ranker_temperature: divides the ranker logits before its softmax (not the rewards, as in the
            reference).
        adv_reduction: ``"sum"`` (microsoft/AR2, default) or ``"mean"`` over the queries.

    Requirements:
        1. The same candidates for both models, positive in column 0, negatives retrieved by the
           retriever's own (periodically refreshed) index.

    Inputs:
        +-------------------+--------+------------------------------------------------+
        | argument          | shape  | meaning                                        |
        +===================+========+================================================+
        | retriever_scores  | [B, C] | dual-encoder scores (with gradient)            |
        | ranker_scores     | [B, C] | cross-encoder logits (treated as constants)    |
        +-------------------+--------+------------------------------------------------+

    References:
        - Zhang et al., "Adversarial Retriever-Ranker for Dense Text Retrieval", ICLR 2022 (AR2).
          https://arxiv.org/abs/2110.03611 ; code: github.com/microsoft/AR2
    """

    def __init__(self, adv_lambda: float = 0.5, scale: float = 20.0, ranker_temperature: float = 1.0,
                 adv_reduction: str = "sum"):
        super().__init__()
        if not 0.0 <= adv_lambda <= 1.0:
            raise ValueError(f"adv_lambda must lie in [0, 1], got {adv_lambda}")
        if adv_reduction not in ("sum", "mean"):
            raise ValueError(f"adv_reduction must be 'sum' (microsoft/AR2) or 'mean', got {adv_reduction!r}")
        self.adv_lambda = adv_lambda
        self.scale = scale
        self.ranker_temperature = ranker_temperature
        self.adv_reduction = adv_reduction
        self.last_kl = 0.0
        self.last_adversarial = 0.0

    def forward(self, retriever_scores: torch.Tensor, ranker_scores: torch.Tensor) -> torch.Tensor:
        log_p_retriever = F.log_softmax(retriever_scores.float() * self.scale, dim=1)
        ranker = ranker_scores.detach().float()
        log_p_ranker = F.log_softmax(ranker / self.ranker_temperature, dim=1)
        kl = F.kl_div(log_p_retriever, log_p_ranker, log_target=True, reduction="batchmean")
        reward = F.logsigmoid(ranker[:, :1] - ranker)  # log P_ranker(positive beats d), no gradient
        per_query = (reward * log_p_retriever).sum(dim=1)
        adversarial = per_query.sum() if self.adv_reduction == "sum" else per_query.mean()
        self.last_kl, self.last_adversarial = float(kl.detach()), float(adversarial.detach())
        if self.adv_lambda == 0.0:
            return kl
        return (1.0 - self.adv_lambda) * kl + self.adv_lambda * adversarial
