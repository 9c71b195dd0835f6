"""kvmatrix: measure what prefix (KV) caching buys, and what invalidating it costs."""

__version__ = "0.1.0"
