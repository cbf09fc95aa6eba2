"""transformers modeling code of a picochat model (`PicochatForCausalLM`), shipped next to an exported model's
config.json for `trust_remote_code=True`. Self-contained: it imports torch and transformers only, never picochat,
and computes what picochat's `model.GPT.forward` computes (tested to 1e-4 in fp32):

    x = rms_norm(embed(ids)); optionally smear it; x0 = x
    per layer i:  x = resid_lambdas[i] * x + x0_lambdas[i] * x0
                  x = x + attn(rms_norm(x))   (value embedding on some layers, RoPE then QK-norm, GQA, window)
                  x = x + fc2(relu(fc1(rms_norm(x)))^2)
    optionally x -= backout_lambda * (x after layer L // 2); logits = cap * tanh(lm_head(rms_norm(x)) / cap) in fp32

Attention is written out here (SDPA with an explicit boolean mask) rather than through transformers' pluggable
attention and mask helpers: their signatures changed within the v5 line, and per-layer windows plus padding fit in
one mask. The KV cache is transformers' own (`cache.update(k, v, layer)`), so `generate()` works as usual.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_picochat import PicochatConfig

# transformers renamed the cache argument and output field from `past_key_values` to `cache` within v5
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))  # no weight; eps = the dtype's epsilon, as picochat


def rotate(x, cos, sin):
    """picochat's RoPE: (x1, x2) halves -> (x1 cos + x2 sin, x2 cos - x1 sin), i.e. rotation by -theta."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class PicochatAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        has_ve = layer in config.value_embed_layers
        self.ve_gate = nn.Linear(min(config.ve_gate_channels, d), self.n_kv_head, bias=False) if has_ve else None
        self.ve_gate_scale = config.ve_gate_scale

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = rms_norm(rotate(q, cos, sin)), rms_norm(rotate(k, cos, sin))  # RoPE, then QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        if self.n_kv_head != self.n_head:  # query head h reads kv head h // group
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class PicochatMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)).square())


class PicochatLayer(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.self_attn = PicochatAttention(config, layer)
        self.mlp = PicochatMLP(config)

    def forward(self, x, ve, cos, sin, mask, cache):
        x = x + self.self_attn(rms_norm(x), ve, cos, sin, mask, cache)
        return x + self.mlp(rms_norm(x))


class PicochatPreTrainedModel(PreTrainedModel):
    config_class = PicochatConfig
    base_model_prefix = "model"
    _no_split_modules = ["PicochatLayer"]
    _supports_cache_class = True

    # no _init_weights: from_pretrained loads every tensor, and transformers' default covers Linear/Embedding of
    # a model built from a config alone (the scalars start at identity from __init__)


class PicochatModel(PicochatPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        d, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
        kv_dim = config.num_key_value_heads * config.head_dim
        self.embed_tokens = nn.Embedding(V, d)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embed_layers})
        self.layers = nn.ModuleList([PicochatLayer(config, i) for i in range(L)])
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(min(config.smear_channels, d), 1, bias=False) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _smear(self, e, input_ids, valid, past, prev_token_ids, cache):
        """e_t + lambda * sigmoid(W e_t[:24]) * e_{t-1} on the normed embeddings; the first token (and the first
        after left padding) gets nothing. With a cache, e_{-1} of this chunk comes from the previous token id."""
        gate = self.smear_lambda.to(e.dtype) * torch.sigmoid(self.smear_gate(e[..., : self.smear_gate.in_features]))
        if past == 0:
            prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        else:
            if prev_token_ids is None:
                prev_token_ids = getattr(cache, "picochat_last_ids", None)
            if prev_token_ids is None:
                raise ValueError("smear: decoding after cached tokens needs `prev_token_ids` (the token before this "
                                 "chunk); generate() passes it")
            first = rms_norm(self.embed_tokens(prev_token_ids.reshape(-1, 1)).to(e.dtype))
            prev = torch.cat([first, e[:, :-1]], dim=1)
        # no smear into a token whose previous position is padding or before the sequence start
        prev_ok = valid[:, past - 1: past - 1 + e.shape[1]] if past > 0 else \
            torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :e.shape[1] - 1]], dim=1)
        if cache is not None:
            cache.picochat_last_ids = input_ids[:, -1:]
        return e + gate * prev * prev_ok[..., None].to(e.dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                inputs_embeds=None, use_cache=None, prev_token_ids=None, **kwargs):
        if input_ids is None:
            raise ValueError("PicochatModel needs input_ids (value embeddings and smear read the token ids)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        L = past + T
        if attention_mask is None:
            valid = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
        else:
            if attention_mask.dim() != 2:
                raise ValueError("PicochatModel takes a 2-D attention_mask (batch, past + new tokens) only")
            valid = attention_mask[:, -L:].bool()
        # positions count real tokens only, so left-padded rows see the same positions as unpadded ones
        pos_all = (valid.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = pos_all[:, past:]
        # RoPE tables computed here, not kept as a buffer: from_pretrained builds the model on the meta device and
        # would leave a non-persistent buffer uninitialised
        hd = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32,
                                                                   device=input_ids.device) / hd))
        freqs = position_ids.float()[..., None] * inv_freq
        dtype = self.embed_tokens.weight.dtype
        cos, sin = freqs.cos()[:, :, None, :].to(dtype), freqs.sin()[:, :, None, :].to(dtype)

        x = rms_norm(self.embed_tokens(input_ids))
        if self.smear_gate is not None:
            x = self._smear(x, input_ids, valid, past, prev_token_ids, cache)
        x0 = x
        # masks: query index past+i sees key j when j <= past+i, key j is not padding, and it lies in the window
        qi = torch.arange(past, L, device=x.device)[:, None]
        kj = torch.arange(L, device=x.device)[None, :]
        base = (kj <= qi)[None] & valid[:, None, :]
        masks = {}
        for w in set(self.config.layer_windows):
            m = base if w is None else base & (pos_all[:, past:, None] - pos_all[:, None, :] < w)
            masks[w] = (m | (kj == qi)[None])[:, None]  # a padding query sees itself: no empty softmax rows
        x_mid = None
        mid = self.config.num_hidden_layers // 2
        for i, layer in enumerate(self.layers):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = layer(x, ve, cos, sin, masks[self.config.layer_windows[i]], cache)
            if i == mid:
                x_mid = x
        if self.backout_lambda is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        return rms_norm(x), cache


class PicochatForCausalLM(PicochatPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = PicochatModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs.get("input_ids")
        if self.config.smear and new is not None and input_ids.shape[1] > new.shape[1]:
            n = new.shape[1]
            inputs["prev_token_ids"] = input_ids[:, -n - 1: -n]  # the smear's previous token (reordered with beams)
        return inputs

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, prev_token_ids=None, **kwargs):
        hidden, cache = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, cache=cache, use_cache=use_cache,
                                   prev_token_ids=prev_token_ids)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()  # softcap in fp32, as picochat
        cap = self.config.final_logit_softcapping
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
