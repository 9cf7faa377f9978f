"""MMDiT denoiser with a fake-causal memory bank (FlowAct-R1 style).

Token groups, in attention order:
  memory  - latent frames of the memory bank (reference, long-term, short-term), timestep 0
  stream  - the chunk being denoised (LATENT_FRAMES_PER_CHUNK latent frames), per-frame timesteps
  cond    - the chunk's audio features and prompt tokens (separate "condition" weights, SD3-style)
One attention runs over all groups with the fake-causal mask: stream and cond queries see every
valid key; memory queries see only memory. Memory hidden states therefore never depend on the
stream, so their keys/values are computed once per chunk (`memory_kv`) and reused by every NFE
(`forward_stream`). `forward_joint` is the single-attention reference path (training, tests).

Memory frames sit in fixed slots with fixed 3D RoPE positions (reference 0, long-term 1..L,
short-term, then the stream), so the positions an endless stream sees never grow. Empty slots are
masked out with `memory_valid`; `memory_valid=None` says every slot is valid, and attention then
runs without a mask (SDPA may pick its flash or cuDNN kernels, which take no mask).

The denoiser knows nothing about sessions, audio windows or the sampler schedule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowact.presets import AUDIO_FEATURES_PER_CHUNK, LATENT_CHANNELS, LATENT_FRAMES_PER_CHUNK, Preset


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow-matching times in [0, 1]: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
    angles = (t.float() * 1000.0)[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_angles(frame_pos: torch.Tensor, grid_h: int, grid_w: int, head_dim: int) -> torch.Tensor:
    """3D RoPE angles for frames at `frame_pos` (F,) on an h x w token grid -> (F*h*w, head_dim/2).

    The head dim is split as in Wan: time gets head_dim - 4*(head_dim//6), height and width
    2*(head_dim//6) each."""
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw

    def axis(pos: torch.Tensor, d: int) -> torch.Tensor:  # (N,) -> (N, d/2)
        inv = 1.0 / (10_000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=pos.device) / d))
        return pos.float()[:, None] * inv

    dev = frame_pos.device
    f = frame_pos[:, None, None].expand(-1, grid_h, grid_w).reshape(-1)  # (F*h*w,)
    y = torch.arange(grid_h, device=dev)[None, :, None].expand(frame_pos.shape[0], -1, grid_w).reshape(-1)
    x = torch.arange(grid_w, device=dev)[None, None, :].expand(frame_pos.shape[0], grid_h, -1).reshape(-1)
    return torch.cat([axis(f, d_t), axis(y, d_hw), axis(x, d_hw)], dim=-1)  # (F*h*w, head_dim/2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels: x (B, H, N, Dh), angles (N, Dh/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, N, Dh/2)
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)  # bf16 activations stay bf16
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)  # (B, H, N, Dh)


def key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key validity (B, N) bool -> the additive attention bias (B, N): 0 where valid, -inf where not.
    Added once per score instead of a boolean mask, which exports to a select and a NaN guard over every
    score tensor (every query has a valid key: the reference slot is always filled)."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Modality(nn.Module):
    """The per-modality weights of one joint block: adaLN modulation, QK-norm attention, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.modulation = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def qkv_heads(self, x: torch.Tensor, mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Modulated pre-norm projections: x (B, N, D), mod (B, N, 6D) -> q, k, v (B, H, N, Dh)."""
        shift, scale = mod.chunk(6, dim=-1)[:2]  # (B, N, D) each
        qkv = self.qkv(modulate(self.norm1(x), shift, scale))  # (B, N, 3D)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        # In v's dtype: from torch 2.12 CUDA autocast runs rms_norm in fp32, which would make the memory K/V fp32
        return self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """Gated residuals around the attention output and the MLP: (B, N, D) -> (B, N, D)."""
        _, _, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # 6 x (B, N, D)
        x = x + gate1 * self.proj(attn.transpose(1, 2).flatten(2))  # (B, N, D)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)


