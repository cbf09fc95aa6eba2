"""`picochat export`: a trained model as one self-contained folder to share or deploy.

    picochat export --out my-chat                      # the newest SFT checkpoint, bf16 weights
    picochat export --source base --run d20 --out d20-base --dtype float32
    picochat chat --checkpoint my-chat                 # chat, serve, eval and bench infer load it like a checkpoint

The folder holds `model.safetensors` (the weights; safetensors, so loading a stranger's model runs no pickle),
`meta.json` (model config, stage, step, metrics and the training config it came from: what `checkpoint.load_model`
reads), `tokenizer/tokenizer.json` (copied, so the folder does not point back into the training machine) and a
`README.md` model card: JSON and safetensors only. No optimizer or loader state: an export is for inference, not for
resuming training. It is written to a temporary folder and renamed into place, so an interrupted export never leaves
a half-written model under the final name.

`--format hf` writes a Hugging Face transformers folder instead (`hf.py` has the layout and the two model types):

    picochat export --format hf --out my-chat-hf --dtype float32
    AutoModelForCausalLM.from_pretrained("my-chat-hf", trust_remote_code=True)   # and AutoTokenizer likewise

The modeling code shipped for `trust_remote_code` is `serving/hf_remote/*.py`, copied into the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from picochat import __version__, hf
from picochat.checkpoint import (STAGES, check_checkpoint, file_checksums, find_run_with_stage, load_model_state,
                                 read_meta, require_tokenizer, seal_meta)
from picochat.config import UserError, add_config_args, check_run_name, config_from_args, require_checkpoint_dir
from picochat.files import atomic_path
from picochat.model import GPTConfig
from picochat.tokenizer import EVAL_SAMPLES, Tokenizer

FORMAT = "picochat-export-1"
FORMATS = ("picochat", "hf")
REMOTE_CODE_DIR = Path(__file__).resolve().parent / "hf_remote"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class ExportConfig:
    out: str = field(default="", metadata={"help": "folder to write (must not exist unless --force)"})
    run: str | None = field(default=None, metadata={"help": "run to export (default: the newest run with --source)"})
    source: str = field(default="sft", metadata={"help": "which stage's checkpoint to export",
                                                 "choices": list(STAGES)})
    checkpoint: str | None = field(default=None, metadata={"help": "explicit checkpoint directory (overrides --run)"})
    dtype: str = field(default="bfloat16", metadata={"help": "weight dtype in the file (bfloat16 halves the size; "
                                                             "GPUs run bf16 anyway)", "choices": list(DTYPES)})
    force: bool = field(default=False, metadata={"help": "replace an existing --out folder"})
    format: str = field(default="picochat", metadata={"help": "picochat (loads in picochat) or hf (loads in Hugging "
                                                              "Face transformers >= 5, and in picochat)",
                                                      "choices": list(FORMATS)})


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, ExportConfig)


def _shareable(meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's metadata without what identifies the training machine: its hostname, install paths, and
    absolute paths in the configs (kept as their last component, e.g. the data folder's name)."""
    def scrub(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: scrub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [scrub(x) for x in v]
        if isinstance(v, str) and os.path.isabs(v):
            return Path(v).name
        return v

    # the training checkpoint's checksums describe its files, not the export's (which records its own)
    dropped = ("parent", "checkpoint_dir", "checksums", "meta_checksum")
    out = {k: scrub(v) for k, v in meta.items() if k not in dropped}
    if isinstance(out.get("env"), dict):
        out["env"] = {k: v for k, v in out["env"].items() if k not in ("hostname", "torch_path")}
    return out


def _model_card(meta: dict[str, Any], n_params: int, dtype: str, name: str) -> str:
    mc = meta["model_config"]
    metrics = {k: v for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float)) and k != "step"}
    lines = [f"# {name}", "",
             f"A picochat model: stage `{meta.get('stage')}` of run `{meta.get('run')}`, step {meta.get('step')}, "
             f"exported {time.strftime('%Y-%m-%d', time.gmtime())} with picochat {meta.get('picochat_version')}.", "",
             "| | |", "|---|---|",
             f"| parameters | {n_params:,} |",
             f"| layers x width | {mc.get('n_layer')} x {mc.get('n_embd')} ({mc.get('n_head')} heads) |",
             f"| context | {mc.get('sequence_len')} tokens |",
             f"| vocabulary | {mc.get('vocab_size')} |",
             f"| weights | {dtype}, model.safetensors |"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    lines += ["", "Use it with picochat:", "", "```",
              f"picochat chat --checkpoint {name}", f"picochat serve --checkpoint {name}",
              f"picochat eval chat --checkpoint {name}", "```", ""]
    return "\n".join(lines)


def run(cfg: ExportConfig) -> dict[str, Any]:
    """Export one checkpoint to `cfg.out`; returns what was written."""
    if not cfg.out:
        raise UserError("--out: give the folder to write the model to, e.g. --out my-chat")
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise UserError(f"--out {out}: already exists; choose another folder or add --force to replace it")
    if cfg.format not in FORMATS:
        raise UserError(f"--format {cfg.format!r}: expected one of {', '.join(FORMATS)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; --force replaces a folder, not a file: choose another --out")
    if cfg.run:
        check_run_name(cfg.run)
    ckpt = require_checkpoint_dir(cfg.checkpoint) if cfg.checkpoint else find_run_with_stage(cfg.source, cfg.run)[1]
    if hf.is_hf_folder(ckpt):
        raise UserError(f"--checkpoint {ckpt}: already an exported Hugging Face folder; load it directly "
                        f"(--checkpoint {ckpt}) or export from the training checkpoint")
    o, c = out.resolve(), Path(ckpt).resolve()
    if o == c or o in c.parents or c in o.parents:  # --force would replace (delete) the checkpoint itself
        raise UserError(f"--out {out}: overlaps the checkpoint being exported ({ckpt}); choose a folder outside it")
    check_checkpoint(ckpt, {"model.pt", "model.safetensors"})
    meta = read_meta(ckpt)
    if "model_config" not in meta:
        raise UserError(f"{ckpt}/meta.json: no model_config; not a model checkpoint picochat can export")
    require_tokenizer(ckpt, meta)
    tok_dir = Path(meta["tokenizer_dir"])
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"{ckpt}: its tokenizer {tok_dir} is missing (tokenizer.json); the export needs it")
    dtype = DTYPES[cfg.dtype]
    state = {k.removeprefix("_orig_mod."): v for k, v in load_model_state(ckpt).items()}
    if cfg.format == "hf":
        return _run_hf(cfg, out, ckpt, meta, state, tok_dir)
    # safetensors stores each tensor contiguous and refuses shared storage; floating tensors take the export dtype
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    n_params = sum(v.numel() for v in tensors.values())
    exported = _shareable(dict(meta, format=FORMAT, tokenizer_dir="tokenizer", dtype=cfg.dtype,
                               picochat_version=__version__))

    with atomic_path(out, directory=True) as tmp:  # --force: the new folder is swapped in, then the old one dropped
        safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"),
                                    metadata={"format": "pt", "picochat": FORMAT})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask)  # readable like the other files, for sharing
        (tmp / "tokenizer").mkdir()
        # tokenizer.json is all that loading needs (token_bytes.pt is derived from it and is a pickle)
        shutil.copy2(tok_dir / "tokenizer.json", tmp / "tokenizer" / "tokenizer.json")
        exported["checksums"] = file_checksums(tmp, ["model.safetensors", "tokenizer/tokenizer.json"])
        (tmp / "meta.json").write_text(seal_meta(exported))
        (tmp / "README.md").write_text(_model_card(exported, n_params, cfg.dtype, out.name))
    size = (out / "model.safetensors").stat().st_size
    return {"export": str(out), "checkpoint": str(ckpt), "stage": meta.get("stage"), "step": meta.get("step"),
            "params": n_params, "dtype": cfg.dtype, "bytes": size}


