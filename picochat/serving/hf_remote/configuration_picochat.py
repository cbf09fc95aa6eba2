"""transformers configuration of a picochat model (`model_type: picochat`), shipped next to an exported model's
config.json for `trust_remote_code=True`. Self-contained: it imports transformers only, never picochat.

Field names follow transformers' built-in `nanochat` type where the meaning is the same (hidden_size,
num_key_value_heads, final_logit_softcapping, ...); the rest are picochat's, resolved per layer by the exporter so
the modeling code needs no copy of picochat's rules:
- `layer_windows`: per layer, the sliding attention window in tokens (a query at position p sees keys at positions
  p - window < k <= p), or null for full causal attention.
- `value_embed_layers`: the layers that add a value embedding (with a gate `ve_gate_scale * sigmoid(W x[:12])`).
- `smear`: add a gated previous-token embedding to each token's normed embedding.
- `backout`: subtract `backout_lambda` times the residual after layer `num_hidden_layers // 2` before the final norm.
"""

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x spelling
    from transformers import PretrainedConfig as PreTrainedConfig


class PicochatConfig(PreTrainedConfig):
    model_type = "picochat"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size=32768, hidden_size=768, num_hidden_layers=12, num_attention_heads=6,
                 num_key_value_heads=None, max_position_embeddings=2048, rope_theta=100000.0,
                 final_logit_softcapping=15.0, layer_windows=None, value_embed_layers=None, ve_gate_scale=2.0,
                 ve_gate_channels=12, smear=False, smear_channels=24, backout=False, initializer_range=0.02,
                 use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.final_logit_softcapping = final_logit_softcapping
        self.layer_windows = list(layer_windows) if layer_windows is not None else [None] * num_hidden_layers
        self.value_embed_layers = list(value_embed_layers or [])
        self.ve_gate_scale = ve_gate_scale
        self.ve_gate_channels = ve_gate_channels
        self.smear = smear
        self.smear_channels = smear_channels
        self.backout = backout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
