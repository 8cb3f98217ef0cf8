"""kontext_core: a host-agnostic FLUX.1 Kontext engine in pure PyTorch (no ComfyUI imports)."""

__version__ = "0.1.0"
