"""Float32 reference forward of a Qwen2 decoder, written from the formulas, with calibration.

This is the float model that the integer graph approximates. It reads a checkpoint through
`WeightReader` and computes, for tokens t_0..t_{T-1} at positions 0..T-1 (no KV cache):

    x = E[t]                                                   (T, D)   embedding
    for each layer:
        h = rmsnorm(x) * w_in                                  (T, D)   attn_in
        q = h Wq^T + bq, k = h Wk^T + bk, v = h Wv^T + bv      (T, H*hd), (T, KV*hd)
        q_rot, k_rot = rope(q), rope(k)                         rotate_half convention
        s = q_rot k_rot^T / sqrt(hd)                            (H, T, T) scores, per head;
                                                                query head h reads kv head
                                                                h // group (GQA)
        a = softmax(s + causal mask) v                          (T, H*hd) attn_out
        x = x + a Wo^T                                          residual
        h = rmsnorm(x) * w_post                                 (T, D)   mlp_in
        x = x + (silu(h Wg^T) * (h Wu^T)) Wd^T                  residual
    logits = (rmsnorm(x) * w_final) W_lm^T                      (T, V)

with rmsnorm(x) = x / sqrt(mean(x^2) + eps) over the last dimension, and RoPE
rope(x)[p] = x[p] * cos(p θ) + rotate_half(x[p]) * sin(p θ), θ_j = theta^(-2j/hd) for
j < hd/2 repeated twice (the layout transformers' Qwen2 uses). The order of float operations
follows transformers' eager Qwen2 so that logits agree to float32 rounding.

When a `CalibrationStats` is passed, the forward records the running max |x| of every named
point the integer converter needs to pick static activation scales (see `CALIBRATION_POINTS`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from optinfer.errors import UserError
from optinfer.models.checkpoint import Qwen2Spec, WeightReader

# ---------------------------------------------------------------------------------------------
# Calibration statistics
# ---------------------------------------------------------------------------------------------

# Per-layer points, named f"L{i}.{point}"; see FloatReference.forward for where each is taken.
LAYER_POINTS = (
    "attn_in",  # input_layernorm output (input of q/k/v_proj)
    "q",  # q_proj output, bias added, before RoPE
    "k",
    "v",
    "q_rot",  # after RoPE
    "k_rot",
    "scores",  # q_rot . k_rot / sqrt(head_dim), causal (unmasked) entries only
    "attn_out",  # softmax(scores) . V, input of o_proj
    "o",  # o_proj output
    "mlp_in",  # post_attention_layernorm output
    "gate",
    "up",
    "act",  # silu(gate) * up, input of down_proj
    "down",
)
# Global points: `residual` is one max over the embedding output and the residual stream after
# every add of every layer (the integer model keeps one scale for the whole stream).
GLOBAL_POINTS = ("residual", "final_in", "logits")
# Points that also get a per-channel max (a vector over the last dimension): the inputs of the
# linear layers, where per-channel outliers decide whether smoothing is needed.
CHANNEL_LAYER_POINTS = ("attn_in", "mlp_in", "act")
CHANNEL_GLOBAL_POINTS = ("final_in",)

CALIBRATION_FORMAT = "optinfer-calibration-v1"


def calibration_points(num_layers: int) -> list[str]:
    """Every name `FloatReference.forward` records into max_abs, for a model of num_layers."""
    names = [f"L{i}.{point}" for i in range(num_layers) for point in LAYER_POINTS]
    return [*GLOBAL_POINTS, *names]


def channel_calibration_points(num_layers: int) -> list[str]:
    """Every name `FloatReference.forward` records into channel_max_abs."""
    names = [f"L{i}.{point}" for i in range(num_layers) for point in CHANNEL_LAYER_POINTS]
    return [*CHANNEL_GLOBAL_POINTS, *names]


class CalibrationStats:
    """Running max |x| per named tensor, over every element of every forward observed.

    `max_abs[name]` is a float (the max over all elements seen so far); `channel_max_abs[name]`
    is a float32 vector over the tensor's last dimension (max over all other dimensions and all
    forwards). Both only grow; observing the same data twice changes nothing.
    """

    def __init__(
        self,
        max_abs: dict[str, float] | None = None,
        channel_max_abs: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.max_abs: dict[str, float] = dict(max_abs or {})
        self.channel_max_abs: dict[str, np.ndarray] = {
            k: np.asarray(v, dtype=np.float32) for k, v in (channel_max_abs or {}).items()
        }

    def observe(self, name: str, tensor: torch.Tensor | np.ndarray, per_channel: bool = False):
        """Fold |tensor| into max_abs[name]; with per_channel also into channel_max_abs[name]
        (over the last dimension, whose length must stay the same across calls)."""
        values = torch.as_tensor(tensor).detach().abs().to(torch.float32)
        if values.numel() == 0:
            return
        peak = float(values.max())
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), peak)
        if per_channel:
            channels = values.reshape(-1, values.shape[-1]).amax(dim=0).numpy()
            previous = self.channel_max_abs.get(name)
            if previous is not None and previous.shape != channels.shape:
                raise ValueError(
                    f"{name}: {channels.shape[0]} channels now, {previous.shape[0]} before"
                )
            self.channel_max_abs[name] = (
                channels if previous is None else np.maximum(previous, channels)
            )

    def merge(self, other: CalibrationStats) -> None:
        """Fold another set of statistics (e.g. from another process) into this one."""
        for name, value in other.max_abs.items():
            self.max_abs[name] = max(self.max_abs.get(name, 0.0), value)
        for name, vector in other.channel_max_abs.items():
            previous = self.channel_max_abs.get(name)
            self.channel_max_abs[name] = (
                vector.copy() if previous is None else np.maximum(previous, vector)
            )

    def to_json(self) -> str:
        """JSON text; float32 values round-trip exactly through `from_json`."""
        document = {
            "format": CALIBRATION_FORMAT,
            "max_abs": dict(sorted(self.max_abs.items())),
            "channel_max_abs": {
                name: [float(x) for x in vector]
                for name, vector in sorted(self.channel_max_abs.items())
            },
        }
        return json.dumps(document)

    @classmethod
    def from_json(cls, text: str) -> CalibrationStats:
        """Parse `to_json` output; raises UserError when it is not a calibration file."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"calibration statistics are not valid JSON: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != CALIBRATION_FORMAT:
            raise UserError(f"not a calibration file: 'format' must be '{CALIBRATION_FORMAT}'")
        return cls(
            max_abs={str(k): float(v) for k, v in document.get("max_abs", {}).items()},
            channel_max_abs={
                str(k): np.asarray(v, dtype=np.float32)
                for k, v in document.get("channel_max_abs", {}).items()
            },
        )


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, last dim) + eps), in transformers' operation order."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def rope_tables(num_positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, ...]:
    """(cos, sin), each (T, head_dim) float32, for positions 0..T-1: angle[p, j] = p * θ_j with
    θ_j = theta^(-2j/head_dim) for j < head_dim/2, and the same angles again for the second half
    (rotate_half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(num_positions, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # (T, hd/2)
    doubled = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return doubled.cos(), doubled.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FloatReference:
    """Qwen2 forward in float32 over weights read once from a checkpoint.

    Holds every weight as a float32 torch tensor (about 7.1 GB at 1.5B shape). Deterministic on
    one machine; across machines float results may differ in the last bits, which is why the
    verified model is the integer graph, not this.
    """

    def __init__(self, reader: WeightReader, spec: Qwen2Spec | None = None) -> None:
        self.spec = spec if spec is not None else reader.spec
        self.embed = torch.from_numpy(reader.embed_tokens())  # (V, D)
        # A tied model shares one tensor instead of holding a second 0.9 GB copy.
        self.lm_head = (
            self.embed if self.spec.tie_word_embeddings else torch.from_numpy(reader.lm_head())
        )  # (V, D)
        self.final_norm = torch.from_numpy(reader.final_norm())  # (D,)
        self.layers = [
            {key: torch.from_numpy(value) for key, value in reader.layer(i).items()}
            for i in range(self.spec.num_layers)
        ]

    def forward(
        self,
        tokens: Sequence[int] | np.ndarray,
        record: CalibrationStats | None = None,
        residuals: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Logits (T, vocab) float32 for token ids at positions 0..T-1 (full causal pass).

        With `record`, folds the max |x| of every point of `calibration_points` (and the
        per-channel max of `channel_calibration_points`) into it. With `residuals`, appends the
        residual stream (T, D) float32 after the embedding and after each of every layer's two
        adds (1 + 2 * layers arrays): the points the integer graph names `embed`,
        `L{i}.attn.residual` and `L{i}.mlp.residual`.
        """
        s = self.spec
        ids = np.asarray(tokens)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"tokens must be a non-empty 1-D list of integer ids, got {ids!r}")
        if ids.min() < 0 or ids.max() >= s.vocab_size:
            raise UserError(
                f"token ids must lie in [0, {s.vocab_size}); got {ids.min()}..{ids.max()}"
            )
        num_tokens = ids.shape[0]

        def observe(name: str, value: torch.Tensor, per_channel: bool = False) -> None:
            if record is not None:
                record.observe(name, value, per_channel=per_channel)
            if residuals is not None and name == "residual":
                residuals.append(value.numpy().copy())

        cos, sin = rope_tables(num_tokens, s.head_dim, s.rope_theta)  # (T, hd) each
        causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()  # (T, T)
        scale = 1.0 / math.sqrt(s.head_dim)

        with torch.inference_mode():
            x = self.embed[torch.from_numpy(ids.astype(np.int64))]  # (T, D)
            observe("residual", x)
            for i, w in enumerate(self.layers):
                p = f"L{i}."
                h = rms_norm(x, w["input_norm"], s.rms_norm_eps)  # (T, D)
                observe(p + "attn_in", h, per_channel=True)
                q = F.linear(h, w["q_w"], w["q_b"])  # (T, H*hd)
                k = F.linear(h, w["k_w"], w["k_b"])  # (T, KV*hd)
                v = F.linear(h, w["v_w"], w["v_b"])  # (T, KV*hd)
                observe(p + "q", q)
                observe(p + "k", k)
                observe(p + "v", v)
                q = q.view(num_tokens, s.num_heads, s.head_dim).transpose(0, 1)  # (H, T, hd)
                k = k.view(num_tokens, s.num_kv_heads, s.head_dim).transpose(0, 1)  # (KV, T, hd)
                v = v.view(num_tokens, s.num_kv_heads, s.head_dim).transpose(0, 1)  # (KV, T, hd)
                q_rot = q * cos + rotate_half(q) * sin  # (H, T, hd)
                k_rot = k * cos + rotate_half(k) * sin  # (KV, T, hd)
                observe(p + "q_rot", q_rot)
                observe(p + "k_rot", k_rot)
                # GQA: kv head j serves query heads j*group .. (j+1)*group-1.
                k_heads = k_rot.repeat_interleave(s.group, dim=0)  # (H, T, hd)
                v_heads = v.repeat_interleave(s.group, dim=0)  # (H, T, hd)
                scores = torch.matmul(q_rot, k_heads.transpose(1, 2)) * scale  # (H, T, T)
                observe(p + "scores", scores[:, causal])
                probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
                attn = torch.matmul(probs, v_heads)  # (H, T, hd)
                attn = attn.transpose(0, 1).reshape(num_tokens, s.num_heads * s.head_dim)
                observe(p + "attn_out", attn)
                o = F.linear(attn, w["o_w"])  # (T, D)
                observe(p + "o", o)
                x = x + o
                observe("residual", x)

                h = rms_norm(x, w["post_norm"], s.rms_norm_eps)  # (T, D)
                observe(p + "mlp_in", h, per_channel=True)
                gate = F.linear(h, w["gate_w"])  # (T, I)
                up = F.linear(h, w["up_w"])  # (T, I)
                observe(p + "gate", gate)
                observe(p + "up", up)
                act = F.silu(gate) * up  # (T, I)
                observe(p + "act", act, per_channel=True)
                down = F.linear(act, w["down_w"])  # (T, D)
                observe(p + "down", down)
                x = x + down
                observe("residual", x)

            h = rms_norm(x, self.final_norm, s.rms_norm_eps)  # (T, D)
            observe("final_in", h, per_channel=True)
            logits = F.linear(h, self.lm_head)  # (T, V)
            observe("logits", logits)
            return logits.numpy().astype(np.float32, copy=False)

    __call__ = forward


def greedy_generate(
    ref: FloatReference,
    prompt: Sequence[int],
    max_new_tokens: int,
    eos_ids: Iterable[int] = (),
) -> list[int]:
    """Greedy decoding: the new tokens only (prompt excluded), at most max_new_tokens, ending
    with (and including) the first token in eos_ids if one is produced. Each step recomputes
    the full sequence (no cache). Ties go to the lowest token id (np.argmax)."""
    stop = set(eos_ids)
    sequence = list(prompt)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = ref.forward(sequence)
        token = int(np.argmax(logits[-1]))
        generated.append(token)
        sequence.append(token)
        if token in stop:
            break
    return generated
