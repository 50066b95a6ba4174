"""The ReF-LDM denoiser: a diffusers UNet over (noisy latent ‖ LQ latent) with CacheKV on every self-attention."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from diffusers import ConfigMixin, DDIMScheduler, DDPMScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import AttentionMixin

from refface.train.refldm.cachekv import CacheKVState, RefCache, install_cachekv


@dataclass
class UNetConfig:
    """Denoiser architecture; defaults are the paper's (base 160, mult [1,2,2,4], attention at 32/16/8)."""

    latent_channels: int = 8
    sample_size: int = 64
    base_channels: int = 160
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    layers_per_block: int = 2
    # One flag per level (resolution 64, 32, 16, 8 for a 64x64 latent).
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True, True])
    attention_head_dim: int = 32
    norm_num_groups: int = 32

    def validate(self) -> None:
        if len(self.attention_levels) != len(self.channel_mult):
            raise ValueError("unet.attention_levels needs one flag per entry of unet.channel_mult")
        for mult in self.channel_mult:
            width = self.base_channels * mult
            if width % self.norm_num_groups or width % self.attention_head_dim:
                raise ValueError(
                    f"unet width {width} must be divisible by norm_num_groups ({self.norm_num_groups}) "
                    f"and attention_head_dim ({self.attention_head_dim})"
                )


