"""Checkpoints: atomic, self-describing, enough to resume exactly.

Layout of one stage of one run (`PICOCHAT_HOME/runs/<run>/<stage>/`):

    checkpoints/step_000100/
        meta.json          step, stage, resolved config, model config, tokenizer dir, world size, metrics
        model.pt           model state_dict (rank 0; fp32 master weights)
        optim_rank0.pt     this rank's optimizer state (one file per rank)
        state_rank0.pt     this rank's loader state and RNG states (one file per rank)
    metrics.jsonl          one JSON object per logged step / eval
    run.json               run header: resolved config, versions, hardware, git SHA

A checkpoint is written into `step_XXXXXX.tmp` and renamed into place only once every rank's files are on disk, so a
crash during save leaves the previous checkpoint as the latest loadable one. `latest_checkpoint` never returns a
`.tmp` directory. Only the newest `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from picochat import hf
from picochat.config import UserError
from picochat.files import atomic_path, atomic_write_text, replace_dir
from picochat.model import GPTConfig, build_model
from picochat.runtime import barrier, get_rank, get_world_size, picochat_home, stage_dir
from picochat.tokenizer import Tokenizer

STAGES = ("base", "mid", "sft", "rl")


def checkpoints_dir(run: str, stage: str) -> Path:
    return stage_dir(run, stage) / "checkpoints"


def _step_name(step: int) -> str:
    return f"step_{step:06d}"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model_state: dict[str, torch.Tensor] | None,
    optim_state: dict[str, Any] | None,
    meta: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Collective: every rank calls it. Rank 0 writes model + meta; each rank writes its optimizer and state files.

    `model_state` is only needed on rank 0. Returns the final checkpoint directory.
    """
    rank, world = get_rank(), get_world_size()
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / _step_name(step)
    tmp = ckpt_root / (_step_name(step) + ".tmp")
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    if optim_state is not None:
        _atomic_torch_save(optim_state, tmp / f"optim_rank{rank}.pt")
    if rank_state is not None:
        _atomic_torch_save(rank_state, tmp / f"state_rank{rank}.pt")
    if rank == 0:
        assert model_state is not None, "rank 0 must pass the model state"
        _atomic_torch_save(model_state, tmp / "model.pt")
        meta = dict(meta, step=step, world_size=world, saved_at=time.time())
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, default=str))
    barrier()
    if rank == 0:
        # the tmp name is shared by every rank (the barriers above), so it is not files.atomic_path's per-process
        # one; re-saving a step (a final save right after a periodic one) swaps the folders
        replace_dir(tmp, final)
        prune_checkpoints(ckpt_root, keep_last)
    barrier()
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit() and (p / "meta.json").exists():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[5:]))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(ckpt_root)
    for p in ckpts[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(ckpt_root).glob("step_*.tmp"):  # leftovers of a crashed save
        shutil.rmtree(p, ignore_errors=True)


def read_meta(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's meta.json. A relative tokenizer_dir (an exported model's `tokenizer/`) is resolved against the
    checkpoint directory."""
    path = Path(ckpt) / "meta.json"
    try:
        meta = json.loads(path.read_text())
        tok = meta.get("tokenizer_dir") if isinstance(meta, dict) else None
        if tok and not Path(tok).is_absolute():
            meta["tokenizer_dir"] = str(Path(ckpt) / tok)
        return meta
    except FileNotFoundError:
        raise UserError(f"{path}: not a picochat checkpoint (no meta.json)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt checkpoint metadata ({e}); delete this checkpoint directory to fall "
                        f"back to the previous one") from None


def update_meta(ckpt: Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into a checkpoint's meta.json (atomic rewrite; rank 0 only). Used to record the metrics of an
    eval that ran after the checkpoint was saved. Dict values are merged one level deep."""
    meta = read_meta(ckpt)
    for k, v in fields.items():
        if isinstance(v, dict) and isinstance(meta.get(k), dict):
            meta[k] = {**meta[k], **v}
        else:
            meta[k] = v
    atomic_write_text(Path(ckpt) / "meta.json", json.dumps(meta, indent=2, default=str))
    return meta


def load_model_state(ckpt: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights of a training checkpoint (model.pt) or of an exported model (model.safetensors)."""
    st = Path(ckpt) / "model.safetensors"
    if st.is_file() and not (Path(ckpt) / "model.pt").is_file():
        return {k: v.to(map_location) for k, v in load_file(str(st)).items()}
    return torch.load(Path(ckpt) / "model.pt", map_location=map_location, weights_only=True)


def load_rank_files(ckpt: Path, rank: int | None = None, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(optimizer state, rank state) of this rank; None where the checkpoint has no such file.

    Raises a clear error when the checkpoint was written by a different number of ranks and holds per-rank files
    for fewer ranks than needed (the caller decides whether it can reshard).
    """
    rank = get_rank() if rank is None else rank
    ckpt = Path(ckpt)
    optim_path, state_path = ckpt / f"optim_rank{rank}.pt", ckpt / f"state_rank{rank}.pt"
    optim = torch.load(optim_path, map_location=map_location, weights_only=False) if optim_path.exists() else None
    state = torch.load(state_path, map_location=map_location, weights_only=False) if state_path.exists() else None
    return optim, state


def find_run_with_stage(stage: str, run: str | None = None) -> tuple[str, Path]:
    """The run to load `stage` from: `run` if given, else the run whose latest `stage` checkpoint is newest.

    Returns (run_name, checkpoint_dir). Raises UserError naming what is missing and how to make it.
    """
    if stage not in STAGES:
        raise UserError(f"--source {stage!r}: expected one of {', '.join(STAGES)}")
    runs_root = picochat_home() / "runs"
    candidates = [run] if run else ([p.name for p in runs_root.iterdir() if p.is_dir()] if runs_root.is_dir() else [])
    best: tuple[float, str, Path] | None = None
    for name in candidates:
        ck = latest_checkpoint(checkpoints_dir(name, stage))
        if ck is not None:
            t = (ck / "meta.json").stat().st_mtime
            if best is None or t > best[0]:
                best = (t, name, ck)
    if best is None:
        where = f"run {run!r}" if run else f"any run under {runs_root}"
        raise UserError(f"no '{stage}' checkpoint found in {where}; train one first "
                        f"(e.g. `picochat speedrun --preset tiny`) or pass --run NAME")
    return best[1], best[2]


def load_model(ckpt: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Build the model a checkpoint describes and load its weights. Returns (model, tokenizer, meta).

    meta.json must hold "model_config" (GPTConfig fields) and "tokenizer_dir". A Hugging Face folder (config.json,
    no meta.json: `picochat export --format hf`, or a transformers nanochat model) loads through hf.py.
    """
    if hf.is_hf_folder(ckpt):
        return hf.load_model(Path(ckpt), device, dtype)
    meta = read_meta(ckpt)
    if "model_config" not in meta:
        raise UserError(f"{ckpt}/meta.json: no model_config; this checkpoint cannot be loaded as a model")
    cfg = GPTConfig.from_saved(meta["model_config"])
    tok = Tokenizer.load(meta["tokenizer_dir"], expect_vocab_size=cfg.vocab_size)
    model = build_model(cfg, device=device)
    state = load_model_state(ckpt, map_location=device)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.set_compute_dtype(dtype)
    model.eval()
    return model, tok, meta
