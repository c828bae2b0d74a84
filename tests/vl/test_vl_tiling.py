"""Dynamic tiling against an independent, deliberately naive implementation of the rules in
DESIGN §3, against transformers' GotOcr2 processor, and against grid choices derived by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmdeploy.vl import tiling
from vlmdeploy.vl.tiling import (
    TilingParams,
    detail_to_max_num,
    dynamic_tiles,
    num_image_tokens,
    num_tiles,
    pixel_values,
    resolve_max_num,
    target_grid,
)

S = 448
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# -------------------------------------------------------- naive reference (written from the rules)


def naive_grid(w: int, h: int, min_num: int = 1, max_num: int = 12) -> tuple[int, int]:
    # Candidates: a set of (cols, rows), then a stable sort by cols * rows (the reference's order).
    found = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    found.add((i, j))
    ordered = sorted(found, key=lambda g: g[0] * g[1])
    best = (1, 1)
    best_diff = float("inf")
    for g in ordered:
        d = abs(w / h - g[0] / g[1])
        if d < best_diff:
            best_diff = d
            best = g
        elif d == best_diff:
            if w * h > 0.5 * S * S * g[0] * g[1]:
                best = g
    return best


def naive_tiles(img: Image.Image, min_num=1, max_num=12, thumb=True) -> list[Image.Image]:
    cols, rows = naive_grid(img.width, img.height, min_num, max_num)
    big = img.resize((S * cols, S * rows), Image.Resampling.BICUBIC)
    out = []
    for k in range(cols * rows):
        x, y = (k % cols) * S, (k // cols) * S
        out.append(big.crop((x, y, x + S, y + S)))
    if thumb and len(out) != 1:
        out.append(img.resize((S, S), Image.Resampling.BICUBIC))
    return out


def naive_pixel_values(img: Image.Image, min_num=1, max_num=12, thumb=True) -> torch.Tensor:
    # Per tile, as torchvision's ToTensor + Normalize do it: CHW, float, /255, -mean, /std.
    result = []
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    for tile in naive_tiles(img, min_num, max_num, thumb):
        t = torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        t = t.float().div(255)
        result.append((t - mean) / std)
    return torch.stack(result)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The naive path runs many small torch ops; on a loaded machine OpenMP's spinning workers make
    # them 100x slower. One thread keeps the test fast and changes no result.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ sizes

SPECIAL_SIZES = [
    (1, 1), (1, 1000), (1000, 1), (1, 10000), (10000, 1), (448, 448), (633, 633), (634, 634),
    (950, 950), (951, 951), (700, 200), (1400, 400), (2100, 600), (1120, 640), (2240, 1280),
    (900, 200), (1800, 400), (1024, 1024), (1920, 1080), (1080, 1920), (17, 144), (2, 3),
]  # fmt: skip


def random_sizes(n: int, seed: int, max_side: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sides = np.exp(rng.uniform(0, np.log(max_side), size=(n, 2))).astype(int) + 1
    return [(int(w), int(h)) for w, h in sides]


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------ grids


@pytest.mark.parametrize(
    "min_num,max_num", [(1, 12), (1, 6), (1, 24), (1, 1), (2, 6), (3, 3), (4, 4)]
)
def test_grid_matches_naive_rules(min_num, max_num):
    sizes = random_sizes(2000, seed=min_num * 100 + max_num, max_side=5000) + SPECIAL_SIZES
    for w, h in sizes:
        assert target_grid(w, h, min_num, max_num) == naive_grid(w, h, min_num, max_num), (w, h)


def test_grid_matches_transformers_when_min_is_one():
    # transformers lists candidates in (cols, rows) lexicographic order before sorting by count, not
    # in set order; with min_num = 1 (every InternVL3.5 config) the order never decides a tie.
    pil = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    for max_num in (6, 12, 24):
        for w, h in random_sizes(1500, seed=max_num, max_side=5000) + SPECIAL_SIZES:
            hf = pil.get_optimal_tiled_canvas((h, w), (S, S), 1, max_num)
            assert target_grid(w, h, 1, max_num) == tuple(hf), (w, h, max_num)


def test_candidate_order_decides_ties_when_min_above_one():
    # Documented difference: min = max = 4, aspect 2.5 ties (4, 1) with (2, 2). The reference's set
    # order puts (4, 1) first and a 5x2 image is too small to switch; transformers picks (2, 2).
    assert target_grid(5, 2, 4, 4) == naive_grid(5, 2, 4, 4) == (4, 1)
    pil = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    assert tuple(pil.get_optimal_tiled_canvas((2, 5), (S, S), 4, 4)) == (2, 2)


@pytest.mark.parametrize(
    "size,grid",
    [
        # Square images: (1,1), (2,2), (3,3) tie exactly; a bigger grid needs area > 0.5*448^2*n.
        ((448, 448), (1, 1)),
        ((633, 633), (1, 1)),  # 400689 <= 401408
        ((634, 634), (2, 2)),  # 401956 > 401408
        ((950, 950), (2, 2)),  # 902500 <= 903168
        ((951, 951), (3, 3)),  # 904401 > 903168
        # Aspect 3.5 ties (3,1), (4,1), (6,2) (all 0.5 away).
        ((700, 200), (3, 1)),  # 140000: no switch
        ((1400, 400), (4, 1)),  # 560000 > 401408, but <= 1204224
        ((2100, 600), (6, 2)),  # 1260000 > 1204224
        # Extreme aspect ratios fall back to the thinnest grids.
        ((1, 1), (1, 1)),
        ((1, 1000), (1, 12)),
        ((1000, 1), (12, 1)),
    ],
)
def test_grid_hand_derived(size, grid):
    assert target_grid(*size) == grid


@pytest.mark.parametrize("params", [TilingParams(), TilingParams(6, 1, 448, False),
                                    TilingParams(24, 2, 224, True)])
def test_tiling_params_count_like_the_functions(params):
    for w, h in [(300, 300), (600, 300), (200, 640), (1920, 1080), (3, 2000)]:
        assert params.num_tiles(w, h) == num_tiles(
            w, h, max_num=params.max_num, min_num=params.min_num,
            use_thumbnail=params.use_thumbnail, image_size=params.image_size)
    assert params.key == (params.max_num, params.min_num, params.image_size,
                          params.use_thumbnail)


def test_tiling_params_are_frozen_and_hashable():
    params = TilingParams()
    assert params == TilingParams(12, 1, S, True) and hash(params) == hash(TilingParams())
    with pytest.raises(AttributeError):
        params.max_num = 6


def test_argument_checks():
    with pytest.raises(ValueError):
        target_grid(0, 10)
    with pytest.raises(ValueError):
        target_grid(10, 10, min_num=3, max_num=2)


def test_token_counts():
    for w, h in SPECIAL_SIZES:
        assert num_image_tokens(w, h) == 256 * num_tiles(w, h)
    assert num_tiles(1, 1) == 1  # a single tile has no thumbnail
    assert num_tiles(1, 1000) == 13
    assert num_tiles(1, 1000, use_thumbnail=False) == 12
    assert num_image_tokens(1024, 1024) == 2560  # 3x3 + thumbnail (DESIGN W2)
    assert tiling.tokens_per_tile() == 256


# ----------------------------------------------------------------------------------------- pixels


# Hand-picked ties and extremes, then random sizes (kept small: the naive path is slow).
PIXEL_SIZES = [
    (1, 1), (1, 1000), (1000, 1), (1, 10000), (448, 448), (633, 633), (634, 634), (700, 200),
    (1400, 400), (17, 144), (2, 3), (1120, 640),
] + random_sizes(50, seed=7, max_side=900)  # fmt: skip


def test_pixel_exact_against_naive():
    assert len(PIXEL_SIZES) >= 50
    for k, (w, h) in enumerate(PIXEL_SIZES):
        img = noise_image(w, h, seed=k)
        tiles = dynamic_tiles(img)
        expected_tiles = naive_tiles(img)
        assert len(tiles) == len(expected_tiles) == num_tiles(w, h), (w, h)
        for got, exp in zip(tiles, expected_tiles, strict=True):
            assert got.size == (S, S)
            assert np.array_equal(np.asarray(got), np.asarray(exp)), (w, h)
        pv = pixel_values(img)
        assert pv.dtype == torch.float32 and pv.is_contiguous()
        assert pv.shape == (num_tiles(w, h), 3, S, S)
        assert torch.equal(pv, naive_pixel_values(img)), (w, h)


@pytest.mark.parametrize("max_num,thumb", [(6, True), (24, True), (12, False), (1, True)])
def test_pixel_exact_options(max_num, thumb):
    for k, (w, h) in enumerate([(1280, 720), (300, 1000), (5, 900), (640, 480)]):
        img = noise_image(w, h, seed=100 + k)
        pv = pixel_values(img, max_num=max_num, use_thumbnail=thumb)
        assert pv.shape[0] == num_tiles(w, h, max_num=max_num, use_thumbnail=thumb)
        assert torch.equal(pv, naive_pixel_values(img, 1, max_num, thumb))


@pytest.mark.parametrize("max_num,thumb", [(12, True), (6, False)])
def test_raw_tiles_normalised_later_are_bitwise_the_pixel_values(max_num, thumb):
    """The engine keeps uint8 tiles and normalises them when it encodes (on the GPU there): the
    result must be exactly the reference's float tiles, every uint8 value included."""
    for k, (w, h) in enumerate([(1024, 1024), (1280, 720), (300, 1000), (448, 448)]):
        img = noise_image(w, h, seed=200 + k)
        raw = tiling.raw_tiles(img, max_num=max_num, use_thumbnail=thumb)
        assert raw.dtype == torch.uint8 and raw.is_contiguous()
        assert raw.shape == (num_tiles(w, h, max_num=max_num, use_thumbnail=thumb), S, S, 3)
        assert torch.equal(tiling.normalize_raw(raw), naive_pixel_values(img, 1, max_num, thumb))
    every = torch.arange(256, dtype=torch.uint8).repeat(3).view(1, 16, 16, 3)
    assert torch.equal(tiling.normalize_raw(every), tiling.normalize_tiles(every.numpy()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_raw_tiles_normalised_on_the_gpu_are_bitwise_the_cpu_ones():
    every = torch.arange(256, dtype=torch.uint8).repeat(3 * 448 * 448 // 256).view(3, 448, 448, 1)
    tiles = every.expand(3, 448, 448, 3).contiguous()
    assert torch.equal(tiling.normalize_raw(tiles.cuda()).cpu(), tiling.normalize_raw(tiles))


def test_non_rgb_input_is_converted():
    rgba = noise_image(500, 300, seed=1).convert("RGBA")
    assert torch.equal(pixel_values(rgba), naive_pixel_values(rgba.convert("RGB")))
    gray = noise_image(300, 500, seed=2).convert("L")
    assert all(t.mode == "RGB" for t in dynamic_tiles(gray))


def test_against_transformers_processor():
    pil = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    common = dict(size={"height": S, "width": S}, crop_to_patches=True, min_patches=1)
    raw = pil.GotOcr2ImageProcessorPil(do_rescale=False, do_normalize=False, **common)
    norm = pil.GotOcr2ImageProcessorPil(image_mean=MEAN, image_std=STD, **common)
    for k, (w, h) in enumerate([(1024, 1024), (1920, 1080), (37, 900), (700, 200), (1, 1)]):
        img = noise_image(w, h, seed=200 + k)
        # Resized pixels are identical (both use PIL bicubic) ...
        hf_raw = np.stack(raw(img, max_patches=12, return_tensors="np")["pixel_values"])
        ours = tiling.tile_array(img)  # (T, S, S, 3) uint8
        assert np.array_equal(hf_raw, ours.transpose(0, 3, 1, 2).astype(hf_raw.dtype)), (w, h)
        # ... normalisation differs only in float rounding (it multiplies by 1/255).
        hf = torch.as_tensor(
            np.stack(norm(img, max_patches=12, return_tensors="np")["pixel_values"])
        )
        torch.testing.assert_close(pixel_values(img), hf.float(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- detail


def test_detail_levels():
    assert detail_to_max_num("low") == 6
    assert detail_to_max_num("medium") == 12
    assert detail_to_max_num("high") == 24
    assert detail_to_max_num("auto", default=9) == 9
    assert detail_to_max_num(None, default=7) == 7
    assert resolve_max_num(4, "high") == 4  # an explicit max_dynamic_patch wins
    assert resolve_max_num(None, "low") == 6
    assert resolve_max_num("4", None, default=12) == 12  # not an int: ignored, as in LMDeploy


def test_lazy_jpeg_tiled_from_many_threads_is_pixel_exact():
    """The thumbnail is resized on a helper thread: a JPEG still undecoded when tiling starts, tiled
    by several callers at once, must give exactly the tiles of the decoded image."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 520, 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    expected = naive_pixel_values(Image.open(io.BytesIO(data)).convert("RGB"))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: pixel_values(Image.open(io.BytesIO(data))), range(8)))
    for pv in results:
        assert pv.shape[0] > 1 and torch.equal(pv, expected)
