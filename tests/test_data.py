"""The data layer: nested folders as label levels, built-ins, image modes, corrupt files."""
import os

import numpy as np
import pytest
from PIL import Image

from common.data import DataError, load_dataset, materialise_builtin, parse_spec, scan_imagefolder, stratified_split
from common.description import Level, ModelDescription, Preprocessing
from common.images import ImageDecodeError, open_image, preprocess, to_rgb


def _png(path, color=(10, 20, 30), size=(9, 7)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_nested_folders_are_levels(tmp_path):
    root = tmp_path / "d"
    _png(str(root / "animals" / "birds" / "a.png"))
    _png(str(root / "animals" / "birds" / "b.png"))
    _png(str(root / "animals" / "dogs" / "c.png"))
    _png(str(root / "vehicles" / "cars" / "d.png"))
    _png(str(root / "plants" / "e.png"))          # a shallower leaf stands for itself below
    ds = scan_imagefolder(str(root))
    assert [lv.name for lv in ds.levels] == ["level0", "level1"]
    assert ds.levels[0].classes == ["animals", "plants", "vehicles"]
    assert ds.levels[1].classes == ["animals/birds", "animals/dogs", "plants", "vehicles/cars"]
    assert list(ds.splits) == ["all"]
    assert ds.labels("all", 1).tolist() == [0, 0, 1, 2, 3]
    assert ds.labels("all", 0).tolist() == [0, 0, 0, 1, 2]


def test_train_test_splits_and_manifest_level_names(fmnist_small):
    ds = load_dataset(fmnist_small)
    assert set(ds.splits) == {"train", "test"}
    assert [lv.name for lv in ds.levels] == ["generic", "specific"]
    assert len(ds.levels[0].classes) == 5 and len(ds.levels[1].classes) == 10
    assert "tops/shirt" in ds.levels[1].classes
    # every leaf maps to its folder's parent at the generic level
    for leaf, name in enumerate(ds.levels[1].classes):
        assert ds.levels[0].classes[ds.leaf_to_level[0][leaf]] == name.split("/")[0]
    assert len(ds.paths("train")) == 200 and len(ds.paths("test")) == 200
    assert ds.fingerprint() == load_dataset(fmnist_small).fingerprint()


@pytest.mark.parametrize("spec,n_classes", [("digits:per_class=5", 10), ("mnist:per_class=5", 10)])
def test_builtins_materialise_once(spec, n_classes):
    first = materialise_builtin(spec)
    mtime = os.path.getmtime(os.path.join(first, "manifest.json"))
    assert materialise_builtin(spec) == first
    assert os.path.getmtime(os.path.join(first, "manifest.json")) == mtime
    ds = load_dataset(spec)
    assert len(ds.leaf_classes) == n_classes
    assert np.bincount(ds.labels("train")).tolist() == [5] * n_classes


def test_emoji_levels_and_cross_style_split():
    ds = load_dataset("emoji:styles=google,test_styles=twitter,per_class=1")
    assert [lv.name for lv in ds.levels] == ["category", "subcategory", "emoji"]
    assert len(ds.levels[0].classes) >= 8 and len(ds.levels[1].classes) >= 90
    assert all(os.path.basename(p).startswith("google") for p in ds.paths("train"))
    assert all(os.path.basename(p).startswith("twitter") for p in ds.paths("test"))
    img = open_image(ds.paths("train")[0])          # RGBA composited on white
    assert img.mode == "RGB" and img.size == (64, 64)


def test_unknown_builtin_and_bad_options():
    with pytest.raises(DataError, match="neither a folder nor a built-in"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="key=value"):
        parse_spec("emoji:google")
    with pytest.raises(DataError, match="styles=.apple. must be google, twitter"):
        load_dataset("emoji:styles=apple")
    with pytest.raises(DataError, match="folder not found"):
        load_dataset("./no/such/folder")


def test_empty_folder_reported(tmp_path):
    root = tmp_path / "d"
    _png(str(root / "a" / "x.png"))
    os.makedirs(root / "b")
    ds = scan_imagefolder(str(root))
    assert ds.empty_dirs == ["b"]
    with pytest.raises(DataError, match="no images found"):
        scan_imagefolder(str(root / "b"))


def test_image_modes_convert_consistently(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))            # fully transparent red
    assert to_rgb(rgba, (255, 255, 255)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half, (255, 255, 255)).getpixel((0, 0)) == (127, 127, 127)
    grey16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert to_rgb(grey16).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 255, 0] * 256)
    assert to_rgb(pal).getpixel((0, 0)) == (0, 255, 0)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    # the same picture as PNG, array and bytes gives the same tensor
    pre = Preprocessing(input_size=8, resize_size=8)
    arr = (np.arange(10 * 12 * 3) % 251).astype(np.uint8).reshape(10, 12, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    a = preprocess(str(tmp_path / "a.png"), pre)
    b = preprocess(arr, pre)
    c = preprocess((tmp_path / "a.png").read_bytes(), pre)
    assert a.shape == (3, 8, 8) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_corrupt_and_missing_files_name_the_path(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageDecodeError, match="bad.jpg: cannot decode"):
        open_image(str(bad))
    with pytest.raises(ImageDecodeError, match="file not found"):
        open_image(str(tmp_path / "missing.png"))
    with pytest.raises(ImageDecodeError, match="unsupported input type"):
        open_image(3.14)
    good = tmp_path / "good.png"
    _png(str(good))
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ImageDecodeError, match="trunc.png"):
        open_image(str(truncated))


