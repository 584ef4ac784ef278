"""adaptive_jax: content-adaptive patch sizes for Vision Transformers in JAX/Flax."""

__version__ = "0.1.0"
