"""`picochat report`: the report card of a run, `runs/<run>/report.md` with PNG plots (and optional HTML).

It only reads what the stages left behind: `speedrun.json` (stage times), each stage's `run.json` (resolved config,
versions, hardware) and `metrics.jsonl` (per-step lines and evals), and `eval/*.json` (CORE and chat evals).
A stage that did not run is simply absent from the report.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

from picochat.config import UserError
from picochat.files import atomic_write_text

STAGES = [("base", "Pretraining (base)"), ("mid", "Midtraining"), ("sft", "SFT"), ("rl", "RL")]
SOURCES = ["base", "mid", "sft", "rl"]
# summary rows: (label, [keys to look for in eval results])
SUMMARY_ROWS = [
    ("val bpb", ["val_bpb"]),
    ("CORE", ["core", "CORE"]),
    ("ARC-Easy", ["arc_easy", "ARC-Easy"]),
    ("ARC-Challenge", ["arc_challenge", "ARC-Challenge"]),
    ("MMLU", ["mmlu", "MMLU"]),
    ("GSM8K", ["gsm8k", "GSM8K"]),
    ("HumanEval", ["humaneval", "HumanEval"]),
    ("SpellingBee", ["spellingbee", "SpellingBee"]),
    ("Synth MC, held-out facts", ["synth_mc"]),
    ("Synth arithmetic (tool)", ["synth_gen"]),
    ("ChatCORE", ["chatcore", "ChatCORE"]),
]

# metric names as the training loop may spell them
KEYS = {
    "loss": ["loss", "train_loss", "smooth_loss"],
    "val_bpb": ["val_bpb"],
    "tok_per_sec": ["tok_per_s", "tok_per_sec", "tokens_per_sec", "tok_s"],
    "mfu": ["mfu"],
    "lr": ["lr", "lrm", "lr_mult"],
    "flops": ["total_flops", "flops"],
}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: skip it, keep the rest
            continue
    return out


def _get(rec: dict[str, Any], name: str) -> float | None:
    for k in KEYS[name]:
        v = rec.get(k)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def series(records: list[dict[str, Any]], name: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = _get(r, name)
        if v is not None and isinstance(r.get("step"), (int, float)):
            xs.append(float(r["step"]))
            ys.append(v)
    return xs, ys


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _flatten_scores(obj: Any, out: dict[str, float], prefix: str = "") -> None:
    """Collect numeric scores from an eval result, whatever its nesting ({"results": {"arc_easy": {"acc": ..}}})."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k.lower(), float(v))
                if prefix:
                    out.setdefault(f"{prefix}.{k}".lower(), float(v))
            elif isinstance(v, dict):
                acc = next((v[a] for a in ("accuracy", "acc", "score", "centered", "pass@1") if
                            isinstance(v.get(a), (int, float))), None)
                if acc is not None:
                    out.setdefault(k.lower(), float(acc))
                _flatten_scores(v, out, k)


def time_to_core(rdir: Path) -> dict[str, Any] | None:
    """The pretraining's --core-target outcome from its metrics: the record of the step that reached the target,
    else (not reached) the target and the best CORE seen; None without a target."""
    hit, cores = None, []
    for rec in read_jsonl(rdir / "base" / "metrics.jsonl"):
        if not isinstance(rec, dict):
            continue
        if "time_to_target_s" in rec:
            hit = rec
        elif isinstance(rec.get("core"), (int, float)):
            cores.append(rec["core"])
    if hit is not None:
        return hit
    try:
        target = float((_read_json(rdir / "base" / "run.json").get("config") or {}).get("core_target") or 0)
    except (TypeError, ValueError):
        return None
    return {"core_target": target, "best_core": max(cores) if cores else None} if target else None


def target_line(t: dict[str, Any]) -> str:
    """One line in the leaderboard's terms (nanochat's time-to-GPT-2: training steps only, evals excluded)."""
    if "time_to_target_s" in t:
        return (f"time to CORE {t['core_target']:g}: {_fmt_seconds(t['time_to_target_s'])} of training steps "
                f"({t['time_to_target_s']:.0f}s, evals excluded) on {t.get('hardware', '?')}; reached at step "
                f"{t['step']} with CORE {t['core']:.4f}")
    best = f"{t['best_core']:.4f}" if t.get("best_core") is not None else "none measured"
    return f"time to CORE {t['core_target']:g}: not reached (best CORE {best})"

def collect_evals(run_dir: Path) -> dict[str, dict[str, float]]:
    """source -> {metric: value} from runs/<run>/eval/<source>_*.json."""
    out: dict[str, dict[str, float]] = {s: {} for s in SOURCES}
    edir = run_dir / "eval"
    if not edir.is_dir():
        return out
    for p in sorted(edir.glob("*.json")):
        m = re.match(r"(base|mid|sft|rl)_(\w+)\.json$", p.name)
        if not m:
            continue
        _flatten_scores(_read_json(p), out[m.group(1)])
    return out


