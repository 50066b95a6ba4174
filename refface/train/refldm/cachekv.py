"""CacheKV: an attention processor that caches reference K/V and lets the target attend to them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MODES = ("off", "write", "read")


@dataclass
class RefCache:
    """Cached reference keys/values of every self-attention layer.

    Attributes:
        kv: layer name -> (key, value), each ``(B, heads, K*T, d)``: the K references' tokens of one
            target, laid side by side along the token axis.
        mask: ``(B, K)`` bool, False for a missing (padding) reference; None when all are present.
        num_refs: K.
    """

    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    num_refs: int = 0

    @staticmethod
    def cat(caches: list[RefCache]) -> RefCache:
        """Stack caches of different samples along the batch axis (e.g. conditional ‖ null for CFG)."""
        if len({c.num_refs for c in caches}) != 1:
            raise ValueError("caches to concatenate must hold the same number of references")
        kv = {
            name: (
                torch.cat([c.kv[name][0] for c in caches]),
                torch.cat([c.kv[name][1] for c in caches]),
            )
            for name in caches[0].kv
        }
        if all(c.mask is None for c in caches):
            mask = None
        else:
            mask = torch.cat([c.full_mask() for c in caches])
        return RefCache(kv=kv, mask=mask, num_refs=caches[0].num_refs)

    def full_mask(self) -> torch.Tensor:
        """The ``(B, K)`` presence mask, all True when no reference is missing."""
        if self.mask is not None:
            return self.mask
        key = next(iter(self.kv.values()))[0]
        return torch.ones(key.shape[0], self.num_refs, dtype=torch.bool, device=key.device)


class CacheKVState:
    """State shared by every CacheKV processor of one model: the mode and the cache being used.

    ``UNet2DModel.forward`` takes no ``cross_attention_kwargs``, so the mode travels through this
    object, set for the duration of one forward pass by :meth:`use`.
    """

    def __init__(self) -> None:
        self.mode = "off"
        self.cache: RefCache | None = None
        self.ref_mask: torch.Tensor | None = None  # (B, K) while writing
        self.num_refs = 0
        # Recorded on demand by tests and diagnostics: layer name -> number of key tokens seen.
        self.record_tokens: dict[str, int] | None = None

    @contextlib.contextmanager
    def use(
        self,
        mode: str,
        cache: RefCache | None = None,
        num_refs: int = 0,
        ref_mask: torch.Tensor | None = None,
    ) -> Iterator[RefCache | None]:
        """Set the mode for the enclosed forward pass; always resets to ``off`` afterwards.

        Args:
            mode: ``write`` (the batch is B*K references; fill a new cache), ``read`` (attend to
                ``cache`` too) or ``off`` (plain self-attention).
            cache: the cache to read (``read`` mode).
            num_refs: K, for ``write`` mode.
            ref_mask: ``(B, K)`` bool for ``write`` mode; False marks a padding reference.
        """
        if mode not in MODES:
            raise ValueError(f"CacheKV mode must be one of {MODES}, got {mode!r}")
        if mode == "read" and cache is None:
            raise ValueError("CacheKV read mode needs a cache (build it with mode='write')")
        if mode == "write":
            if num_refs < 1:
                raise ValueError("CacheKV write mode needs num_refs >= 1")
            cache = RefCache(num_refs=num_refs)
        self.mode, self.cache, self.num_refs, self.ref_mask = mode, cache, num_refs, ref_mask
        try:
            yield cache
        finally:
            if mode == "write" and cache is not None and ref_mask is not None:
                if ref_mask.shape[1] != num_refs:
                    raise ValueError(f"ref_mask has {ref_mask.shape[1]} columns for {num_refs} references")
                cache.mask = None if bool(ref_mask.all()) else ref_mask.bool()
            self.mode, self.cache, self.num_refs, self.ref_mask = "off", None, 0, None


class CacheKVProcessor:
    """Self-attention processor with reference K/V caching (installed via ``set_attn_processor``).

    ``write``: the batch holds B*K reference latents; each attends to itself as usual and its K/V
    are stored in the shared cache, regrouped per target. ``read``: the target's K/V are concatenated
    with the cached K/V along the token axis, so every target token sees target + reference tokens.
    """

    def __init__(self, name: str, state: CacheKVState):
        self.name = name
        self.state = state

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("CacheKVProcessor is meant for self-attention layers only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # (B, T, C)
        batch, tokens, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, T, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        state = self.state
        cache = state.cache
        mask = None
        if state.mode in ("write", "read") and cache is None:
            raise RuntimeError(f"CacheKV {state.mode} mode without a cache: enter it with CacheKVState.use")
        if state.mode == "write" and cache is not None:
            k_refs = state.num_refs
            if batch % k_refs:
                raise ValueError(f"write batch {batch} is not a multiple of num_refs {k_refs}")

            def regroup(x: torch.Tensor) -> torch.Tensor:
                # (B*K, heads, T, d) -> (B, heads, K*T, d)
                x = x.view(batch // k_refs, k_refs, attn.heads, tokens, head_dim).permute(0, 2, 1, 3, 4)
                return x.reshape(batch // k_refs, attn.heads, k_refs * tokens, head_dim)

            cache.kv[self.name] = (regroup(key), regroup(value))
        elif state.mode == "read" and cache is not None:
            ref_k, ref_v = cache.kv[self.name]
            if ref_k.shape[0] != batch:
                raise ValueError(f"cache holds {ref_k.shape[0]} targets but the batch has {batch}")
            key = torch.cat([key, ref_k.to(key.dtype)], dim=2)  # (B, heads, T + K*T, d)
            value = torch.cat([value, ref_v.to(value.dtype)], dim=2)
            if cache.mask is not None:
                own = torch.ones(batch, tokens, dtype=torch.bool, device=key.device)
                # (B, K) -> (B, K*T): every token of a reference shares its presence flag.
                refs = cache.mask.to(key.device).repeat_interleave(ref_k.shape[2] // cache.num_refs, dim=1)
                mask = torch.cat([own, refs], dim=1)[:, None, None, :]  # (B, 1, 1, T + K*T)
        if state.record_tokens is not None:
            state.record_tokens[self.name] = key.shape[2]

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_cachekv(model, state: CacheKVState) -> list[str]:
    """Install a :class:`CacheKVProcessor` on every self-attention layer of ``model`` (an ``AttentionMixin``).

    Returns:
        The names of the layers that got one (``attn_processors`` keys).
    """
    names = list(model.attn_processors.keys())
    model.set_attn_processor({name: CacheKVProcessor(name, state) for name in names})
    return names
