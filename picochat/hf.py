"""The Hugging Face transformers format: what `picochat export --format hf` writes, and reading such a folder back.

A folder holds `config.json`, `generation_config.json`, `model.safetensors` (transformers' tensor names),
`tokenizer.json` (the `tokenizers` library's schema), `tokenizer_config.json`, `chat_template.jinja` and, when the
model needs them, `configuration_picochat.py` + `modeling_picochat.py` (package data in `serving/hf_remote/`).

Two model types:
- transformers' built-in `nanochat` (v5) when the checkpoint is exactly that architecture: no value embeddings, no
  smear, no backout, full attention in every layer, and residual scalars at identity (every resid lambda 1, every x0
  lambda 0). The built-in class has none of those, so anything else would load "fine" and compute another model.
  Training moves the residual scalars, so a picochat-trained model practically always takes the second type.
- `picochat` (our configuration + modeling code, `trust_remote_code=True`) otherwise: every feature of `model.GPT`.

Both use the same tensor names (the built-in type's, plus ours for the extra tensors), with the vocabulary rows
sliced to the real vocab (picochat pads to a multiple of 64 and slices its logits: the same model). The tokenizer is
exact for every string: byte-level BPE whose merges are recovered from the tiktoken ranks, our split regex, and our
special tokens at the same ids. One convention differs by default: transformers turns special-token text typed in a
string (say "<|bos|>") into the special id, picochat never does; `tokenizer(text, split_special_tokens=True)` and
`apply_chat_template(..., sanitize_control_tokens=True)` (in transformers 5.25; not in every 5.x) give picochat's ids
exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from picochat.config import UserError, to_dict
from picochat.model import SMEAR_CHANNELS, GPTConfig, build_model
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer, _bytes_to_unicode

BUILTIN_TYPE = "nanochat"
REMOTE_TYPE = "picochat"
REMOTE_FILES = ("configuration_picochat.py", "modeling_picochat.py")
VE_GATE_CHANNELS = 12  # the value-embedding gate reads this many leading channels (model.CausalSelfAttention)
EOS_TOKENS = ("<|assistant_end|>", "<|bos|>")  # where picochat's engine stops a reply

# picochat name -> transformers name (the built-in nanochat type's names, and ours in the same style)
_RENAMES = [
    (r"^wte\.weight$", "model.embed_tokens.weight"),
    (r"^value_embeds\.(\d+)\.weight$", r"model.value_embeds.\1.weight"),
    (r"^blocks\.(\d+)\.attn\.c_q\.weight$", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"^blocks\.(\d+)\.attn\.c_k\.weight$", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"^blocks\.(\d+)\.attn\.c_v\.weight$", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"^blocks\.(\d+)\.attn\.c_proj\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^blocks\.(\d+)\.attn\.ve_gate\.weight$", r"model.layers.\1.self_attn.ve_gate.weight"),
    (r"^blocks\.(\d+)\.mlp\.c_fc\.weight$", r"model.layers.\1.mlp.fc1.weight"),
    (r"^blocks\.(\d+)\.mlp\.c_proj\.weight$", r"model.layers.\1.mlp.fc2.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^(resid_lambdas|x0_lambdas|smear_gate\.weight|smear_lambda|backout_lambda)$", r"model.\1"),
]
_VOCAB_ROWS = re.compile(r"^(wte|value_embeds\.\d+|lm_head)\.weight$")


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for pat, rep in table:
        if re.match(pat, name):
            return re.sub(pat, rep, name)
    raise KeyError(name)


# transformers name -> picochat name
_INVERSE = [
    (r"^model\.embed_tokens\.weight$", "wte.weight"),
    (r"^model\.value_embeds\.(\d+)\.weight$", r"value_embeds.\1.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$", r"blocks.\1.attn.c_q.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$", r"blocks.\1.attn.c_k.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$", r"blocks.\1.attn.c_v.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$", r"blocks.\1.attn.c_proj.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.ve_gate\.weight$", r"blocks.\1.attn.ve_gate.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.fc1\.weight$", r"blocks.\1.mlp.c_fc.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.fc2\.weight$", r"blocks.\1.mlp.c_proj.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^model\.(resid_lambdas|x0_lambdas|smear_gate\.weight|smear_lambda|backout_lambda)$", r"\1"),
]


# ----------------------------------------------------------------------------------------------------------------
# Model: which type, config.json, tensors


def builtin_blockers(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """Why this checkpoint is not exactly transformers' built-in nanochat model; empty when it is."""
    out = []
    if cfg.value_embeds:
        out.append("value embeddings")
    if cfg.smear:
        out.append("smear")
    if cfg.backout:
        out.append("backout")
    if any(w is not None for w in cfg.window_sizes()):
        out.append(f"sliding windows ({cfg.window_pattern})")
    if not torch.all(state["resid_lambdas"] == 1) or not torch.all(state["x0_lambdas"] == 0):
        out.append("trained residual scalars (resid/x0 lambdas)")
    return out


