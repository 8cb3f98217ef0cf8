"""Where the model files named by the shipped workflows come from, and the message for a file that is not there.

One catalogue for three readers: the loader nodes' `validate_inputs` (a missing file is named with the folders
searched and where to download it), the workflow builder (`properties.models` on loader nodes, which ComfyUI's
"Missing Models" dialog offers to download, and the Note text), and the tests. File names and URLs are those of
ComfyUI's official FLUX.1 Kontext [dev] template, so files downloaded for it serve these workflows too.

Pure Python with no imports: workflows/build_workflows.py loads this file by path.
"""

from __future__ import annotations

HF = "https://huggingface.co"


def _file(repo: str, path: str) -> str:
    return f"{HF}/{repo}/resolve/main/{path}"


# file name -> what it is, the ComfyUI models/ subfolder, a direct download URL (None: only a page to visit)
# and the page to get it from.
SOURCES: dict[str, dict] = {
    "flux1-dev-kontext_fp8_scaled.safetensors": dict(
        what="the FLUX.1 Kontext [dev] transformer (scaled fp8, 11.9 GB; ComfyUI's official Kontext file)",
        directory="diffusion_models",
        url=_file("Comfy-Org/flux1-kontext-dev_ComfyUI", "split_files/diffusion_models/"
                                                          "flux1-dev-kontext_fp8_scaled.safetensors"),
        page=f"{HF}/Comfy-Org/flux1-kontext-dev_ComfyUI"),
    "flux1-kontext-dev.safetensors": dict(
        what="the original bf16 FLUX.1 Kontext [dev] transformer (23.8 GB; accept the licence on the page first)",
        directory="diffusion_models", url=None, page=f"{HF}/black-forest-labs/FLUX.1-Kontext-dev"),
    "flux1-kontext-dev-Q4_K_M.gguf": dict(
        what="a GGUF quantization of the FLUX.1 Kontext [dev] transformer (Q4_K_M 6.9 GB; Q8_0, Q6_K, Q5_K_M, "
             "Q3_K_M are there too)",
        directory="diffusion_models", url=None, page=f"{HF}/QuantStack/FLUX.1-Kontext-dev-GGUF"),
    "clip_l.safetensors": dict(
        what="the CLIP-L text encoder", directory="text_encoders",
        url=_file("comfyanonymous/flux_text_encoders", "clip_l.safetensors"),
        page=f"{HF}/comfyanonymous/flux_text_encoders"),
    "t5xxl_fp8_e4m3fn_scaled.safetensors": dict(
        what="the T5-XXL text encoder (scaled fp8, 5 GB; t5xxl_fp16.safetensors from the same page is the "
             "9.5 GB original)", directory="text_encoders",
        url=_file("comfyanonymous/flux_text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors"),
        page=f"{HF}/comfyanonymous/flux_text_encoders"),
    "ae.safetensors": dict(
        what="the FLUX autoencoder (VAE)", directory="vae",
        url=_file("Comfy-Org/Lumina_Image_2.0_Repackaged", "split_files/vae/ae.safetensors"),
        page=f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged"),
}

# What a loader suggests when the file it was given is unknown here: the usual file for that loader.
DEFAULT_FOR_LOADER = {
    "model": "flux1-dev-kontext_fp8_scaled.safetensors",
    "gguf": "flux1-kontext-dev-Q4_K_M.gguf",
}


def models_property(names) -> list[dict]:
    """`properties.models` of a loader node in a UI workflow: the downloadable files among `names`."""
    return [{"name": n, "url": SOURCES[n]["url"], "directory": SOURCES[n]["directory"]}
            for n in names if n in SOURCES and SOURCES[n]["url"]]


def where_to_get(name: str, loader: str) -> str:
    """One sentence: where to download `name` (or, for an unknown name, this loader's usual file)."""
    known = name in SOURCES
    entry = SOURCES[name if known else DEFAULT_FOR_LOADER[loader]]
    subject = name if known else DEFAULT_FOR_LOADER[loader]
    link = entry["url"] or entry["page"]
    return (f"{'It is' if known else 'This loader needs'} {entry['what']}: download {subject} from {link}"
            + ("" if known else " (or use any other FLUX.1 Kontext file you have)"))


def missing_file_message(name: str, loader: str, folder_label: str, folders, available) -> str:
    """The validation error for a loader whose file is not in any of `folders` (absolute paths searched)."""
    folders = list(folders)
    available = list(available)
    shown = ", ".join(available[:8]) + (f" and {len(available) - 8} more" if len(available) > 8 else "")
    return (f"'{name}' was not found in {folder_label} (searched: {'; '.join(folders) or 'no folder configured'}). "
            f"{where_to_get(name, loader)}, put it in {folder_label}, then press R in ComfyUI (refresh) and pick "
            f"it in the loader. Files there now: {shown or 'none'}.")


def missing_conditioning_message(name: str, folders, available) -> str:
    """The validation error for Load Kontext Conditioning: these files are made by the user, not downloaded."""
    available = list(available)
    return (f"'{name}' was not found in models/kontext_conditioning or input/ (searched: {'; '.join(folders)}). "
            "Make one with 'Save Kontext Conditioning' (it writes to output/kontext_conditioning), move it to "
            f"models/kontext_conditioning and press R. Files there now: {', '.join(available[:8]) or 'none'}.")
