import numpy as np
import pytest
import torch
from PIL import Image

from kontext_core import images as im
from kontext_core.errors import InputError


def test_seventeen_buckets_all_multiples_of_16():
    assert len(im.KONTEXT_BUCKETS) == 17 and len(set(im.KONTEXT_BUCKETS)) == 17
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in im.KONTEXT_BUCKETS)
    assert (1024, 1024) in im.KONTEXT_BUCKETS and (1568, 672) in im.KONTEXT_BUCKETS


@pytest.mark.parametrize("size,bucket", [((1024, 1024), (1024, 1024)), ((1920, 1080), (1392, 752)),
                                         ((1080, 1920), (752, 1392)), ((500, 400), (1104, 944)),
                                         ((4000, 1000), (1568, 672))])
def test_nearest_bucket_by_aspect(size, bucket):
    assert im.nearest_bucket(*size) == bucket


def test_fit_modes_give_requested_size_and_keep_content_unstretched():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    for mode in ("stretch", "crop", "pad"):
        assert im.fit(img, (96, 96), mode).size == (96, 96)
    padded = np.asarray(im.fit(img, (96, 96), "pad"))
    assert padded[0, 48].tolist() == [0, 0, 0] and padded[48, 48].tolist() == [255, 0, 0]  # letterboxed
    cropped = np.asarray(im.fit(img, (96, 96), "crop"))
    assert (cropped == [255, 0, 0]).all()
    with pytest.raises(InputError, match="resize mode"):
        im.fit(img, (96, 96), "zoom")


def test_keep_mode_snaps_to_16_and_bucket_modes_use_buckets():
    assert im.target_size(1000, 750, "keep") == (992, 736)
    assert im.target_size(1000, 750, "stretch") == im.nearest_bucket(1000, 750)
    assert im.snap16(5, 5) == (16, 16)


def test_alpha_is_composited_not_dropped():
    rgba = Image.new("RGBA", (32, 32), (10, 20, 30, 0))
    x = im.pil_to_tensor(rgba)
    assert torch.allclose(x, torch.ones_like(x))  # fully transparent -> white background


def test_tensor_conversions_round_trip():
    t = torch.rand(1, 3, 24, 40)
    pil = im.to_pil(t)
    assert pil.size == (40, 24)
    x = im.pil_to_tensor(pil)
    assert x.shape == (1, 3, 24, 40) and x.min() >= -1 and x.max() <= 1
    back = im.tensor_to_pil(x)[0]
    assert np.array_equal(np.asarray(back), np.asarray(pil))
    with pytest.raises(InputError):
        im.to_pil(torch.rand(2, 3, 8, 8))
    with pytest.raises(InputError):
        im.nearest_bucket(0, 10)