def _add_flops(records: list[dict[str, Any]], header: dict[str, Any]) -> None:
    """Training FLOPs so far for each pretraining record (tokens x FLOPs/token from the run header), and MFU in %."""
    derived = header.get("derived") or {}
    fpt, batch = derived.get("flops_per_token"), derived.get("total_batch_size")
    for r in records:
        if isinstance(r.get("mfu"), (int, float)) and 0 < r["mfu"] <= 1.0:
            r["mfu"] = 100.0 * r["mfu"]
        if fpt and _get(r, "flops") is None and isinstance(r.get("step"), (int, float)):
            tokens = r.get("tokens") if isinstance(r.get("tokens"), (int, float)) else (
                r["step"] * batch if batch else None)
            if tokens:
                r["total_flops"] = float(tokens) * float(fpt)


def _nvidia_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _pyplot() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Write `fig` to `path` through a temporary file, so a crash never leaves a half-written PNG, and close it."""
    tmp = path.with_suffix(".part.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _points_vs_flops(records: list[dict[str, Any]], name: str, positive_flops: bool) -> tuple[list, list]:
    """(FLOPs, value) pairs of the records that logged both; `positive_flops` also drops FLOPs <= 0."""
    fxs, fys = [], []
    for r in records:
        v, f = _get(r, name), _get(r, "flops")
        if v is not None and f is not None and (not positive_flops or f > 0):
            fxs.append(f)
            fys.append(v)
    return fxs, fys


def _per_stage_figure(plt: Any, stage_records: dict[str, list[dict[str, Any]]], metric: str, ylabel: str,
                      title: str, size: tuple) -> Any | None:
    """One line per training stage that logged `metric`; None when none did."""
    lines = [(label, series(stage_records.get(stage, []), metric)) for stage, label in STAGES]
    lines = [(label, xy) for label, xy in lines if xy[0]]
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=size)
    for label, (xs, ys) in lines:
        ax.plot(xs, ys, label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return fig


def _val_bpb_figure(plt: Any, base: list[dict[str, Any]]) -> Any | None:
    """Validation bpb vs step (left) and vs FLOPs (right, blank when no FLOPs were logged); None without val bpb."""
    xs, ys = series(base, "val_bpb")
    if not xs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(xs, ys, marker="o", ms=3)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("val bpb")
    axes[0].set_title("Validation bits per byte")
    fxs, fys = _points_vs_flops(base, "val_bpb", positive_flops=False)
    if fxs:
        axes[1].plot(fxs, fys, marker="o", ms=3)
        axes[1].set_xscale("log")
        axes[1].set_xlabel("training FLOPs")
        axes[1].set_title("Validation bpb vs FLOPs")
    else:
        axes[1].axis("off")
    return fig


def _loss_flops_figure(plt: Any, base: list[dict[str, Any]]) -> Any | None:
    """Training loss vs FLOPs on a log axis; None when no record has positive FLOPs."""
    fxs, fys = _points_vs_flops(base, "loss", positive_flops=True)
    if not fxs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(fxs, fys, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("train loss")
    ax.set_title("Training loss vs FLOPs")
    return fig


def _throughput_figure(plt: Any, base: list[dict[str, Any]]) -> Any | None:
    """Tokens/s with MFU on a second y axis (only when some MFU is positive); None when neither was logged."""
    txs, tys = series(base, "tok_per_sec")
    mxs, mys = series(base, "mfu")
    if not (txs or mxs):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if txs:
        ax.plot(txs, tys, lw=1, color="tab:blue")
        ax.set_ylabel("tokens/s", color="tab:blue")
    if mxs and any(y > 0 for y in mys):
        ax2 = ax.twinx()
        ax2.plot(mxs, mys, lw=1, color="tab:orange")
        ax2.set_ylabel("MFU %", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_title("Pretraining throughput")
    return fig


def _figures(plt: Any, stage_records: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, str, Any | None]]:
    """Yield (file name, caption, figure or None) per plot, in report order. A generator, so each figure is built
    only after the previous one was saved and closed."""
    base = stage_records.get("base", [])
    yield "loss.png", "Training loss vs step", _per_stage_figure(
        plt, stage_records, "loss", "train loss", "Training loss", (7, 4))
    yield "val_bpb.png", "Validation bpb vs step and vs FLOPs", _val_bpb_figure(plt, base)
    yield "loss_flops.png", "Training loss vs FLOPs", _loss_flops_figure(plt, base)
    yield "throughput.png", "Throughput (tokens/s) and MFU", _throughput_figure(plt, base)
    yield "lr.png", "Learning-rate schedule", _per_stage_figure(
        plt, stage_records, "lr", "LR multiplier", "Learning-rate schedule", (7, 3.5))


def make_plots(run_dir: Path, stage_records: dict[str, list[dict[str, Any]]]) -> list[tuple[str, Path]]:
    """PNG plots under runs/<run>/plots/. Returns (title, path) pairs; empty when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return []
    pdir = run_dir / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, Path]] = []
    for name, caption, fig in _figures(plt, stage_records):
        if fig is None:  # the run logged nothing this plot shows
            continue
        _save_figure(plt, fig, pdir / name)
        plots.append((caption, pdir / name))
    return plots


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _fmt_seconds(s: float) -> str:
    s = float(s)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def build_report(run: str, price: float | None = None, html_out: bool = False) -> Path:
    """Write `runs/<run>/report.md` (and report.html with `html_out`): environment, summary of every evaluation,
    time and cost, one section per training stage, evaluation details and plots. Returns its path."""
    from picochat.runtime import run_dir as _run_dir  # lazy: runtime imports torch (~2 s); `picochat report` needs none

    rdir = _run_dir(run)
    if not rdir.is_dir():
        raise UserError(f"--run {run!r}: {rdir} does not exist; run `picochat speedrun` (or a stage) first")
    speed = _read_json(rdir / "speedrun.json")
    headers = {s: _read_json(rdir / s / "run.json") for s, _ in STAGES}
    records = {s: read_jsonl(rdir / s / "metrics.jsonl") for s, _ in STAGES}
    evals = collect_evals(rdir)
    _add_flops(records.get("base", []), headers.get("base", {}))
    env = next((h.get("env") for h in headers.values() if h.get("env")), None) or {}
    if not env:
        from picochat.runtime import environment_info  # lazy: runtime imports torch (~2 s); `report` needs none

        env = environment_info()
    stage_times = {k: v.get("seconds", 0.0) for k, v in speed.get("stages", {}).items() if v.get("status")}

    lines: list[str] = [f"# picochat report card: run `{run}`", ""]
    lines.append(f"Generated {datetime.datetime.now().isoformat(timespec='seconds')}"
                 + (f" · preset `{speed['preset']}`" if speed.get("preset") else ""))
    lines += _environment_section(env)
    lines += _summary_section(evals, stage_times, env, price, rdir)
    for stage, title in STAGES:
        lines += _stage_section(stage, title, headers[stage], records[stage], stage_times)
    for s in SOURCES:
        if evals[s]:
            lines += ["", f"## Evaluation: {s}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in sorted(evals[s].items()) if "." not in k]
    plots = make_plots(rdir, records)
    if plots:
        lines += ["", "## Plots", ""]
        for title, path in plots:
            lines += [f"### {title}", "", f"![{title}](plots/{path.name})", ""]
    else:
        lines += ["", "_Plots need matplotlib (`pip install picochat[report]`)._"]

    text = "\n".join(lines) + "\n"
    out = rdir / "report.md"
    atomic_write_text(out, text)
    if html_out:
        atomic_write_text(rdir / "report.html", markdown_to_html(text, rdir))
    return out


def _environment_section(env: dict[str, Any]) -> list[str]:
    lines = ["", "## Environment", "", "| | |", "|---|---|"]
    gpu = env.get("gpu")
    gpu_line = f"{env.get('gpu_count', 1)} x {gpu} ({env.get('gpu_memory_gb', '?')} GB)" if gpu else "none (CPU)"
    for k, v in [("GPU", gpu_line), ("driver", _nvidia_driver() or "n/a"), ("CUDA", env.get("cuda") or "n/a"),
                 ("torch", f"{env.get('torch')} ({env.get('torch_path', '')})"), ("python", env.get("python")),
                 ("git SHA", env.get("git_sha") or "n/a"), ("host", env.get("hostname")),
                 ("CPU cores", env.get("cpu_count")), ("world size", env.get("world_size"))]:
        lines.append(f"| {k} | {v} |")
    return lines


def _summary_section(evals: dict[str, dict], stage_times: dict[str, float], env: dict[str, Any],
                     price: float | None, rdir: Path) -> list[str]:
    """Every source's headline metrics side by side, wall time and cost, time to the CORE target, stage times."""
    lines = ["", "## Summary", ""]
    present = [s for s in SOURCES if evals[s]]
    if present:
        lines.append("| metric | " + " | ".join(s.upper() for s in present) + " |")
        lines.append("|---|" + "---|" * len(present))
        for label, keys in SUMMARY_ROWS:
            cells = []
            for s in present:
                v = next((evals[s][k.lower()] for k in keys if k.lower() in evals[s]), None)
                cells.append(f"{v:.4f}" if v is not None else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    else:
        lines.append("_No evaluation results yet._")
    total = sum(stage_times.values())
    if total:
        lines += ["", f"Total wall time (all stages): **{_fmt_seconds(total)}**"]
        n_gpu = int(env.get("gpu_count") or 0) if env.get("gpu") else 0
        if price is not None and n_gpu:
            lines.append(f"Estimated cost: **${total / 3600 * n_gpu * price:.2f}** "
                         f"({n_gpu} GPU(s) x {_fmt_seconds(total)} x ${price}/GPU-hour)")
    target = time_to_core(rdir)
    if target:
        lines += ["", target_line(target).replace("time to CORE", "Time to CORE", 1)]
    if total:
        lines += ["", "| stage | time |", "|---|---|"]
        lines += [f"| {k} | {_fmt_seconds(v)} |" for k, v in stage_times.items()]
    return lines


def _stage_section(stage: str, title: str, h: dict[str, Any], recs: list[dict[str, Any]],
                   stage_times: dict[str, float]) -> list[str]:
    """One training stage: its key config and a facts table from its run header and metrics (last value wins)."""
    if not h and not recs:
        return []
    lines = ["", f"## {title}", ""]
    cfg = h.get("config") or {}
    keys = [k for k in ("depth", "source", "num_iterations", "device_batch_size", "total_batch_size", "seq_len",
                        "window_pattern", "matrix_lr", "embedding_lr", "unembedding_lr", "weight_decay", "task")
            if k in cfg]
    if keys:
        lines += ["Config: " + ", ".join(f"`{k}={cfg[k]}`" for k in keys), ""]
    facts: dict[str, Any] = {k: h[k] for k in ("num_params", "params", "flops_per_token") if k in h}
    steps = [r["step"] for r in recs if isinstance(r.get("step"), (int, float))]
    if steps:
        facts["steps"] = int(max(steps))
    _, ys = series(recs, "loss")
    if ys:
        facts["final train loss"] = ys[-1]
    _, ys = series(recs, "val_bpb")
    if ys:
        facts.update({"final val bpb": ys[-1], "min val bpb": min(ys)})
    for name, label in (("tok_per_sec", "median tokens/s"), ("mfu", "median MFU %")):
        _, vs = series(recs, name)
        if vs:
            facts[label] = sorted(vs)[len(vs) // 2]
    for r in recs:
        for k in ("peak_memory_gb", "peak_mem_gb", "val_loss", "reward", "mean_reward", "accuracy"):
            if isinstance(r.get(k), (int, float)):
                facts[k] = r[k]
    stage_key = {"base": "pretrain", "mid": "midtrain", "sft": "sft", "rl": "rl"}[stage]
    if stage_key in stage_times:
        facts["wall time"] = _fmt_seconds(stage_times[stage_key])
    if facts:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in facts.items()]
    return lines


def markdown_to_html(md: str, base: Path) -> str:
    """Just enough Markdown for our own report: headings, tables, images (inlined as data URIs), paragraphs."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>picochat report</title><style>",
           "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}",
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px}",
           "img{max-width:100%}code{background:#f3f3f3;padding:1px 4px}</style></head><body>"]
    lines = md.splitlines()
    i = 0

    def inline(t: str) -> str:
        t = html.escape(t)
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
        return re.sub(r"_(.+?)_", r"<i>\1</i>", t)

    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.match(r"^\|[-| ]+\|$", lines[i]):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            out.append("<table>" + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>"
                                           for r in rows) + "</table>")
            continue
        elif m := re.match(r"!\[(.*?)\]\((.*?)\)", line):
            path = base / m.group(2)
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode()
                out.append(f"<img alt='{html.escape(m.group(1))}' src='data:image/png;base64,{data}'>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out)


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None, help="run name (default: the most recently modified run)")
    parser.add_argument("--price", type=float, default=None, help="$ per GPU-hour, for the cost line")
    parser.add_argument("--html", action="store_true", help="also write report.html (plots inlined)")


def latest_run() -> str:
    from picochat.runtime import picochat_home  # lazy: runtime imports torch (~2 s); `picochat report` needs none

    root = picochat_home() / "runs"
    runs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if not runs:
        raise UserError(f"no runs under {root}; run `picochat speedrun --preset tiny` first")
    return max(runs, key=lambda p: p.stat().st_mtime).name


def run(run_name: str | None = None, price: float | None = None, html_out: bool = False) -> dict[str, Any]:
    name = run_name or latest_run()
    path = build_report(name, price=price, html_out=html_out)
    return {"report": str(path)}


def cli_main(args: argparse.Namespace) -> int:
    if args.price is not None and not (math.isfinite(args.price) and args.price >= 0):
        raise UserError(f"--price {args.price}: must be a number >= 0 ($ per GPU-hour), or drop it")
    result = run(args.run, args.price, args.html)
    print(f"[report] wrote {result['report']}")
    return 0