def _hf_card(meta: dict[str, Any], n_params: int, dtype: str, name: str, builtin: list[str]) -> str:
    remote = ", trust_remote_code=True" if builtin else ""
    kind = (f"our own `picochat` model type (`modeling_picochat.py`, needed for: {', '.join(builtin)})" if builtin
            else "transformers' built-in `nanochat` model type (no remote code)")
    return "\n".join([
        f"# {name}", "",
        f"A picochat model ({n_params:,} parameters, {dtype}): stage `{meta.get('stage')}` of run `{meta.get('run')}`, "
        f"step {meta.get('step')}, in Hugging Face transformers format as {kind}.", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})',
        f'tok = AutoTokenizer.from_pretrained("{name}"{remote})',
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,',
        '                              return_tensors="pt", return_dict=True)',
        "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
        'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
        f"picochat loads the folder too: `picochat chat --checkpoint {name}`.", ""])


def _check_tokenizer(tok: Tokenizer, payload: str) -> None:
    """The exported tokenizer.json must give picochat's ids: checked on fixed samples before anything is written."""
    from tokenizers import Tokenizer as HFTokenizer

    hf_tok = HFTokenizer.from_str(payload)
    hf_tok.encode_special_tokens = True  # special-token text is plain text, as in picochat's encode
    for text in [*EVAL_SAMPLES.values(), "naïve café 東京 🤗  \t\n\r\n 12345 <|bos|>"]:
        got, want = hf_tok.encode(text, add_special_tokens=False).ids, tok.encode(text)
        if got != want:
            raise RuntimeError(f"export: tokenizer.json encodes {text[:40]!r} differently from picochat "
                               f"({got[:8]} vs {want[:8]}); this is a bug in picochat's exporter")


