"""Categorical conditioning: separate tokens, independent dropout to the null token, guidance formula, names."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from brainsynth.conditioning.categorical import (
    CategoricalConditioning,
    ConditionalDenoiser,
    EncodeConditionsd,
    GuidedDenoiser,
    all_combinations,
    filter_combinations,
    guidance_combination,
)
from brainsynth.conventions import MODALITIES, PATHOLOGIES

VOCAB = {"pathology": list(PATHOLOGIES), "modality": list(MODALITIES)}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def test_each_condition_is_its_own_token_and_null_is_the_extra_row():
    cond = CategoricalConditioning(VOCAB, embedding_dim=8, dropout_prob=0.0).eval()
    idx = torch.stack([cond.encode(pathology="sclerosis", modality="t1ce"), cond.encode(modality="pd")])
    assert idx.tolist() == [[2, 1], [-1, 4]]
    tokens = cond(idx)
    assert tokens.shape == (2, 2, 8)
    assert torch.equal(tokens[0, 0], cond.embeddings["pathology"].weight[2])
    assert torch.equal(tokens[0, 1], cond.embeddings["modality"].weight[1])
    # an unspecified pathology is the pathology null token (last row of its own table)
    assert torch.equal(tokens[1, 0], cond.embeddings["pathology"].weight[len(PATHOLOGIES)])
    assert cond.decode(idx[1]) == {"pathology": None, "modality": "pd"}


def test_dropout_happens_at_the_configured_rate_per_condition_and_uses_the_null_token():
    cond = CategoricalConditioning(VOCAB, embedding_dim=4, dropout_prob={"pathology": 0.3, "modality": 0.1})
    n = 20000
    idx = torch.stack([cond.encode(pathology="dementia", modality="flair")] * n)
    dropped = cond.drop(idx, generator=torch.Generator().manual_seed(1))
    rate_p = float((dropped[:, 0] < 0).float().mean())
    rate_m = float((dropped[:, 1] < 0).float().mean())
    # binomial standard error at n = 20000 is <= 0.0033: 4 sigma bounds
    assert abs(rate_p - 0.3) < 0.014 and abs(rate_m - 0.1) < 0.01
    # independent: the joint drop rate is the product of the two
    both = float(((dropped[:, 0] < 0) & (dropped[:, 1] < 0)).float().mean())
    assert abs(both - 0.03) < 0.006
    # kept values are untouched
    assert set(dropped[:, 0].tolist()) == {-1, 3} and set(dropped[:, 1].tolist()) == {-1, 3}
    # in training mode forward() drops, and dropped rows get exactly the null embedding
    cond.train()
    torch.manual_seed(3)
    tokens = cond(idx[:2000])
    null_p = cond.embeddings["pathology"].weight[len(PATHOLOGIES)]
    is_null = (tokens[:, 0] == null_p).all(dim=1)
    is_value = (tokens[:, 0] == cond.embeddings["pathology"].weight[3]).all(dim=1)
    assert bool((is_null | is_value).all()) and 0.24 < float(is_null.float().mean()) < 0.36
    # evaluation mode never drops
    cond.eval()
    assert bool((cond(idx[:100])[:, 0] == cond.embeddings["pathology"].weight[3]).all())


def test_unknown_names_are_clear_errors_listing_valid_values():
    cond = CategoricalConditioning(VOCAB, embedding_dim=4)
    with pytest.raises(
        ValueError, match="unknown pathology 'stroke'; valid: healthy, glioblastoma, sclerosis, dementia"
    ):
        cond.encode(pathology="stroke", modality="t1w")
    with pytest.raises(ValueError, match="unknown modality 'dwi'; valid: t1w, t1ce, t2w, flair, pd"):
        cond.encode(pathology="healthy", modality="dwi")
    with pytest.raises(ValueError, match="unknown condition"):
        cond.encode(scanner="siemens")
    # synonyms of the canonical names resolve (t1gd -> t1ce, MS -> sclerosis)
    assert cond.encode(pathology="MS", modality="T1gd").tolist() == [2, 1]


def test_vocabularies_are_config_and_travel_with_the_weights():
    cond = CategoricalConditioning({"pathology": ["healthy", "stroke"], "modality": ["t1w", "dwi"]}, 4)
    assert cond.encode(pathology="stroke", modality="dwi").tolist() == [1, 1]
    other = CategoricalConditioning({"pathology": ["stroke", "healthy"], "modality": ["t1w", "dwi"]}, 4)
    with pytest.raises(ValueError, match="trained with other condition vocabularies"):
        other.load_state_dict(cond.state_dict())


def test_check_rows_names_each_bad_file():
    cond = CategoricalConditioning(VOCAB, 4)
    rows = [
        {"image": "a.nii.gz", "pathology": "healthy", "modality": "t1w"},
        {"image": "b.nii.gz", "pathology": "stroke", "modality": "t1w"},
        {"image": "c.nii.gz", "pathology": "healthy"},
    ]
    with pytest.raises(ValueError) as e:
        cond.check_rows(rows)
    msg = str(e.value)
    assert "b.nii.gz: unknown pathology 'stroke'" in msg and "c.nii.gz: missing modality" in msg
    assert "a.nii.gz" not in msg
    with pytest.raises(ValueError, match="b.nii.gz"):
        EncodeConditionsd(cond)(rows[1])
    assert EncodeConditionsd(cond)(rows[0])["condition"].tolist() == [0, 0]


def test_held_out_combinations_are_removed_and_the_grid_is_complete():
    cond = CategoricalConditioning(VOCAB, 4)
    rows = [{"pathology": p, "modality": m} for p in PATHOLOGIES for m in MODALITIES]
    kept = filter_combinations(rows, [["sclerosis", "t1ce"], ["dementia", "FLAIR"]], cond)
    assert len(kept) == len(rows) - 2
    assert {"pathology": "sclerosis", "modality": "t1ce"} not in kept
    assert {"pathology": "dementia", "modality": "flair"} not in kept
    with pytest.raises(ValueError, match="unknown modality"):
        filter_combinations(rows, [["sclerosis", "dwi"]], cond)
    assert len(all_combinations(cond)) == 20


class _Recorder(torch.nn.Module):
    """A fake denoiser whose output depends on the condition tokens in a known way."""

    def __init__(self, cond):
        super().__init__()
        self.conditioning = cond

    def forward(self, x, timesteps, context):
        tokens = self.conditioning(context)  # (B, 2, d)
        return x * 0.5 + tokens.sum(dim=(1, 2)).reshape(-1, *([1] * (x.ndim - 1)))


def test_guidance_combination_matches_its_formula_in_both_modes():
    cond = CategoricalConditioning(VOCAB, embedding_dim=3).eval()
    model = _Recorder(cond)
    x = torch.randn(2, 1, 4, 4, 4)
    t = torch.tensor([10.0])
    c = torch.stack(
        [cond.encode(pathology="sclerosis", modality="t1ce"), cond.encode(pathology="healthy", modality="pd")]
    )
    null = torch.full_like(c, -1)
    only_p, only_m = null.clone(), null.clone()
    only_p[:, 0], only_m[:, 1] = c[:, 0], c[:, 1]
    e0, ep, em, ec = (model(x, t, k) for k in (null, only_p, only_m, c))
    with torch.no_grad():
        per = GuidedDenoiser(model, {"pathology": 2.0, "modality": 4.5}, mode="per_condition")(x, t, c)
        joint = GuidedDenoiser(model, 3.0, mode="joint")(x, t, c)
    assert torch.allclose(per, e0 + 2.0 * (ep - e0) + 4.5 * (em - e0), atol=1e-6)
    assert torch.allclose(joint, e0 + 3.0 * (ec - e0), atol=1e-6)
    # scale 1 in joint mode is plain conditional sampling; a null request is unconditional
    assert torch.allclose(GuidedDenoiser(model, 1.0, mode="joint")(x, t, c), ec)
    assert torch.allclose(GuidedDenoiser(model, 5.0)(x, t, null), e0)
    assert torch.allclose(guidance_combination(e0, [ep], [0.0]), e0)
    with pytest.raises(ValueError, match="valid: joint, per_condition"):
        GuidedDenoiser(model, 2.0, mode="both")
    with pytest.raises(ValueError, match="unknown condition"):
        GuidedDenoiser(model, {"scanner": 2.0})


def test_conditional_unet_trains_and_samples_through_monai_inferer():
    cond = CategoricalConditioning(VOCAB, embedding_dim=8, dropout_prob=0.2)
    unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=2,
        channels=(8, 8),
        num_res_blocks=1,
        attention_levels=(False, True),
        norm_num_groups=4,
        num_head_channels=8,
        with_conditioning=True,
        cross_attention_dim=8,
    )
    model = ConditionalDenoiser(unet, cond)
    scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)  # unclipped: no saturated voxels
    inferer = DiffusionInferer(scheduler)
    latents = torch.randn(2, 2, 8, 8, 8)
    idx = torch.stack([cond.encode(pathology="glioblastoma", modality="t2w")] * 2)
    noise = torch.randn_like(latents)
    pred = inferer(latents, model, noise=noise, timesteps=torch.tensor([5, 50]), condition=idx)
    torch.nn.functional.mse_loss(pred, noise).backward()
    assert cond.embeddings["pathology"].weight.grad is not None
    model.eval()
    with torch.no_grad():  # MONAI zero-initialises output and attention projections: give those a value
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    scheduler.set_timesteps(3)
    start = torch.randn(2, 2, 8, 8, 8)
    ours = inferer.sample(
        start, GuidedDenoiser(model, 2.0, mode="joint"), scheduler=scheduler, conditioning=idx, verbose=False
    )
    assert torch.isfinite(ours).all()
    # MONAI's own classifier-free guidance fills the condition with -1, the null token here: joint guidance at the
    # same scale is the same computation, so the same volume from the same noise
    monai_cfg = inferer.sample(
        start, model, scheduler=scheduler, conditioning=idx, cfg=2.0, cfg_fill_value=-1, verbose=False
    )
    torch.testing.assert_close(ours, monai_cfg, rtol=1e-4, atol=1e-5)
    per_condition = inferer.sample(
        start, GuidedDenoiser(model, 2.0, mode="per_condition"), scheduler=scheduler, conditioning=idx, verbose=False
    )
    gap = (per_condition - ours).abs().max()
    assert gap > 1e-3, f"per-condition guidance is a different combination, yet differs by only {gap}"


def test_concatenated_condition_maps_follow_the_indices_and_dropout():
    cond = CategoricalConditioning(VOCAB, embedding_dim=4, dropout_prob=0.0, joint_dropout_prob=1.0)
    idx = torch.stack([cond.encode(pathology="sclerosis", modality="flair"), cond.encode(modality="t1w")])
    hot = cond.one_hot(idx)
    n_path = len(VOCAB["pathology"])
    expected = torch.zeros(2, cond.num_channels)
    expected[0, VOCAB["pathology"].index("sclerosis")] = 1
    expected[0, n_path + VOCAB["modality"].index("flair")] = 1
    expected[1, n_path + VOCAB["modality"].index("t1w")] = 1  # null pathology: all zeros
    assert torch.equal(hot, expected)

    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, timesteps, context):
            seen["x"], seen["context"] = x, context
            return x[:, :2]

    model = ConditionalDenoiser(Spy(), cond, concat_conditions=True)
    x = torch.randn(2, 2, 3, 3, 3)
    model.eval()
    model(x, torch.tensor([1, 1]), idx)
    assert seen["x"].shape == (2, 2 + cond.num_channels, 3, 3, 3)
    assert torch.equal(seen["x"][:, :2], x)
    assert torch.equal(seen["x"][:, 2:], expected[:, :, None, None, None].expand(-1, -1, 3, 3, 3))
    torch.testing.assert_close(seen["context"], cond.tokens(idx))
    model.train()  # joint dropout 1.0: both the maps and the tokens are null together
    model(x, torch.tensor([1, 1]), idx)
    assert not seen["x"][:, 2:].any()
    torch.testing.assert_close(seen["context"], cond.tokens(cond.null_indices(2)))


def test_joint_dropout_trains_the_unconditional_branch_at_the_configured_rate():
    """Joint drop first (probability j), then each condition independently (p, q): all-null j + (1-j) p q, only
    pathology dropped (1-j) p (1-q), only modality (1-j) (1-p) q, none (1-j)(1-p)(1-q)."""
    j, p, q = 0.1, 0.15, 0.25
    cond = CategoricalConditioning(
        VOCAB, embedding_dim=4, dropout_prob={"pathology": p, "modality": q}, joint_dropout_prob=j
    )
    n = 40000
    idx = torch.stack([cond.encode(pathology="glioblastoma", modality="t2w")] * n)
    dropped = cond.drop(idx, generator=torch.Generator().manual_seed(3))
    null_p, null_m = dropped[:, 0] < 0, dropped[:, 1] < 0
    measured = {
        "all": (null_p & null_m),
        "pathology only": (null_p & ~null_m),
        "modality only": (~null_p & null_m),
        "none": (~null_p & ~null_m),
    }
    expected = {
        "all": j + (1 - j) * p * q,
        "pathology only": (1 - j) * p * (1 - q),
        "modality only": (1 - j) * (1 - p) * q,
        "none": (1 - j) * (1 - p) * (1 - q),
    }
    for key, mask in measured.items():
        se = (expected[key] * (1 - expected[key]) / n) ** 0.5
        assert abs(float(mask.float().mean()) - expected[key]) < 4 * se, (key, float(mask.float().mean()))
    assert torch.equal(dropped[~null_p, 0], idx[~null_p, 0]) and torch.equal(dropped[~null_m, 1], idx[~null_m, 1])
    with pytest.raises(ValueError, match="joint_dropout_prob"):
        CategoricalConditioning(VOCAB, embedding_dim=4, joint_dropout_prob=1.5)
