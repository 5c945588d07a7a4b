from __future__ import annotations

import json

from PIL import Image

from dreambooth_kit.inference.generate import Generated
from dreambooth_kit.inference.images import make_grid, save_images
from dreambooth_kit.inference.pngmeta import JSON_KEY, GenerationParams


def test_grid_fills_rows_left_to_right():
    tiles = [Image.new("RGB", (4, 4), c) for c in ("red", "green", "blue")]
    g = make_grid(tiles)
    assert g.size == (8, 8) and g.getpixel((5, 1)) == (0, 128, 0) and g.getpixel((1, 5)) == (0, 0, 255)
    assert make_grid(tiles, cols=3).size == (12, 4)


def test_save_images_names_files_by_seed_with_their_settings(tmp_path):
    def result(seed, color):
        params = GenerationParams("p", "", seed, 2, 7.5, 4, 4, "DDIM", "m")
        return Generated(Image.new("RGB", (4, 4), color), params)

    paths = save_images([result(7, "red"), result(8, "blue")], tmp_path / "out", grid=True, prefix="x")
    assert [p.name for p in paths] == ["x7.png", "x8.png", "xgrid.png"]
    with Image.open(paths[1]) as im:
        assert json.loads(im.text[JSON_KEY])["seed"] == 8
    with Image.open(paths[2]) as im:
        assert im.size == (8, 4)  # 2 tiles: one row of 2


def test_an_existing_image_is_never_replaced_unless_asked(tmp_path):
    """Before, generating seed 7 again into the same folder (another prompt, another LoRA) replaced
    the earlier 7.png without a word."""

    def result(color):
        return Generated(
            Image.new("RGB", (4, 4), color), GenerationParams("p", "", 7, 2, 7.5, 4, 4, "DDIM", "m")
        )

    (first,) = save_images([result("red")], tmp_path)
    (second,) = save_images([result("blue")], tmp_path)
    (third,) = save_images([result("green")], tmp_path)
    assert [first.name, second.name, third.name] == ["7.png", "7-2.png", "7-3.png"]
    with Image.open(first) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)  # kept
    (again,) = save_images([result("white")], tmp_path, overwrite=True)
    assert again == first
    with Image.open(first) as im:
        assert im.getpixel((0, 0)) == (255, 255, 255)
