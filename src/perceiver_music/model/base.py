"""What every token model here shares: weight initialisation, the loss, parameter counts, and
the precision it runs in."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from perceiver_music.config import ModelConfig, check_precision
from perceiver_music.tokens.performance import PAD


class TokenModel(nn.Module):
    """A model mapping tokens [B, L] and their positions [B, L] to logits [B, N, vocab] for the
    last N positions (N = num_latents unless given)."""

    cfg: ModelConfig

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over non-PAD targets, plus z-loss (log Z)^2 if configured."""
        logits = logits.float()
        valid = targets != PAD
        if not valid.any():
            return logits.sum() * 0.0
        flat = logits[valid]  # [T, V]
        loss = F.cross_entropy(flat, targets[valid])
        if self.cfg.z_loss > 0:
            loss = loss + self.cfg.z_loss * flat.logsumexp(-1).square().mean()
        return loss

    def output(self, h: Tensor, cond=None) -> Tensor:
        """Logits [B, T, vocab] of the final hidden states h [B, T, D]: the head, and where the
        model reads the keyboard into its logits (model.keyboard_logits), that term."""
        logits = self.head(self.norm(h))
        conditioner = getattr(self, "conditioner", None)
        bias = conditioner.logit_bias(cond, *logits.shape) if conditioner is not None else None
        return logits if bias is None else logits + bias

    def run_block(self, block: nn.Module, *args) -> Tensor:
        """A block call, recomputed in the backward pass when activation checkpointing is on."""
        if self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def autocast(device: torch.device | str, precision: str):
    """The context a model runs in: bf16 autocast for "bf16", and for "auto" on a GPU; else
    plain float32 ("auto" on CPU: processors without bf16 matrix units emulate it slowly)."""
    check_precision(precision)
    device_type = torch.device(device).type
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def nll_sum(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed negative log-likelihood (nats) of the non-PAD targets and their count."""
    valid = targets != PAD
    nll = F.cross_entropy(logits.float()[valid], targets[valid], reduction="sum")
    return nll, valid.sum()
