"""ComfyUI entry point of the Kontext Native node pack (clone into ComfyUI/custom_nodes/ and restart).

Inside ComfyUI this exposes `comfy_entrypoint` (V3 nodes, see nodes/extension.py). Anywhere else (pytest,
plain `import`), it defines nothing and imports nothing from ComfyUI, so it never breaks test collection.
"""

import importlib.util
import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_log = logging.getLogger("kontext_native")


def _register_engine() -> None:
    """Make the bundled engine importable as `kontext_core` (the pack's folder is not on sys.path)."""
    engine_dir = os.path.join(_HERE, "kontext_core")
    loaded = sys.modules.get("kontext_core")
    if loaded is not None:
        where = os.path.dirname(os.path.abspath(getattr(loaded, "__file__", "") or ""))
        if os.path.realpath(where) != os.path.realpath(engine_dir):
            _log.warning("Kontext Native: another 'kontext_core' is already imported from %s; using it.", where)
        return
    spec = importlib.util.spec_from_file_location("kontext_core", os.path.join(engine_dir, "__init__.py"),
                                                  submodule_search_locations=[engine_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kontext_core"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop("kontext_core", None)
        raise


def _inside_comfyui() -> bool:
    return importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None


if _inside_comfyui():
    _register_engine()
    from .nodes.extension import comfy_entrypoint  # noqa: E402,F401

    __all__ = ["comfy_entrypoint"]