class JointBlock(nn.Module):
    """One MMDiT block: video weights for memory and stream tokens, condition weights for cond tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.video = Modality(dim, heads, mlp_ratio)
        self.cond = Modality(dim, heads, mlp_ratio)

    def memory(self, m, m_mod, m_rope, m_mask):
        """Memory-only self-attention. m (B, Nm, D); m_mask (B, 1, Nm, Nm) -> (m', k, v)."""
        q, k, v = self.video.qkv_heads(m, m_mod)  # (B, H, Nm, Dh)
        q, k = apply_rope(q, m_rope), apply_rope(k, m_rope)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=m_mask)  # (B, H, Nm, Dh)
        return self.video.finish(m, attn, m_mod), k, v

    def stream(self, x, c, x_mod, c_mod, x_rope, mem_k, mem_v, key_mask):
        """Stream + cond queries over [memory | stream | cond] keys.

        x (B, Nx, D) stream, c (B, Nc, D) cond, mem_k/mem_v (B, H, Nm, Dh), key_mask (B, 1, 1, Nm+Nx+Nc)."""
        qx, kx, vx = self.video.qkv_heads(x, x_mod)  # (B, H, Nx, Dh)
        qx, kx = apply_rope(qx, x_rope), apply_rope(kx, x_rope)
        qc, kc, vc = self.cond.qkv_heads(c, c_mod)  # (B, H, Nc, Dh)
        k = torch.cat([mem_k, kx, kc], dim=2)  # (B, H, Nm+Nx+Nc, Dh)
        v = torch.cat([mem_v, vx, vc], dim=2)
        attn = F.scaled_dot_product_attention(torch.cat([qx, qc], dim=2), k, v, attn_mask=key_mask)  # (B, H, Nx+Nc, Dh)
        nx = x.shape[1]
        return self.video.finish(x, attn[:, :, :nx], x_mod), self.cond.finish(c, attn[:, :, nx:], c_mod)

    def joint(self, m, x, c, m_mod, x_mod, c_mod, rope, mask):
        """Reference path: one attention over [memory | stream | cond] with the full fake-causal mask.

        mask (B, 1, N, N) boolean, True = may attend; rope (Nm+Nx, Dh/2) covers memory then stream."""
        nm, nx = m.shape[1], x.shape[1]
        qv, kv_, vv = self.video.qkv_heads(torch.cat([m, x], dim=1), torch.cat([m_mod, x_mod], dim=1))  # (B, H, Nm+Nx, Dh)
        qv, kv_ = apply_rope(qv, rope), apply_rope(kv_, rope)
        qc, kc, vc = self.cond.qkv_heads(c, c_mod)  # (B, H, Nc, Dh)
        q, k, v = (torch.cat(p, dim=2) for p in ((qv, qc), (kv_, kc), (vv, vc)))  # (B, H, N, Dh)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, Dh)
        m = self.video.finish(m, attn[:, :, :nm], m_mod)
        x = self.video.finish(x, attn[:, :, nm:nm + nx], x_mod)
        return m, x, self.cond.finish(c, attn[:, :, nm + nx:], c_mod)