def test_stratified_split_is_seeded_and_keeps_every_class():
    y = np.array([0] * 10 + [1] * 3 + [2] * 2)
    tr, te = stratified_split(y, 0.3, seed=1)
    tr2, te2 = stratified_split(y, 0.3, seed=1)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(y)))
    assert set(y[tr]) == set(y[te]) == {0, 1, 2}


def test_description_round_trip_and_levels(tmp_path):
    desc = ModelDescription("small_cnn", 256, Preprocessing(),
                            levels=[Level("generic", ["a", "b"]), Level("specific", ["a/x", "b/y"])],
                            heads=[{"name": "specific", "classes": ["a/x", "b/y"]}])
    desc.save(str(tmp_path / "description.json"))
    back = ModelDescription.load(str(tmp_path))
    assert back == desc
    assert back.level_index("generic") == 0 and back.level_index(-1) == 1
    with pytest.raises(ValueError, match="unknown level"):
        back.level_index("nope")
    with pytest.raises(ValueError, match="newer"):
        ModelDescription.from_dict({**desc.to_dict(), "format_version": 99})


ICON_CONTEXTS = ["actions", "apps", "categories", "devices", "emblems", "emotes", "mimetypes",
                 "places", "status"]


@pytest.mark.parametrize("theme,n_images", [("gnome", 365), ("tango", 214), ("mate", 451)])
def test_icon_themes_load_labelled_by_context(theme, n_images):
    """The held-out icon targets: one image per icon (sizes and identical copies deduplicated),
    48 px RGB on white, the freedesktop contexts as classes, a stratified 50/50 split."""
    ds = load_dataset(f"icons:theme={theme},label=context")
    assert [lv.name for lv in ds.levels] == ["context"]
    assert ds.levels[0].classes == ICON_CONTEXTS          # 'animations' (1-2 icons) left out
    assert ds.manifest["left_out_contexts"] == ["animations"]
    train, test = ds.labels("train"), ds.labels("test")
    assert len(train) + len(test) == n_images
    assert abs(len(train) - len(test)) <= len(ICON_CONTEXTS)
    assert set(train.tolist()) == set(test.tolist()) == set(range(len(ICON_CONTEXTS)))
    img = Image.open(ds.paths("test")[0])
    assert img.mode == "RGB" and img.size == (48, 48)
    pixels = {Image.open(p).tobytes() for p in ds.paths("train") + ds.paths("test")}
    assert len(pixels) == n_images                         # no icon twice


def test_icon_theme_options_checked():
    with pytest.raises(DataError, match="theme=.oxygen. must be gnome, tango or mate"):
        load_dataset("icons:theme=oxygen")
    with pytest.raises(DataError, match="label=.size. must be context"):
        load_dataset("icons:theme=gnome,label=size")


def test_missing_icon_theme_names_the_install_command(tmp_path, monkeypatch):
    if os.path.isdir("/usr/share/icons/Tango/16x16"):
        pytest.skip("tango-icon-theme is installed system-wide here")
    monkeypatch.setenv("UNIREP_CACHE", str(tmp_path))
    monkeypatch.delenv("UNIREP_ICONS_DIR", raising=False)
    with pytest.raises(DataError, match=r"apt-get download tango-icon-theme && dpkg -x"):
        load_dataset("icons:theme=tango")
