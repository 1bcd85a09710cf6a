"""Exporters, one module (or a few) per format family; they only pack what quantizers/ computed.

The registry of families and targets (`gguf:q4_k_m`, ...) is `smolconvert.targets`.
"""
