"""The generator: our own OPT/Llama layers, weight loading, the block-scheduled offloading engine.

Importing this package does not import torch; the submodules do.
"""
