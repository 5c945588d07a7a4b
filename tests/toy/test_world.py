"""The toy world: captions say what is drawn, held-out combinations never reach pretraining, the
subject is something no caption describes."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from dreambooth_kit.toy import world


def test_captions_name_class_colour_and_background():
    s = world.Scene("cone", "orange", "sand", 0.25, 0.5, 0.5)
    assert world.caption(s) == "a photo of an orange cone on a sand background"
    assert world.caption(s, colour=False) == "a photo of a cone on a sand background"
    assert world.caption(s, background=False) == "a photo of an orange cone"
    subject = world.Scene("ball", "red", "blue", 0.25, 0.5, 0.5, subject=True)
    assert world.caption(subject) == "a photo of zwx ball on a blue background"


def test_every_caption_word_is_one_token_of_the_toy_tokenizer():
    from dreambooth_kit.toy.model import toy_tokenizer

    tok = toy_tokenizer()
    for word in world.WORDS:
        assert len(tok.tokenize(word)) == 1, word


def test_held_out_combinations_never_appear_in_pretraining_data():
    held = set(world.held_out_combos())
    assert len(held) == 18
    assert {c for c, _, _ in held} == set(world.CLASSES)  # every class keeps unseen combinations
    seen = {(s.cls, s.colour, s.background) for _, _, s in world.dataset(500, seed=3)}
    assert not seen & held and len(seen) > 60


def test_render_is_deterministic_and_draws_the_colour_asked_for():
    s = world.random_scene(random.Random(1), cls="box", colour="red", background="gray", held_out=None)
    a, b = world.render(s, seed=5), world.render(s, seed=5)
    assert a.size == (32, 32) and a.tobytes() == b.tobytes()
    arr = np.asarray(a).reshape(-1, 3).astype(int)
    red = np.abs(arr - world.COLOURS["red"]).sum(1) < 40
    assert red.mean() > 0.05  # the object is there, in its colour


def test_subject_photos_vary_and_use_colours_no_word_names():
    photos = world.subject_photos()
    # Three backgrounds; the fourth is the new context the recontextualisation measure asks for.
    assert len(photos) == 5 and {s.background for _, s in photos} == set(world.PHOTO_BACKGROUNDS)
    assert world.NEW_CONTEXT_BACKGROUND not in world.PHOTO_BACKGROUNDS
    assert set(world.PHOTO_BACKGROUNDS) | {world.NEW_CONTEXT_BACKGROUND} == set(world.BACKGROUNDS)
    arr = np.asarray(photos[0][0]).reshape(-1, 3).astype(int)
    cyan = np.abs(arr - world.SUBJECT_TOP).sum(1) < 40
    assert cyan.mean() > 0.02
    assert all(np.abs(np.array(world.SUBJECT_TOP) - c).sum() > 150 for c in world.COLOURS.values())


def test_written_photos_name_their_background_on_every_other_caption(tmp_path):
    """Photos 1, 3, 5 carry a kohya-style caption naming their background (the identifier then binds
    to the ball, not to the photos' backgrounds); 2 and 4 train with the bare instance prompt."""
    paths = world.write_subject_photos(tmp_path)
    scenes = [s for _, s in world.subject_photos()]
    captions = {
        p.name: p.with_suffix(".txt").read_text().strip() for p in paths if p.with_suffix(".txt").exists()
    }
    assert captions == {
        paths[i].name: f"a photo of zwx ball on a {scenes[i].background} background" for i in (0, 2, 4)
    }
    assert not list(world.write_subject_photos(tmp_path / "bare", captions=False)[0].parent.glob("*.txt"))


def test_cluttered_photos_show_the_box_beside_the_subject_and_their_masks_cover_the_subject_only(tmp_path):
    """data.masks' test bed: the same five scenes with a black box in the far corner; each mask is
    white on the subject and black on the box."""
    from PIL import Image

    from dreambooth_kit.toy.rules import has_clutter, is_subject

    clean = world.subject_photos()
    cluttered = world.subject_photos(clutter=True)
    assert [s for _, s in clean] == [s for _, s in cluttered]  # the subject's scenes do not move
    assert not any(has_clutter(img) for img, _ in clean)
    assert all(has_clutter(img) and is_subject(img) for img, _ in cluttered)
    paths = world.write_subject_photos(tmp_path / "photos", clutter=True, masks=tmp_path / "masks")
    for path, (_, scene) in zip(paths, cluttered, strict=True):
        mask = np.asarray(Image.open(tmp_path / "masks" / path.name))
        photo = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        dark = photo.max(axis=-1) < 80  # the box
        assert dark.any() and mask[dark].max() == 0
        cx, cy = int(scene.x * 32), int(scene.y * 32)
        assert mask[cy, cx] == 255


def test_framed_photos_lose_the_subject_to_a_centre_crop_and_keep_it_in_their_bucket():
    """data.buckets' test bed: photos 2 and 3 are 5:3 and 3:5 with the subject near one end; the rest
    are the square photos unchanged. Cropped to the 32 px square the subject is cut (the world's
    strict rule no longer finds all its parts); in their 40x24 / 24x40 bucket it is whole."""
    from dreambooth_kit.data.buckets import bucket_sizes, nearest_bucket
    from dreambooth_kit.data.dataset import preprocess
    from dreambooth_kit.toy.rules import is_subject

    def image(t):
        return Image.fromarray(((t.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())

    square = world.subject_photos()
    framed = world.subject_photos(framing=True)
    assert [img.size for img, _ in framed] == [(32, 32), (80, 48), (48, 80), (32, 32), (32, 32)]
    for i in (0, 3, 4):
        assert np.array_equal(np.asarray(framed[i][0]), np.asarray(square[i][0]))
    buckets = bucket_sizes(32, 8)
    for img, _ in (framed[1], framed[2]):
        assert not is_subject(image(preprocess(img, 32)))
        bucket = nearest_bucket(img.size, buckets)
        assert bucket in ((40, 24), (24, 40)) and is_subject(image(preprocess(img, bucket)))