def _run_hf(cfg: ExportConfig, out: Path, ckpt: Path, meta: dict[str, Any], state: dict[str, torch.Tensor],
            tok_dir: Path) -> dict[str, Any]:
    """--format hf: the transformers folder described in hf.py, written atomically like the picochat format."""
    mcfg = GPTConfig.from_saved(meta["model_config"])
    tok = Tokenizer.load(tok_dir, expect_vocab_size=mcfg.vocab_size)
    blockers = hf.builtin_blockers(mcfg, state)
    tensors = {k: (v.to(DTYPES[cfg.dtype]) if v.is_floating_point() else v).contiguous().clone()
               for k, v in hf.to_hf_state(mcfg, state, builtin=not blockers).items()}
    n_params = sum(v.numel() for v in tensors.values())
    tok_payload = hf.tokenizer_json(tok, str(tok_dir / "tokenizer.json"))
    _check_tokenizer(tok, tok_payload)
    info = _shareable(dict(meta, format="hf", dtype=cfg.dtype, picochat_version=__version__,
                           hf_model_type=hf.BUILTIN_TYPE if not blockers else hf.REMOTE_TYPE))
    info.pop("tokenizer_dir", None)
    files = {"config.json": json.dumps(hf.hf_config(mcfg, tok, not blockers, cfg.dtype), indent=2),
             "generation_config.json": json.dumps(hf.generation_config(tok), indent=2),
             "tokenizer.json": tok_payload,
             "tokenizer_config.json": json.dumps(hf.tokenizer_config(mcfg), indent=2),
             "chat_template.jinja": hf.CHAT_TEMPLATE,
             "picochat.json": json.dumps(info, indent=2, default=str),
             "README.md": _hf_card(info, n_params, cfg.dtype, out.name, blockers)}
    with atomic_path(out, directory=True) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if blockers:
            for name in hf.REMOTE_FILES:
                shutil.copyfile(REMOTE_CODE_DIR / name, tmp / name)
    return {"export": str(out), "checkpoint": str(ckpt), "stage": meta.get("stage"), "step": meta.get("step"),
            "params": n_params, "dtype": cfg.dtype, "bytes": (out / "model.safetensors").stat().st_size,
            "format": "hf", "hf_model_type": info["hf_model_type"], "remote_code_for": blockers}


def cli_main(args: argparse.Namespace) -> int:
    res = run(config_from_args(ExportConfig, args))
    print(f"[export] {res['checkpoint']} -> {res['export']} ({res['params']:,} params, {res['dtype']}, "
          f"{res['bytes'] / 1e6:.1f} MB); load it with --checkpoint {res['export']}")
    if res.get("format") == "hf":
        remote = (f", trust_remote_code=True (needed for {', '.join(res['remote_code_for'])})"
                  if res["remote_code_for"] else " (built-in nanochat type)")
        print(f"[export] transformers: AutoModelForCausalLM.from_pretrained({res['export']!r}{remote})")
    print(json.dumps(res))
    return 0
