"""The sharded store, the Dataset over it and the uniform-magnification sampler."""
import numpy as np
import pytest
import torch
from scipy import stats

from zoomldm.data import store as st
from zoomldm.data.dataset import RegionDataset, UniformMagnificationSampler
from zoomldm.data.regions import standardize_tokens

from conftest import fake_part

P, C = 16, 6


@pytest.fixture
def built(tmp_path):
    parts = tmp_path / "parts"
    a = fake_part(parts, "slideA", {"20x": 7, "5x": 2}, 0)
    b = fake_part(parts, "slideB", {"20x": 4, "10x": 3, "5x": 1}, 1)
    counts = st.build_store(list(parts.iterdir()), tmp_path / "store", "brca", P, shard_size=3,
                            encoder={"name": "fake", "dim": C, "is_standin": True})
    return tmp_path / "store", {"slideA": a, "slideB": b}, counts


def test_build_store_packs_parts_in_order_across_shards(built):
    root, parts, counts = built
    assert counts == {"20x": 11, "10x": 3, "5x": 3}
    store = st.RegionStore(root)
    t = store.table("20x")
    assert sorted(p.name for p in (root / "20x").glob("images-*.npy")) == [f"images-{i:05d}.npy" for i in range(4)]
    want = np.concatenate([parts["slideA"]["20x"]["images"], parts["slideB"]["20x"]["images"]])
    got = np.stack([t.get("images", i) for i in range(len(t))])
    np.testing.assert_array_equal(got, want)
    m = t.manifest
    assert list(m.slide) == ["slideA"] * 7 + ["slideB"] * 4
    assert list(m.shard) == [i // 3 for i in range(11)] and list(m.row) == [i % 3 for i in range(11)]
    assert not any(root.parent.glob("*.tmp"))


def test_dataset_items_are_standardised_padded_grids(built):
    root, parts, _ = built
    ds = RegionDataset(root, images=True)
    assert len(ds) == 17 and ds.sizes == [11, 3, 3]
    item = ds[11 + 1]                      # second 10x sample (slideB)
    raw = parts["slideB"]["10x"]["grids"][1].astype(np.float32)
    assert item["mag"] == 1 and item["grid_side"] == 2
    np.testing.assert_allclose(item["grid"][:, :2, :2].numpy(), standardize_tokens(raw), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(item["grid"][:, 2:, :]) == 0
    img = parts["slideB"]["10x"]["images"][1]
    np.testing.assert_allclose(item["image"].numpy(), img.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    batch = next(iter(ds.loader(batch_size=17)))
    assert batch["grid"].shape == (17, C, 8, 8)
    for i in (0, 5, 12, 16):                                   # a batched read equals item-by-item reads
        for k in ("grid", "image", "mag", "grid_side"):
            torch.testing.assert_close(batch[k][i], ds[i][k], rtol=0, atol=0)
    with pytest.raises(TypeError, match="collate_fn=RegionDataset.collate"):
        next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))


def test_missing_latents_and_magnification_are_clear_errors(built):
    root, _, _ = built
    with pytest.raises(st.StoreError, match="no VQ latents for 20x"):
        RegionDataset(root, latents=True)
    with pytest.raises(st.StoreError, match="0.625x has no samples"):
        RegionDataset(root, magnifications=["0.625x"])
    with pytest.raises(st.StoreError, match="not a region store"):
        st.RegionStore(root.parent / "nowhere")


def test_add_array_resumes_by_shard(built):
    root, _, _ = built
    store = st.RegionStore(root)
    calls = []

    def fake_latents(images):                                  # (n, P, P, 3) -> (n, 3, P/4, P/4)
        calls.append(len(images))
        x = images.astype(np.float32).mean(-1)[:, None, ::4, ::4]
        return np.repeat(x, 3, axis=1).astype(np.float16)

    store.add_array("latents", fake_latents, batch=2)
    n_first = len(calls)
    (root / "20x" / "latents-00002.npy").unlink()              # as if interrupted before shard 2
    store = st.RegionStore(root)
    store.add_array("latents", fake_latents, batch=2)
    assert len(calls) - n_first == 2                           # only shard 2 (3 rows, batch 2) recomputed
    ds = RegionDataset(root, latents=True)
    assert ds[0]["latent"].shape == (3, P // 4, P // 4)


def test_sampler_is_uniform_over_magnifications_and_seeded():
    sizes = [1000, 50, 7, 2]
    s = UniformMagnificationSampler(sizes, num_samples=8000, seed=3)
    idx = np.array(list(s))
    mag = np.searchsorted(np.cumsum(sizes), idx, side="right")
    counts = np.bincount(mag, minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-3               # uniform over magnifications
    within = idx[mag == 1] - 1000
    assert stats.chisquare(np.bincount(within, minlength=50)).pvalue > 1e-3  # uniform within a level
    assert list(UniformMagnificationSampler(sizes, 8000, seed=3)) == idx.tolist()
    assert list(UniformMagnificationSampler(sizes, 8000, seed=4)) != idx.tolist()
    s.set_epoch(1)
    assert list(s) != idx.tolist()


def test_sampler_ranks_split_the_same_global_stream():
    sizes = [10, 20, 30]
    full = list(UniformMagnificationSampler(sizes, 12, seed=0, world_size=1))
    r0 = list(UniformMagnificationSampler(sizes, 6, seed=0, rank=0, world_size=2))
    r1 = list(UniformMagnificationSampler(sizes, 6, seed=0, rank=1, world_size=2))
    assert sorted(r0 + r1) == sorted(full) and r0 == full[0::2]
