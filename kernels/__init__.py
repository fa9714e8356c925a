"""ctxlab kernels: Triton kernels and their plain PyTorch references.

Installed as ``ctxlab.kernels``. Nothing here imports Hydra or Lightning.
"""
