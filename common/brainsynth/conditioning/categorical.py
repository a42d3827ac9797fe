"""Categorical conditions (pathology, modality, ...) as separate cross-attention tokens, with per-condition
classifier-free guidance.

- ``CategoricalConditioning``: one learned embedding table per condition; each condition becomes its own
  token of the cross-attention context (B, n_conditions, embedding_dim). Every table has one extra row, the
  condition's **null token**. During training each condition is replaced by its null token independently
  with its own probability, so the network learns p(x), p(x | pathology), p(x | modality) and
  p(x | pathology, modality) at once. The vocabularies come from config, never from code.
- Index convention: a condition index < 0 means "null" (so MONAI's own ``cfg_fill_value=-1`` gives the
  unconditional branch, and a request may leave a condition unspecified).
- ``ConditionalDenoiser``: the MONAI ``DiffusionModelUNet`` plus the conditioning; ``forward(x, timesteps,
  context=indices)`` so MONAI's ``DiffusionInferer`` / ``DiffusionPrepareBatch`` drive it unchanged.
- ``GuidedDenoiser``: classifier-free guidance at sampling time, wrapped around a ``ConditionalDenoiser``:
  ``joint``:          eps = eps(0) + g * (eps(c_1, ..., c_n) - eps(0))
  ``per_condition``:  eps = eps(0) + sum_i g_i * (eps(c_i) - eps(0))      (eps(c_i): only condition i given)
  where eps(0) has every condition null. ``per_condition`` composes what was learned for each condition
  alone, which is what lets a combination absent from training (sclerosis on T1ce) be generated.
- ``EncodeConditionsd``: MONAI MapTransform turning a row's names into the index tensor.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from monai.transforms import Transform
from torch import nn

from brainsynth.conventions import canonical_modality, canonical_pathology

#: known synonym resolvers per condition name (only applied when the resolved name is in the vocabulary)
_SYNONYMS: dict[str, Callable[[str], str]] = {"pathology": canonical_pathology, "modality": canonical_modality}

GUIDANCE_MODES = ("joint", "per_condition")


class CategoricalConditioning(nn.Module):
    """Learned embeddings of categorical conditions, one cross-attention token per condition.

    Args:
        vocabularies: ordered mapping condition name -> list of values, e.g.
            ``{"pathology": ["healthy", "glioblastoma", ...], "modality": ["t1w", ...]}``.
        embedding_dim: token size (the U-Net's ``cross_attention_dim``).
        dropout_prob: probability that a condition is replaced by its null token during training; one number
            for all conditions or a mapping per condition.
        joint_dropout_prob: probability that all conditions are replaced together, before the independent drops.
            Guidance subtracts the all-null prediction, so that branch needs training: with independent drops
            alone it is seen only at the product of the rates (2.25 % at 0.15 each); 0.1 joint + 0.15 each gives
            12.0 % all-null and 11.5 % for each single-condition branch.
    """

    def __init__(
        self,
        vocabularies: Mapping[str, Sequence[str]],
        embedding_dim: int,
        dropout_prob: float | Mapping[str, float] = 0.15,
        joint_dropout_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if not vocabularies:
            raise ValueError("at least one categorical condition is needed")
        self.vocabularies: dict[str, tuple[str, ...]] = {}
        for name, values in vocabularies.items():
            values = tuple(str(v).strip().lower() for v in values)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"vocabulary of {name!r} must be non-empty and without duplicates, got {values}")
            self.vocabularies[str(name)] = values
        self.names = tuple(self.vocabularies)
        self.embedding_dim = int(embedding_dim)
        probs = dropout_prob if isinstance(dropout_prob, Mapping) else {n: dropout_prob for n in self.names}
        unknown = set(probs) - set(self.names)
        if unknown or set(self.names) - set(probs):
            raise ValueError(
                f"dropout_prob must give one probability per condition {list(self.names)}, got {dict(probs)}"
            )
        self.dropout_prob = {n: float(probs[n]) for n in self.names}
        for n, p in self.dropout_prob.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"dropout_prob of {n!r} must be in [0, 1], got {p}")
        if not 0.0 <= float(joint_dropout_prob) <= 1.0:
            raise ValueError(f"joint_dropout_prob must be in [0, 1], got {joint_dropout_prob}")
        self.joint_dropout_prob = float(joint_dropout_prob)
        # row len(vocabulary) of each table is that condition's null token
        self.embeddings = nn.ModuleDict(
            {n: nn.Embedding(len(v) + 1, self.embedding_dim) for n, v in self.vocabularies.items()}
        )
        self.register_buffer("vocabulary_fingerprint", self._fingerprint(self.vocabularies))

    # --- names <-> indices ---------------------------------------------------------------------------------
    def index(self, condition: str, value: str | None) -> int:
        """Index of ``value`` in the vocabulary of ``condition``; ``None`` / "" / "any" / "null" -> -1 (null).
        Unknown values are an error listing the valid ones."""
        if condition not in self.vocabularies:
            raise ValueError(f"unknown condition {condition!r}; valid: {', '.join(self.names)}")
        vocab = self.vocabularies[condition]
        if value is None or str(value).strip().lower() in ("", "any", "null", "none"):
            return -1
        key = str(value).strip().lower()
        if key in vocab:
            return vocab.index(key)
        resolve = _SYNONYMS.get(condition)
        if resolve is not None:
            try:
                canonical = resolve(key)
            except ValueError:
                canonical = None
            if canonical in vocab:
                return vocab.index(canonical)
        raise ValueError(f"unknown {condition} {value!r}; valid: {', '.join(vocab)}")

    def encode(self, values: Mapping[str, str | None] | None = None, **kwargs: str | None) -> torch.Tensor:
        """Names -> index tensor (n_conditions,); a condition left out is null (unconditional for it)."""
        values = dict(values or {}, **kwargs)
        extra = set(values) - set(self.names)
        if extra:
            raise ValueError(f"unknown condition(s) {sorted(extra)}; valid: {', '.join(self.names)}")
        return torch.tensor([self.index(n, values.get(n)) for n in self.names], dtype=torch.long)

    def decode(self, indices: torch.Tensor) -> dict[str, str | None]:
        """Index tensor (n_conditions,) -> names (None for null)."""
        return {
            n: (self.vocabularies[n][int(i)] if int(i) >= 0 else None)
            for n, i in zip(self.names, indices.reshape(-1).tolist())
        }

    def check_rows(self, rows: Sequence[Mapping[str, Any]], what: str = "datalist") -> None:
        """Every row must name a known value for every condition; one error line per bad row, naming its file."""
        problems = []
        for row in rows:
            for n in self.names:
                try:
                    if self.index(n, row.get(n)) < 0:
                        raise ValueError(f"missing {n}; valid: {', '.join(self.vocabularies[n])}")
                except ValueError as e:
                    problems.append(f"{row.get('image', row.get('subject', '?'))}: {e}")
        if problems:
            raise ValueError(f"{what}: {len(problems)} row(s) with bad conditions:\n" + "\n".join(problems))

    # --- tokens ------------------------------------------------------------------------------------------------
    def null_indices(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.full((batch_size, len(self.names)), -1, dtype=torch.long, device=device)

    def drop(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace all conditions by null (-1) together with ``joint_dropout_prob``, then each condition
        independently with its own probability."""
        # torch.where, not boolean indexing: no host synchronisation per training step on a GPU
        if self.joint_dropout_prob > 0:
            u = torch.rand(indices.shape[0], generator=generator, device="cpu").to(indices.device)
            indices = torch.where((u < self.joint_dropout_prob)[:, None], -1, indices)
        columns = list(indices.unbind(1))
        for j, n in enumerate(self.names):
            p = self.dropout_prob[n]
            if p > 0:
                u = torch.rand(indices.shape[0], generator=generator, device="cpu").to(indices.device)
                columns[j] = torch.where(u < p, -1, columns[j])
        return torch.stack(columns, dim=1)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, n_conditions) indices (< 0 = null) -> (B, n_conditions, embedding_dim) tokens.

        In training mode conditions are first dropped to null at their configured rates.
        """
        self._check(indices)
        indices = indices.long()
        if self.training:
            indices = self.drop(indices)
        return self.tokens(indices)

    def _check(self, indices: torch.Tensor) -> None:
        if indices.ndim != 2 or indices.shape[1] != len(self.names):
            raise ValueError(
                f"condition indices must have shape (B, {len(self.names)}) for {list(self.names)}, "
                f"got {tuple(indices.shape)}"
            )
        # on a CPU the check names the bad index; elsewhere it is asynchronous (reading the indices back to the host
        # in every forward would stall the GPU and break a compiled graph)
        precise = indices.device.type == "cpu" and not torch.compiler.is_compiling()
        for j, n in enumerate(self.names):
            too_large = indices[:, j] >= len(self.vocabularies[n])
            if not precise:
                torch._assert_async(~too_large.any(), f"{n} index out of range for vocabulary {self.vocabularies[n]}")
            elif too_large.any():
                raise ValueError(
                    f"{n} index {int(indices[:, j].max())} out of range for vocabulary {self.vocabularies[n]}"
                )

    def tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, n_conditions) indices -> (B, n_conditions, embedding_dim) tokens, without dropout."""
        self._check(indices)
        indices = indices.long()
        tokens = []
        for j, n in enumerate(self.names):
            size = len(self.vocabularies[n])
            col = indices[:, j]
            tokens.append(self.embeddings[n](torch.where(col < 0, torch.full_like(col, size), col)))
        return torch.stack(tokens, dim=1)

    @property
    def num_channels(self) -> int:
        """Length of ``one_hot``: the sum of the vocabulary sizes."""
        return sum(len(v) for v in self.vocabularies.values())

    def one_hot(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, n_conditions) indices -> (B, num_channels) float: each condition's one-hot, all zeros when null."""
        self._check(indices)
        parts = []
        for j, n in enumerate(self.names):
            size = len(self.vocabularies[n])
            col = indices[:, j].long()
            hot = torch.nn.functional.one_hot(col.clamp(min=0), size).float()
            parts.append(hot * (col >= 0).float()[:, None])
        return torch.cat(parts, dim=1)

    # the vocabularies travel with the weights (as a fingerprint buffer: state dicts stay all-tensor for EMA and
    # weights-only loading): loading into a model configured with other vocabularies is an error
    @staticmethod
    def _fingerprint(vocabularies: Mapping[str, Sequence[str]]) -> torch.Tensor:
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps([[n, list(v)] for n, v in vocabularies.items()]).encode()).digest()
        return torch.tensor(int.from_bytes(digest[:8], "little", signed=True), dtype=torch.long)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        saved = state_dict.get(prefix + "vocabulary_fingerprint")
        if saved is not None and int(saved) != int(self.vocabulary_fingerprint):
            raise ValueError(
                f"checkpoint was trained with other condition vocabularies than this model's "
                f"{self.vocabularies}; use the training vocabularies, in the same order"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class ConditionalDenoiser(nn.Module):
    """A MONAI ``DiffusionModelUNet`` (``with_conditioning=True``) fed by ``CategoricalConditioning`` tokens.

    ``forward(x, timesteps, context)`` where ``context`` is the (B, n_conditions) index tensor; this is the
    signature MONAI's ``DiffusionInferer`` calls, so training and sampling use MONAI's code unchanged.

    ``concat_conditions``: also tile each condition's one-hot (zeros when null) over the latent and concatenate it
    to the U-Net input (the U-Net then has ``conditioning.num_channels`` more input channels), as the MONAI model
    zoo's brain LDM does with its conditions. Cross-attention alone reaches only the attention levels; the
    concatenated channels reach the first convolution, which is what lets a small model use the conditions.
    Training-time condition dropout drops both forms together.
    """

    def __init__(self, unet: nn.Module, conditioning: CategoricalConditioning, concat_conditions: bool = False):
        super().__init__()
        self.unet = unet
        self.conditioning = conditioning
        self.concat_conditions = bool(concat_conditions)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            context = self.conditioning.null_indices(x.shape[0], x.device)
        if context.shape[0] == 1 and x.shape[0] > 1:
            context = context.expand(x.shape[0], -1)
        indices = context.long()
        if self.conditioning.training:
            indices = self.conditioning.drop(indices)
        if self.concat_conditions:
            maps = self.conditioning.one_hot(indices).to(x.dtype)
            x = torch.cat([x, maps[(...,) + (None,) * (x.ndim - 2)].expand(-1, -1, *x.shape[2:])], dim=1)
        return self.unet(x, timesteps=timesteps, context=self.conditioning.tokens(indices))


def guidance_combination(
    unconditional: torch.Tensor, conditionals: Sequence[torch.Tensor], scales: Sequence[float]
) -> torch.Tensor:
    """eps(0) + sum_i g_i (eps_i - eps(0)): the classifier-free guidance combination (one term for ``joint``), in
    float32: the branches' differences are small, and bf16 predictions (autocast) would lose them."""
    unconditional = unconditional.float()
    out = unconditional.clone()
    for eps, g in zip(conditionals, scales, strict=True):
        out = out + float(g) * (eps.float() - unconditional)
    return out


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance around a ``ConditionalDenoiser``, for MONAI's ``DiffusionInferer.sample``.

    Args:
        denoiser: the trained ``ConditionalDenoiser``.
        guidance_scale: one number, or (``per_condition`` mode) a mapping condition -> scale. 1.0 in ``joint``
            mode is plain conditional sampling; 0 for a condition ignores it.
        mode: ``"joint"`` or ``"per_condition"`` (see the module docstring).

    All branches of one step run as one batch. Conditions that are null in the request contribute no term.
    """

    def __init__(
        self,
        denoiser: ConditionalDenoiser,
        guidance_scale: float | Mapping[str, float] = 3.0,
        mode: str = "per_condition",
    ) -> None:
        super().__init__()
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance mode {mode!r}; valid: {', '.join(GUIDANCE_MODES)}")
        names = denoiser.conditioning.names
        if isinstance(guidance_scale, Mapping):
            if mode == "joint":
                raise ValueError("joint guidance takes one guidance_scale, not one per condition")
            unknown = set(guidance_scale) - set(names)
            if unknown:
                raise ValueError(
                    f"guidance_scale for unknown condition(s) {sorted(unknown)}; valid: {', '.join(names)}"
                )
            scales = {n: float(guidance_scale.get(n, 1.0)) for n in names}
        else:
            scales = {n: float(guidance_scale) for n in names}
        self.denoiser = denoiser
        self.mode = mode
        self.scales = scales

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.denoiser.conditioning
        b = x.shape[0]
        if context is None:
            context = cond.null_indices(b, x.device)
        context = context.long().expand(b, -1) if context.shape[0] == 1 else context.long()
        null = cond.null_indices(b, x.device)
        if self.mode == "joint":
            g = self.scales[cond.names[0]]
            if g == 1.0:
                return self.denoiser(x, timesteps, context)
            branches, scales = [context], [g]
        else:
            branches, scales = [], []
            # which conditions the request names: read on a CPU; elsewhere every condition gets its branch, since
            # reading the request back at every step would stall the GPU, and a null condition's branch is eps(0)
            # itself, so its term is zero
            on_cpu = context.device.type == "cpu" and not torch.compiler.is_compiling()
            for j, n in enumerate(cond.names):
                if not on_cpu or bool((context[:, j] >= 0).any()):
                    only = null.clone()
                    only[:, j] = context[:, j]
                    branches.append(only)
                    scales.append(self.scales[n])
        if not branches:  # nothing requested: plain unconditional sampling
            return self.denoiser(x, timesteps, null)
        contexts = torch.cat([null] + branches)
        t = timesteps.reshape(-1)
        t = t.repeat(len(branches) + 1) if t.numel() == b else t
        out = self.denoiser(x.repeat(len(branches) + 1, *([1] * (x.ndim - 1))), t, contexts)
        parts = out.chunk(len(branches) + 1)
        return guidance_combination(parts[0], parts[1:], scales)


def filter_combinations(
    rows: Sequence[Mapping[str, Any]], exclude: Sequence[Sequence[str]] | None, conditioning: CategoricalConditioning
) -> list[dict]:
    """Rows whose (condition values) combination is not in ``exclude``: the held-out set of the extrapolation
    protocol, e.g. ``[["sclerosis", "t1ce"], ["dementia", "flair"]]`` (one value per condition, in order)."""
    held_out = {
        tuple(int(i) for i in conditioning.encode(dict(zip(conditioning.names, combo))))
        for combo in _check_combos(exclude or [], conditioning)
    }
    keep = []
    for row in rows:
        key = tuple(int(conditioning.index(n, row.get(n))) for n in conditioning.names)
        if key not in held_out:
            keep.append(dict(row))
    return keep


def _check_combos(combos: Sequence[Sequence[str]], conditioning: CategoricalConditioning) -> list[Sequence[str]]:
    for combo in combos:
        if isinstance(combo, str) or len(combo) != len(conditioning.names):
            raise ValueError(
                f"held-out combination {combo!r} must give one value per condition {list(conditioning.names)}"
            )
    return list(combos)


def all_combinations(conditioning: CategoricalConditioning) -> list[dict[str, str]]:
    """Every combination of condition values (the full pathology x modality grid), in vocabulary order."""
    import itertools

    names = conditioning.names
    return [dict(zip(names, combo)) for combo in itertools.product(*(conditioning.vocabularies[n] for n in names))]


class EncodeConditionsd(Transform):
    """MONAI dictionary transform: writes the (n_conditions,) index tensor of a row under ``output_key``."""

    def __init__(self, conditioning: CategoricalConditioning, output_key: str = "condition") -> None:
        self.conditioning = conditioning
        self.output_key = output_key

    def __call__(self, data: Mapping[str, Any]) -> dict:
        d = dict(data)
        try:
            d[self.output_key] = self.conditioning.encode({n: d.get(n) for n in self.conditioning.names})
        except ValueError as e:
            raise ValueError(f"{d.get('image', '?')}: {e}") from e
        return d