@dataclass
class NoiseConfig:
    """Diffusion schedule: 1000 steps, LDM's 'linear' β 0.0015→0.0155 (linear in √β), ε-prediction."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0155
    # LDM's "linear" schedule interpolates √β; diffusers calls that "scaled_linear".
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"


class RefLDMUNet(ModelMixin, ConfigMixin, AttentionMixin):
    """ε-prediction UNet on 2·C latent channels with reference K/V caching.

    The same weights serve the target (noisy latent ‖ LQ latent at step t) and the references
    (reference latent ‖ zeros at t = 0); see :meth:`build_cache`.
    """

    # CacheKV reads its mode from state that is set only during the forward pass; activation
    # recomputation in backward would run the target's attention without the references.
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 8,
        sample_size: int = 64,
        base_channels: int = 160,
        channel_mult: tuple[int, ...] = (1, 2, 2, 4),
        layers_per_block: int = 2,
        attention_levels: tuple[bool, ...] = (False, True, True, True),
        attention_head_dim: int = 32,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=2 * latent_channels,
            out_channels=latent_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(base_channels * m for m in channel_mult),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
        )
        self.cachekv = CacheKVState()
        self.cachekv_layers = install_cachekv(self, self.cachekv)

    def enable_gradient_checkpointing(self, *args, **kwargs) -> None:
        raise ValueError(
            "ReF-LDM does not support gradient checkpointing: CacheKV's reference K/V are only attached "
            "during the forward pass, so recomputed activations would miss them. Set loop.gradient_checkpointing: "
            "false (and lower data.batch_size or use gradient_accumulation_steps for memory)."
        )

    @classmethod
    def from_unet_config(cls, cfg: UNetConfig) -> RefLDMUNet:
        cfg.validate()
        kwargs = asdict(cfg)
        kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
        kwargs["attention_levels"] = tuple(kwargs["attention_levels"])
        return cls(**kwargs)

    def build_cache(self, ref_latents: torch.Tensor, ref_mask: torch.Tensor | None = None) -> RefCache | None:
        """Run the references through the UNet at t = 0 and cache every self-attention's K and V.

        Args:
            ref_latents: ``(B, K, C, h, w)`` reference latents (zeros for the CFG null condition).
            ref_mask: ``(B, K)`` bool, False for padding references; None when all are real.

        Returns:
            The cache, or None when K = 0 (the model is then the plain LQ-conditioned LDM).
        """
        b, k, c, h, w = ref_latents.shape
        if k == 0:
            return None
        x = ref_latents.reshape(b * k, c, h, w)
        x = torch.cat([x, torch.zeros_like(x)], dim=1)  # zero-padded to 2C channels
        t = torch.zeros(b * k, dtype=torch.long, device=x.device)
        with self.cachekv.use("write", num_refs=k, ref_mask=ref_mask) as cache:
            self.unet(x, t)  # output discarded: only the K/V matter
        return cache

    def forward(
        self,
        noisy_latents: torch.Tensor,
        lq_latents: torch.Tensor,
        timesteps: torch.Tensor,
        ref_latents: torch.Tensor | None = None,
        ref_mask: torch.Tensor | None = None,
        cache: RefCache | None = None,
    ) -> torch.Tensor:
        """Predict ε for ``noisy_latents`` ``(B, C, h, w)`` given the LQ latents and the references.

        Args:
            noisy_latents: z_t.
            lq_latents: the LQ image's latent (zeros when the LQ condition is dropped).
            timesteps: ``(B,)`` or scalar diffusion steps.
            ref_latents: ``(B, K, C, h, w)``: the cache is built inside this call (training builds it
                every step, and one forward call keeps DDP's gradient bookkeeping to one pass).
            ref_mask: ``(B, K)`` bool presence of each reference.
            cache: a cache built beforehand with :meth:`build_cache` (inference builds it once).
        """
        if ref_latents is not None:
            if cache is not None:
                raise ValueError("pass either ref_latents or a prebuilt cache, not both")
            cache = self.build_cache(ref_latents, ref_mask)
        x = torch.cat([noisy_latents, lq_latents], dim=1)  # (B, 2C, h, w)
        if cache is None:
            return self.unet(x, timesteps).sample
        with self.cachekv.use("read", cache=cache):
            return self.unet(x, timesteps).sample


def _noise_schedule(cfg: NoiseConfig) -> dict:
    """The scheduler arguments training and sampling share, so both see the same ᾱ schedule."""
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": cfg.prediction_type,
        "clip_sample": False,
    }


def make_train_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    return DDPMScheduler(**_noise_schedule(cfg))


SPACINGS = ("leading", "uniform_trailing")


def official_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The official sampler's ``uniform_trailing`` steps, from the noisiest down.

    Every ``T // steps``-th step counted back from T - 1 (for 50 of 1000: 999, 979, ..., 19). When
    ``steps`` does not divide T this gives one step more than asked (3 of 1000: 999, 666, 333, 0), as
    the official sampler does.
    """
    c = num_train_timesteps // steps
    return [int(t) - 1 for t in range(num_train_timesteps, 0, -c)]


def make_ddim_scheduler(cfg: NoiseConfig, spacing: str = "leading") -> DDIMScheduler:
    """DDIM with ᾱ_prev of the last step = ᾱ_0 (not 1), LDM's convention.

    ``leading``: refface's default (steps 0, T/n, ... offset by 1). ``uniform_trailing``: the official
    ReF-LDM sampler's (see :func:`official_timesteps`); apply it with :func:`set_sampling_timesteps`.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"timestep spacing must be one of {SPACINGS}, got {spacing!r}")
    return DDIMScheduler(
        **_noise_schedule(cfg),
        set_alpha_to_one=False,
        steps_offset=1 if spacing == "leading" else 0,
        timestep_spacing="leading" if spacing == "leading" else "trailing",
    )


def set_sampling_timesteps(scheduler: DDIMScheduler, steps: int, spacing: str, device=None) -> None:
    """``scheduler.set_timesteps`` with the official rule for ``uniform_trailing``.

    Each DDIM step goes back ``T // steps`` training steps (below step 0: ᾱ_0), which is what the
    official steps are spaced by, so only the list itself needs replacing.
    """
    scheduler.set_timesteps(steps, device=device)
    if spacing == "uniform_trailing":
        ts = official_timesteps(steps, scheduler.config.num_train_timesteps)
        scheduler.timesteps = torch.tensor(ts, dtype=torch.long, device=device)
