"""Models: Perceiver AR / PerceiverS (perceiver_ar.py) and the Transformer baseline."""

from __future__ import annotations

from perceiver_music.config import CodesConfig, ModelConfig
from perceiver_music.model.base import TokenModel


def build_model(cfg: ModelConfig, codes: CodesConfig | None = None) -> TokenModel:
    """The token model of `cfg`; an upsampler also needs the `codes` section (its conditioner)."""
    if cfg.arch == "upsampler":
        from perceiver_music.audio.upsampler import Upsampler

        return Upsampler(cfg, codes or CodesConfig())
    if cfg.arch == "perceiver_ar":
        from perceiver_music.model.perceiver_ar import PerceiverAR

        return PerceiverAR(cfg)
    from perceiver_music.model.transformer import Transformer

    return Transformer(cfg)


__all__ = ["ModelConfig", "TokenModel", "build_model"]
