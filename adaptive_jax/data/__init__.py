"""Data sources, preprocessing, host-side patch selection and bucketed batching."""

from adaptive_jax.data.pipeline import HostSelector, InputPipeline, prefetch
from adaptive_jax.data.sources import Source, load_source

__all__ = ["HostSelector", "InputPipeline", "Source", "load_source", "prefetch"]
