"""The catalogue of model files (nodes/model_sources.py) and the missing-file messages built from it."""

from __future__ import annotations

from nodes import model_sources as S

OFFICIAL = "flux1-dev-kontext_fp8_scaled.safetensors"


def test_missing_known_file_names_file_folders_and_download():
    msg = S.missing_file_message(OFFICIAL, "model", "models/diffusion_models",
                                 ["/c/models/unet", "/c/models/diffusion_models"], [])
    assert f"'{OFFICIAL}' was not found in models/diffusion_models" in msg
    assert "/c/models/unet; /c/models/diffusion_models" in msg
    assert S.SOURCES[OFFICIAL]["url"] in msg and "FLUX.1 Kontext [dev] transformer" in msg
    assert msg.endswith("Files there now: none.")


def test_missing_unknown_file_suggests_the_loaders_usual_file():
    msg = S.missing_file_message("my_model.safetensors", "model", "models/diffusion_models", ["/m"],
                                 ["a.safetensors", "b/"])
    assert "'my_model.safetensors' was not found" in msg and OFFICIAL in msg
    assert "Files there now: a.safetensors, b/." in msg
    gguf = S.missing_file_message("x.gguf", "gguf", "models/diffusion_models (or models/unet)", ["/m"], [])
    assert S.SOURCES["flux1-kontext-dev-Q4_K_M.gguf"]["page"] in gguf


def test_long_file_lists_are_shortened():
    msg = S.missing_file_message("z.safetensors", "model", "models/diffusion_models", ["/m"],
                                 [f"f{i}.safetensors" for i in range(20)])
    assert "f7.safetensors and 12 more" in msg and "f8.safetensors" not in msg


def test_models_property_lists_only_downloadable_files_with_their_folder():
    prop = S.models_property([OFFICIAL, "flux1-kontext-dev.safetensors", "clip_l.safetensors", "unknown.bin"])
    assert [p["name"] for p in prop] == [OFFICIAL, "clip_l.safetensors"]
    assert prop[0] == {"name": OFFICIAL, "url": S.SOURCES[OFFICIAL]["url"], "directory": "diffusion_models"}
    assert prop[1]["directory"] == "text_encoders"


def test_every_entry_is_complete():
    for name, e in S.SOURCES.items():
        assert e["directory"] in {"diffusion_models", "text_encoders", "vae"}, name
        assert e["page"].startswith("https://huggingface.co/"), name
        assert e["url"] is None or (e["url"].startswith(e["page"] + "/resolve/main/") and e["url"].endswith(name))
