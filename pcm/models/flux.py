"""FLUX's transformer call on our unpacked latents: 2x2-patch tokens, rotary position ids, timestep = sigma, and
FLUX.1-dev's embedded guidance, exactly as FluxPipeline calls it (tests/test_flux.py compares them)."""

import torch

FLUX_PATCH = 2  # FLUX packs 2x2 latent patches into one token (FluxPipeline._pack_latents)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX's tokens, 2x2 patches row-major (FluxPipeline._pack_latents)."""
    batch, channels, h, w = x.shape
    if h % FLUX_PATCH or w % FLUX_PATCH:
        raise ValueError(f"FLUX latents of side {h} x {w}: both must be even (data.resolution a multiple of 16 for "
                         "FLUX's 8x VAE) to pack 2x2 patches")
    x = x.view(batch, channels, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(batch, (h // 2) * (w // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w): pack_latents inverted (FluxPipeline._unpack_latents at latent size h x w)."""
    batch, _, width = tokens.shape
    x = tokens.view(batch, h // 2, w // 2, width // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, width // 4, h, w)


def latent_image_ids(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 3) rotary position ids of the packed tokens: (0, row, col) (FluxPipeline's latent_image_ids)."""
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros_like(row), row, col], dim=-1).reshape(rows * cols, 3).float()


def flux_velocity(net: torch.nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """FLUX's velocity on unpacked latents x_t (B, 16, h, w) at sigma (B,), as FluxPipeline calls the transformer:
    packed tokens, timestep = sigma (the transformer scales by 1000 itself), text ids zeros, image ids (0, row,
    col), and cond's embedded guidance (B,) when it carries one (FLUX.1-dev); all in x_t's dtype."""
    (h, w), dtype, guidance = x_t.shape[-2:], x_t.dtype, cond.get("guidance")
    states = cond["encoder_hidden_states"].to(dtype)
    out = net(hidden_states=pack_latents(x_t), timestep=sigma, encoder_hidden_states=states,
              pooled_projections=cond["pooled_projections"].to(dtype), txt_ids=states.new_zeros(states.shape[1], 3),
              img_ids=latent_image_ids(h // FLUX_PATCH, w // FLUX_PATCH).to(x_t.device, dtype),
              guidance=None if guidance is None else guidance.to(dtype)).sample
    return unpack_latents(out, h, w)