def hf_config(cfg: GPTConfig, tok: Tokenizer, builtin: bool, dtype: str) -> dict[str, Any]:
    sp = tok.special_tokens
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "max_position_embeddings": cfg.sequence_len, "final_logit_softcapping": cfg.softcap,
        "bos_token_id": sp["<|bos|>"], "eos_token_id": [sp[t] for t in EOS_TOKENS],
        "pad_token_id": sp["<|assistant_end|>"], "tie_word_embeddings": False, "dtype": dtype,
    }
    if builtin:
        return {"model_type": BUILTIN_TYPE, "architectures": ["NanoChatForCausalLM"], **common,
                "intermediate_size": 4 * cfg.n_embd, "hidden_act": "relu2", "attention_bias": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
                # picochat's parameter-free RMSNorm uses the dtype's epsilon; this is fp32's
                "rms_norm_eps": torch.finfo(torch.float32).eps}
    return {"model_type": REMOTE_TYPE, "architectures": ["PicochatForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_picochat.PicochatConfig",
                         "AutoModelForCausalLM": "modeling_picochat.PicochatForCausalLM"},
            **common, "rope_theta": cfg.rope_base, "layer_windows": cfg.window_sizes(),
            "value_embed_layers": [i for i in range(cfg.n_layer) if cfg.has_value_embed(i)],
            "ve_gate_scale": cfg.ve_gate_scale, "ve_gate_channels": VE_GATE_CHANNELS, "smear": cfg.smear,
            "smear_channels": SMEAR_CHANNELS, "backout": cfg.backout}


