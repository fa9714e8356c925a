"""ctxlab: declared context-length-extension studies (MS attention, CRD NTK, baselines)."""

__version__ = "0.1.0"
