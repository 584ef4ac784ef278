"""Vision Transformer models over mixed-size patch tokens."""

from adaptive_jax.models.vit import VARIANTS, AdaptiveViT, variant_settings

__all__ = ["VARIANTS", "AdaptiveViT", "variant_settings"]