def to_hf_state(cfg: GPTConfig, state: dict[str, torch.Tensor], builtin: bool) -> dict[str, torch.Tensor]:
    """picochat tensors -> transformers names, vocab rows sliced to the real vocab (the padding is never read)."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("_orig_mod.")
        if builtin and k in ("resid_lambdas", "x0_lambdas"):
            continue  # identity (checked by builtin_blockers): the built-in class has no such tensors
        out[_rename(k, _RENAMES)] = v[: cfg.vocab_size] if _VOCAB_ROWS.match(k) else v
    return out


def from_hf_state(cfg: GPTConfig, hf_state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """transformers tensors -> picochat names, vocab rows zero-padded back to a multiple of 64."""
    out = {}
    for k, v in hf_state.items():
        try:
            name = _rename(k, _INVERSE)
        except KeyError:
            raise UserError(f"{where}: unknown tensor {k!r} in model.safetensors; not a picochat or nanochat "
                            f"model that picochat can load") from None
        if _VOCAB_ROWS.match(name) and v.shape[0] < cfg.padded_vocab_size:
            v = torch.cat([v, v.new_zeros(cfg.padded_vocab_size - v.shape[0], *v.shape[1:])])
        out[name] = v
    out.setdefault("resid_lambdas", torch.ones(cfg.n_layer))
    out.setdefault("x0_lambdas", torch.zeros(cfg.n_layer))
    return out


def gpt_config_from_hf(c: dict[str, Any], where: Path) -> GPTConfig:
    """The GPTConfig an HF config.json describes (our type, or the built-in nanochat type); UserError otherwise."""
    kind = c.get("model_type")
    if kind not in (BUILTIN_TYPE, REMOTE_TYPE):
        raise UserError(f"{where}: model_type {kind!r}; picochat loads only '{REMOTE_TYPE}' and '{BUILTIN_TYPE}' "
                        f"models (export one with `picochat export --format hf`)")
    try:
        d, L = int(c["hidden_size"]), int(c["num_hidden_layers"])
        rope = (c.get("rope_parameters") or {}).get("rope_theta") or c.get("rope_theta") or 10000.0
        base = dict(sequence_len=int(c["max_position_embeddings"]), vocab_size=int(c["vocab_size"]), n_layer=L,
                    n_head=int(c["num_attention_heads"]),
                    n_kv_head=int(c.get("num_key_value_heads") or c["num_attention_heads"]), n_embd=d,
                    softcap=float(c["final_logit_softcapping"]), rope_base=float(rope))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: config.json lacks or garbles {e}; re-export the model") from None
    if kind == BUILTIN_TYPE:
        unsupported = [f"{k}={c.get(k)!r}" for k, ok in (
            ("intermediate_size", c.get("intermediate_size", 4 * d) == 4 * d),
            ("hidden_act", c.get("hidden_act", "relu2") == "relu2"),
            ("attention_bias", not c.get("attention_bias")),
            ("tie_word_embeddings", not c.get("tie_word_embeddings"))) if not ok]
        if unsupported:
            raise UserError(f"{where}: a nanochat model picochat's architecture cannot run: {', '.join(unsupported)}")
        cfg = GPTConfig(**base, window_pattern="L", value_embeds=False, smear=False, backout=False)
    else:
        windows = c.get("layer_windows") or [None] * L
        ve_layers = list(c.get("value_embed_layers") or [])
        cfg = GPTConfig(**base, window_pattern="".join("L" if w is None else "S" for w in windows) or "L",
                        value_embeds=bool(ve_layers), smear=bool(c.get("smear")), backout=bool(c.get("backout")),
                        ve_gate_scale=float(c.get("ve_gate_scale", 2.0)))
        if cfg.window_sizes() != windows or [i for i in range(L) if cfg.has_value_embed(i)] != ve_layers:
            raise UserError(f"{where}: layer_windows / value_embed_layers in config.json are not a layout picochat "
                            f"builds; re-export the model")
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def _merges(ranks: dict[bytes, int], where: str) -> list[tuple[bytes, bytes]]:
    """The BPE merge that makes each multi-byte token: run BPE on its bytes with only lower ranks until two parts
    remain. Ordered by the token's rank, which is the merge priority in both tiktoken and `tokenizers`."""
    out = []
    for token, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(((ranks.get(parts[i] + parts[i + 1], r), i) for i in range(len(parts) - 1)))
            if best[0] >= r:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise UserError(f"{where}: token {token!r} (rank {r}) is not a merge of two lower-ranked tokens, so it "
                            f"has no byte-level BPE form; retrain the tokenizer with `picochat tokenizer train`")
        out.append((parts[0], parts[1]))
    return out


def tokenizer_json(tok: Tokenizer, where: str = "tokenizer") -> str:
    """tokenizer.json in the `tokenizers` schema, giving tiktoken's ids for every string (specials appended)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if sorted(tok.mergeable_ranks.values()) != list(range(len(tok.mergeable_ranks))) or \
            any(tok.mergeable_ranks.get(bytes([b])) is None for b in range(256)):
        raise UserError(f"{where}: ranks are not 0..n-1 with every single byte present; not a byte-level BPE")
    u = _bytes_to_unicode()
    text = lambda b: "".join(u[x] for x in b)  # noqa: E731
    vocab = {text(b): r for b, r in tok.mergeable_ranks.items()}
    merges = [(text(a), text(b)) for a, b in _merges(tok.mergeable_ranks, where)]
    # ignore_merges: a whole pre-token already in the vocab is emitted as is, as tiktoken does
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(tok.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for t in SPECIAL_TOKENS:  # ids are appended in order: they must land where picochat has them
        assert hf.token_to_id(t) == tok.special_tokens[t], t
    return hf.to_str(pretty=False)


def tokenizer_from_json(path: Path) -> Tokenizer:
    """picochat's Tokenizer from a `tokenizers`-schema tokenizer.json (a byte-level BPE with our special tokens)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        model, pre = payload["model"], payload["pre_tokenizer"]
        splits = [p for p in (pre.get("pretokenizers") or [pre]) if p.get("type") == "Split"]
        pattern = splits[0]["pattern"]["Regex"]
        decode = {c: b for b, c in _bytes_to_unicode().items()}
        ranks = {bytes(decode[ch] for ch in s): int(i) for s, i in model["vocab"].items()}
        added = {t["content"]: int(t["id"]) for t in payload.get("added_tokens", [])}
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{path}: not a byte-level BPE tokenizer.json picochat can read ({type(e).__name__}: {e})") \
            from None
    n = len(ranks)
    want = {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}
    if model.get("type") != "BPE" or sorted(ranks.values()) != list(range(n)) or \
            any(added.get(t) != i for t, i in want.items()):
        raise UserError(f"{path}: not picochat's tokenizer layout (byte-level BPE ranks 0..{n - 1}, then the special "
                        f"tokens {', '.join(SPECIAL_TOKENS)} in that order)")
    return Tokenizer(ranks, pattern=pattern)