class MMDiT(nn.Module):
    """Velocity predictor v(x_t, t | memory, audio, prompt) for one chunk of latent frames."""

    def __init__(self, preset: Preset):
        super().__init__()
        p = preset
        self.preset = p
        self.patch = p.patch
        self.grid = (p.latent_height // p.patch, p.latent_width // p.patch)
        patch_dim = LATENT_CHANNELS * p.patch * p.patch
        self.x_embed = nn.Linear(patch_dim, p.dim)
        self.audio_embed = nn.Sequential(nn.Linear(p.audio.d_model, p.dim), nn.GELU(approximate="tanh"), nn.Linear(p.dim, p.dim))
        self.audio_pos = nn.Parameter(torch.zeros(1, AUDIO_FEATURES_PER_CHUNK, p.dim))  # one per video frame
        self.prompt_embed = nn.Linear(p.text_dim, p.dim)
        self.t_embed = nn.Sequential(nn.Linear(p.dim, p.dim), nn.SiLU(), nn.Linear(p.dim, p.dim))
        self.prompt_pool = nn.Linear(p.text_dim, p.dim)  # pooled prompt joins the timestep conditioning
        self.blocks = nn.ModuleList(JointBlock(p.dim, p.heads, p.mlp_ratio) for _ in range(p.depth))
        self.final_modulation = nn.Linear(p.dim, 2 * p.dim)
        self.final_norm = nn.LayerNorm(p.dim, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(p.dim, patch_dim)
        self.head_dim = p.dim // p.heads
        self.initialize()

    def initialize(self):
        """DiT init: xavier linears, zero adaLN modulation (blocks start as identity) and zero output."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.normal_(self.audio_pos, std=0.02)
        for block in self.blocks:
            for modality in (block.video, block.cond):
                nn.init.normal_(modality.modulation.weight, std=0.02)
        nn.init.normal_(self.final_modulation.weight, std=0.02)
        nn.init.normal_(self.final.weight, std=0.02)

    # --- token plumbing -------------------------------------------------------------------

    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """(B, F, C, h, w) latents -> (B, F*gh*gw, D) tokens."""
        b, f, c, _, _ = z.shape
        gh, gw = self.grid
        z = z.reshape(b, f, c, gh, self.patch, gw, self.patch).permute(0, 1, 3, 5, 2, 4, 6)  # (B, F, gh, gw, C, p, p)
        return self.x_embed(z.reshape(b, f * gh * gw, -1))  # (B, F*gh*gw, D)

    def unpatchify(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, F*gh*gw, C*p*p) -> (B, F, C, h, w)."""
        gh, gw = self.grid
        p = self.patch
        z = tokens.reshape(tokens.shape[0], frames, gh, gw, LATENT_CHANNELS, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return z.reshape(tokens.shape[0], frames, LATENT_CHANNELS, gh * p, gw * p)  # (B, F, C, h, w)

    def frame_modulation(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Per-frame conditioning vector: t (B, F), pooled prompt (B, D) -> (B, F, D)."""
        return self.t_embed(timestep_embedding(t, self.preset.dim)) + pooled[:, None, :]  # (B, F, D)

    def per_token(self, per_frame: torch.Tensor) -> torch.Tensor:
        """Repeat a per-frame vector over that frame's tokens: (B, F, E) -> (B, F*gh*gw, E)."""
        return per_frame.repeat_interleave(self.grid[0] * self.grid[1], dim=1)

    def memory_rope(self, memory_frames: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """RoPE of the memory frames: all of them in order, or the bank slots `positions` (Fm',)."""
        if positions is None:
            positions = torch.arange(memory_frames, device=self.audio_pos.device)
        return rope_angles(positions, *self.grid, self.head_dim)

    def stream_rope(self, memory_frames: int) -> torch.Tensor:
        pos = memory_frames + torch.arange(LATENT_FRAMES_PER_CHUNK, device=self.audio_pos.device)
        return rope_angles(pos, *self.grid, self.head_dim)

    def embed_cond(self, audio: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (B, 12, Da), prompt (B, P, Dt) -> cond tokens (B, 12+P, D), pooled prompt (B, D)."""
        a = self.audio_embed(audio) + self.audio_pos  # (B, 12, D)
        pooled = self.prompt_pool(prompt.mean(dim=1))  # (B, D)
        return torch.cat([a, self.prompt_embed(prompt)], dim=1), pooled

    def token_valid(self, memory_valid: torch.Tensor) -> torch.Tensor:
        """(B, Fm) frame validity -> (B, Fm*gh*gw) token validity."""
        return self.per_token(memory_valid[..., None]).squeeze(-1)

    # --- cached path: memory once per chunk, then the stream per NFE -----------------------

    def memory_kv(self, memory: torch.Tensor, memory_valid: torch.Tensor | None,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
        """Keys/values of the memory tokens in every block.

        memory (B, Fm, C, h, w), memory_valid (B, Fm) bool or None (all valid) -> (B, depth, 2, H, Fm*gh*gw, Dh).
        `positions` (Fm',): `memory` holds only these bank slots (B, Fm', C, h, w), all valid. Every op but
        attention is per token, so that equals the masked pass over the whole bank on those slots' tokens."""
        b, fm = memory.shape[:2]
        m = self.patchify(memory)  # (B, Nm, D)
        zero_t = torch.zeros(b, fm, device=memory.device)
        cond = self.t_embed(timestep_embedding(zero_t, self.preset.dim))  # (B, Fm, D); no prompt: memory is clean
        m_mask = None
        if memory_valid is not None:
            valid = self.token_valid(memory_valid)  # (B, Nm)
            m_mask = key_bias(valid, m.dtype)[:, None, None, :]  # (B, 1, 1, Nm)
        rope = self.memory_rope(fm, positions)
        kvs = []
        for block in self.blocks:
            m_mod = self.per_token(block.video.modulation(F.silu(cond)))  # (B, Nm, 6D)
            m, k, v = block.memory(m, m_mod, rope, m_mask)
            kvs.append(torch.stack([k, v], dim=1))  # (B, 2, H, Nm, Dh)
        return torch.stack(kvs, dim=1)  # (B, depth, 2, H, Nm, Dh)

    def forward_stream(self, x: torch.Tensor, t: torch.Tensor, audio: torch.Tensor, prompt: torch.Tensor,
                       memory_kv: torch.Tensor, memory_valid: torch.Tensor | None) -> torch.Tensor:
        """Velocity for the stream chunk given cached memory keys/values.

        x (B, 3, C, h, w), t (B, 3) per-frame times, audio (B, 12, Da), prompt (B, P, Dt),
        memory_kv (B, depth, 2, H, Nm, Dh), memory_valid (B, Fm) or None (all valid) -> v (B, 3, C, h, w)."""
        fx = x.shape[1]
        xt = self.patchify(x)  # (B, Nx, D)
        c, pooled = self.embed_cond(audio, prompt)  # (B, Nc, D), (B, D)
        x_cond = self.frame_modulation(t, pooled)  # (B, 3, D)
        c_cond = self.frame_modulation(t.mean(dim=1, keepdim=True), pooled)  # (B, 1, D)
        key_mask = None
        if memory_valid is not None:
            key_valid = torch.cat([self.token_valid(memory_valid),
                                   torch.ones(x.shape[0], xt.shape[1] + c.shape[1], dtype=torch.bool, device=x.device)], 1)
            key_mask = key_bias(key_valid, xt.dtype)[:, None, None, :]  # (B, 1, 1, Nm+Nx+Nc)
        rope = self.stream_rope(self.preset.memory_frames)  # the stream follows the whole bank, subset or not
        for i, block in enumerate(self.blocks):
            x_mod = self.per_token(block.video.modulation(F.silu(x_cond)))  # (B, Nx, 6D)
            c_mod = block.cond.modulation(F.silu(c_cond)).expand(-1, c.shape[1], -1)  # (B, Nc, 6D)
            xt, c = block.stream(xt, c, x_mod, c_mod, rope, memory_kv[:, i, 0], memory_kv[:, i, 1], key_mask)
        return self.head(xt, x_cond, fx)

    def head(self, xt: torch.Tensor, x_cond: torch.Tensor, frames: int) -> torch.Tensor:
        shift, scale = self.per_token(self.final_modulation(F.silu(x_cond))).chunk(2, dim=-1)  # (B, Nx, D) each
        return self.unpatchify(self.final(modulate(self.final_norm(xt), shift, scale)), frames)  # (B, F, C, h, w)

    # --- reference path ---------------------------------------------------------------------

    def forward_joint(self, x, t, audio, prompt, memory, memory_valid):
        """Same maths as memory_kv + forward_stream, as one attention with the fake-causal mask.

        Returns (v (B, 3, C, h, w), memory hidden states after the last block (B, Nm, D))."""
        b, fm = memory_valid.shape
        fx = x.shape[1]
        m, xt = self.patchify(memory), self.patchify(x)  # (B, Nm, D), (B, Nx, D)
        c, pooled = self.embed_cond(audio, prompt)  # (B, Nc, D)
        m_cond = self.t_embed(timestep_embedding(torch.zeros(b, fm, device=x.device), self.preset.dim))  # (B, Fm, D)
        x_cond = self.frame_modulation(t, pooled)  # (B, 3, D)
        c_cond = self.frame_modulation(t.mean(dim=1, keepdim=True), pooled)  # (B, 1, D)
        nm, nx, nc = m.shape[1], xt.shape[1], c.shape[1]
        valid = torch.cat([self.token_valid(memory_valid), torch.ones(b, nx + nc, dtype=torch.bool, device=x.device)], 1)
        is_memory = torch.arange(nm + nx + nc, device=x.device) < nm  # (N,)
        # fake-causal: a memory query may only see memory keys; everyone sees only valid keys
        allowed = ~(is_memory[:, None] & ~is_memory[None, :])  # (N, N)
        mask = allowed[None, None] & valid[:, None, None, :]  # (B, 1, N, N)
        rope = torch.cat([self.memory_rope(fm), self.stream_rope(fm)], dim=0)
        for block in self.blocks:
            m_mod = self.per_token(block.video.modulation(F.silu(m_cond)))
            x_mod = self.per_token(block.video.modulation(F.silu(x_cond)))
            c_mod = block.cond.modulation(F.silu(c_cond)).expand(-1, nc, -1)
            m, xt, c = block.joint(m, xt, c, m_mod, x_mod, c_mod, rope, mask)
        return self.head(xt, x_cond, fx), m
