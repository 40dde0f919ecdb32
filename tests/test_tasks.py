"""Trainer tasks: the losses they optimise, against hand-written references on a tiny synthetic store."""
import pytest
import torch

from conftest import fake_part
from zoomldm.config import AutoencoderTrainConfig, CDMTrainConfig, LDMTrainConfig
from zoomldm.data import store as st
from zoomldm.diffusion import Schedule
from zoomldm.training.tasks import AutoencoderTask, CDMTask, LDMTask

P, C = 32, 6


@pytest.fixture
def store(tmp_path):
    fake_part(tmp_path / "parts", "a", {"20x": 5, "10x": 4, "5x": 3}, 0, P=P, C=C, latents=True)
    st.build_store(list((tmp_path / "parts").iterdir()), tmp_path / "store", "brca", P, 4,
                   {"name": "fake", "dim": C, "is_standin": True})
    return st.RegionStore(tmp_path / "store")


def _unzero(module):
    """Re-draw zero-initialised layers (output conv, attention proj_out) so every input reaches the loss."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(std=0.05)


def _batch(task, idx=(0, 6, 10)):
    return task.dataset.__getitems__(list(idx))


def test_ldm_loss_is_eps_mse_with_the_generators_draws(store):
    torch.manual_seed(0)
    task = LDMTask(store, LDMTrainConfig(p_uncond=0.0))
    assert task.modules["unet"].config.context_dim == task.modules["summarizer"].config.hidden_dim
    assert task.modules["summarizer"].config.input_dim == C and task.modules["summarizer"].config.mag_levels == 8
    _unzero(task.modules["unet"])
    batch = _batch(task)
    loss = task.loss(batch, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)                  # the same draws, in the documented order
    x0 = batch["latent"]
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    torch.rand(3, generator=g)
    ab = Schedule.scaled_linear().alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    ctx = task.modules["summarizer"](batch["grid"], batch["mag"], grid_size=batch["grid_side"])
    want = ((task.modules["unet"](x_t, t, ctx) - noise) ** 2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert task.modules["summarizer"].dim_reduce.weight.grad.abs().sum() > 0


def test_ldm_null_dropout_zeroes_the_whole_context(store):
    task = LDMTask(store, LDMTrainConfig(p_uncond=1.0))
    _unzero(task.modules["unet"])
    task.loss(_batch(task), torch.Generator().manual_seed(0)).backward()
    grads = [p.grad for p in task.modules["summarizer"].parameters() if p.grad is not None]
    assert all(g.abs().sum() == 0 for g in grads)


def test_single_scale_task_sees_one_magnification(store):
    task = LDMTask(store, LDMTrainConfig(), magnifications=["10x"])
    assert task.dataset.sizes == [4]
    assert set(_batch(task, (0, 1, 3))["mag"].tolist()) == {1}
    with pytest.raises(st.StoreError, match="0.625x has no samples"):
        LDMTask(store, LDMTrainConfig(), magnifications=["0.625x"])


def test_store_without_latents_is_a_clear_error(tmp_path):
    fake_part(tmp_path / "parts", "a", {"20x": 3}, 0, P=P, C=C)
    st.build_store(list((tmp_path / "parts").iterdir()), tmp_path / "store", "brca", P, 4, {"dim": C})
    with pytest.raises(st.StoreError, match="no VQ latents for 20x.*encode-latents"):
        LDMTask(tmp_path / "store", LDMTrainConfig())


def test_autoencoder_loss_terms(store):
    torch.manual_seed(0)
    task = AutoencoderTask(store, AutoencoderTrainConfig())
    vq = task.modules["vq"]
    batch = _batch(task)
    loss = task.loss(batch, torch.Generator())
    z = vq.encode(batch["image"])
    zq = vq.quantize.lookup(vq.quantize.codes(z))
    rec = vq.decode(z, quantize=True)
    want = (rec - batch["image"]).abs().mean() + 1.25 * ((zq - z) ** 2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0 and vq.encoder.conv_in.weight.grad is not None


def test_cdm_task_trains_only_the_dit_on_frozen_summarizer_outputs(store):
    torch.manual_seed(0)
    summ = LDMTask(store, LDMTrainConfig()).modules["summarizer"]
    task = CDMTask(store, CDMTrainConfig(), summ).to("cpu")
    assert task.modules["cdm"].config.in_channels == summ.config.hidden_dim
    loss = task.loss(_batch(task), torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is None for p in summ.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.modules["cdm"].parameters())


def test_graikos_task_conditions_on_the_normalised_raw_embedding(store):
    from baselines.graikos import GraikosTask
    from zoomldm.config import GraikosTrainConfig
    task = GraikosTask(store, GraikosTrainConfig(p_uncond=0.0))
    assert task.dataset.sizes == [5]                               # base magnification only
    batch = _batch(task, (0, 1, 2))
    raw = torch.stack([torch.from_numpy(store.table("20x").get("grids", i).astype("float32"))[:, 0, 0]
                       for i in range(3)])
    torch.testing.assert_close(batch["grid"][:, :, 0, 0], raw)     # not standardised
    emb = task.modules["embedder"]
    torch.testing.assert_close(emb(raw * 7.0), emb(raw), rtol=1e-5, atol=1e-6)   # scale-free (L2 norm)
    _unzero(task.modules["unet"])
    loss = task.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert emb.proj.weight.grad.abs().sum() > 0


def test_autoencoder_crops_are_per_sample_and_the_tiny_preset_keeps_f4(store):
    """train.autoencoder.crop_px: each sample gets its own random crop (drawn from its own generator), and the
    loss equals the full-patch formula applied to those crops; the `tiny` preset is still a 4x autoencoder."""
    from zoomldm.training.loop import SampleRNG
    torch.manual_seed(0)
    task = AutoencoderTask(store, AutoencoderTrainConfig(preset="tiny", crop_px=8))
    vq = task.modules["vq"]
    assert vq.encode(torch.zeros(1, 3, 16, 16)).shape[-1] == 4
    batch = _batch(task)
    x = batch["image"]
    loss = task.loss(batch, SampleRNG([7, 8, 9][: len(x)]))
    span = x.shape[-1] - 8 + 1
    rng = SampleRNG([7, 8, 9][: len(x)])
    top, left = rng.randint(0, span).tolist(), rng.randint(0, span).tolist()
    crops = torch.stack([im[:, t:t + 8, l:l + 8] for im, t, l in zip(x, top, left)])
    z = vq.encode(crops)
    zq = vq.quantize.lookup(vq.quantize.codes(z))
    want = (vq.decode(z, quantize=True) - crops).abs().mean() + 1.25 * ((zq - z) ** 2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