# Our conversation format (conversation.render / render_for_completion) as Jinja. A leading system message is merged
# into the first user turn with a blank line; assistant content is a string or parts (text, python, python_output).
# Each text segment is tokenized on its own between special tokens, as picochat does (two adjacent assistant text
# parts are one segment here, two in picochat: the only case where ids can differ).
CHAT_TEMPLATE = (
    "{%- macro text(c) -%}{%- if c is string -%}{{- c -}}{%- else -%}{%- for p in c -%}{{- p['text'] -}}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{{- '<|bos|>' -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- if not loop.first or messages|length < 2 or messages[1]['role'] != 'user' -%}"
    "{{- raise_exception('a system message is allowed only first, before a user message') -}}{%- endif -%}"
    "{%- elif m['role'] == 'user' -%}"
    "{{- '<|user_start|>' -}}"
    "{%- if loop.index0 == 1 and messages[0]['role'] == 'system' -%}{{- text(messages[0]['content']) + '\\n\\n' -}}"
    "{%- endif -%}{{- text(m['content']) -}}{{- '<|user_end|>' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'python' -%}{{- '<|python_start|>' + p['text'] + '<|python_end|>' -}}"
    "{%- elif p['type'] == 'python_output' -%}{{- '<|output_start|>' + p['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- else -%}{{- raise_exception('roles are system (first only), user and assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def tokenizer_config(cfg: GPTConfig) -> dict[str, Any]:
    # no post-processor: tokenizer(text) adds nothing, as picochat's encode; the chat template writes <|bos|>
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
            "pad_token": "<|assistant_end|>", "model_max_length": cfg.sequence_len,
            "clean_up_tokenization_spaces": False, "split_special_tokens": False}


def generation_config(tok: Tokenizer) -> dict[str, Any]:
    sp = tok.special_tokens
    return {"bos_token_id": sp["<|bos|>"], "eos_token_id": [sp[t] for t in EOS_TOKENS],
            "pad_token_id": sp["<|assistant_end|>"]}


# ----------------------------------------------------------------------------------------------------------------
# Reading a folder back (`--checkpoint DIR` anywhere in picochat)


def is_hf_folder(path: Path) -> bool:
    """An HF-format model folder (config.json) that is not a picochat checkpoint or export (meta.json)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "meta.json").is_file()


def load_hf(path: Path, device: torch.device | str = "cpu"
            ) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer, dict[str, Any]]:
    """(config, picochat state dict, tokenizer, meta) of an HF-format folder of either model type."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        c = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}/config.json: unreadable ({e}); re-export the model") from None
    cfg = gpt_config_from_hf(c if isinstance(c, dict) else {}, path / "config.json")
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"{tok_path}: missing; an HF model folder needs its tokenizer.json")
    tok = tokenizer_from_json(tok_path)
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(f"{tok_path}: vocab {tok.vocab_size} but config.json says {cfg.vocab_size}; re-export")
    st = path / "model.safetensors"
    if not st.is_file():
        raise UserError(f"{st}: missing (sharded or .bin weights are not supported); re-export the model")
    try:
        hf_state = load_file(str(st), device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated/corrupt files
        raise UserError(f"{st}: unreadable ({type(e).__name__}: {e}); re-export the model") from None
    state = from_hf_state(cfg, hf_state, st)
    meta: dict[str, Any] = {}
    info = path / "picochat.json"  # provenance written by `picochat export --format hf`, when present
    if info.is_file():
        try:
            meta = json.loads(info.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
    meta = dict(meta if isinstance(meta, dict) else {}, model_config=to_dict(cfg), tokenizer_dir=str(path),
                format=f"hf-{c.get('model_type')}")
    return cfg, state, tok, meta


def load_model(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """`checkpoint.load_model` for an HF-format folder: (model, tokenizer, meta)."""
    cfg, state, tok, meta = load_hf(path, device)
    model = build_model(cfg, device=device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}/model.safetensors: tensors do not match config.json ({str(e).splitlines()[0]}); "
                        f"re-export the model") from None
    if dtype is not None:
        model.set_compute_dtype(dtype)
    model.eval()
    return model, tok, meta
