"""Muon for the block matrices, AdamW for everything else; one optimizer, distributed with sharded state.

Muon (per 2-D block matrix; Keller Jordan's Muon, with the later refinements nanochat adopted):
1. Nesterov momentum: buf <- lerp(buf, g, 1 - mu); g <- lerp(g, buf, mu).
2. Orthogonalize with Polar Express (arXiv 2505.16932): 5 odd-polynomial iterations, each with its own
   coefficients (computed by the paper's method for 5 iterations, safety factor 2e-2, cushion 2), run in bf16 on
   CUDA after Frobenius normalisation. Tall matrices are transposed so X X^T is the small Gram matrix.
3. Optional NorMuon variance reduction (arXiv 2510.05491): a factored second moment over the smaller dimension,
   per-row (or per-column) scaling by 1/sqrt(v), then renormalised to the orthogonalised update's norm.
4. Cautious weight decay (decay only where the update also shrinks the weight; arXiv 2411.16085 line of work):
   p <- p - lr * u - lr * wd * p * [u * p >= 0], lr scaled by sqrt(max(1, rows / cols)).
AdamW: the textbook decoupled update (bias-corrected; it matches `torch.optim.AdamW`, tested).

Distribution (no DDP wrapper; gloo on CPU, NCCL on CUDA):
- Muon: same-shape matrices are stacked into one (W * R, m, n) buffer (R = ceil(K / W), zero padded). A
  reduce-scatter averages the gradients and hands rank r the R matrices it owns; the owner runs the update with its
  own momentum state, and an all-gather returns the new weights to every rank.
- AdamW: tensors of >= 1024 elements whose first dim divides by W are reduce-scattered along dim 0; each rank
  updates its row slice with its own moment slice, then all-gathers the rows. Small tensors are all-reduced and
  updated identically everywhere.
So optimizer state is sharded across ranks (ZeRO-2-like). Communication starts during backward: a
post-accumulate-grad hook launches a bucket's reduction as soon as all its gradients are final (call `arm()`
before the backward of the last micro-batch). Where the whole backward is one compiled graph, every gradient lands
at its end and the reductions simply overlap with each other and with the update math instead.

`state_dict()` stores each rank's state keyed by parameter name (with row ranges for sharded AdamW moments), so
`load_state_dict([sd_rank0, sd_rank1, ...])` can rebuild any rank's shard for a *different* world size; a missing
piece raises a UserError instead of resuming silently wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from picochat.config import UserError
from picochat.runtime import get_rank, get_world_size
from picochat.scaling import SMEAR_LR

# Polar Express coefficients (a, b, c) per iteration for 5 iterations, from arXiv 2505.16932 (safety factor 2e-2,
# cushion 2); each iteration maps X -> a X + (b A + c A^2) X with A = X X^T.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

SHARD_MIN_NUMEL = 1024  # smaller AdamW tensors are all-reduced (a reduce-scatter of a few numbers costs more)


def polar_express(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of each matrix in `g` (..., m, n). Returns g's dtype."""
    x = g.to(dtype or g.dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def muon_math(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, v: torch.Tensor | None, lr: torch.Tensor,
              wd: torch.Tensor, momentum: torch.Tensor, beta2: float, ortho_dtype: torch.dtype,
              equilibrate: bool = True, rescale: bool = True) -> None:
    """In-place Muon step on a stack of matrices p, g, buf: (R, m, n); v: NorMuon second moment or None.

    lr already includes the shape factor. Hyperparameters are 0-D tensors so a compiled version never recompiles
    when the schedules change them. `equilibrate` (MuonEq, arXiv 2603.28254) scales every row of the momentum to
    the mean row norm before orthogonalising; `rescale` (Muon+, arXiv 2602.21545) sets the orthogonalised update's
    Frobenius norm to sqrt(min(m, n)), the norm of an exact polar factor: after 5 Polar Express steps the small
    singular values of a low-stable-rank gradient are still well below 1, which shrinks the step.
    """
    buf.lerp_(g, 1 - momentum)
    g = g.lerp(buf, momentum)
    if equilibrate:
        rows = g.norm(dim=-1, keepdim=True)
        g = g * (rows.mean(dim=-2, keepdim=True) / rows.clamp_min(1e-12))
    u = polar_express(g, dtype=ortho_dtype).float()
    if rescale:
        target = math.sqrt(min(u.size(-2), u.size(-1)))
        u = u * (target / u.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    if v is not None:
        norm = u.norm(dim=(-2, -1), keepdim=True)
        reduce_dim = -1 if u.size(-2) >= u.size(-1) else -2
        v.lerp_(u.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
        u = u * torch.rsqrt(v + 1e-10)
        u = u * (norm / u.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    mask = (u * p >= 0).to(p.dtype)
    p.sub_(lr * u + (lr * wd) * p * mask)


def adamw_math(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor,
               lr: torch.Tensor, beta1: torch.Tensor, beta2: torch.Tensor, eps: torch.Tensor,
               wd: torch.Tensor) -> None:
    """In-place AdamW step (decoupled weight decay, bias correction), the same arithmetic as torch.optim.AdamW."""
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).add_((1 - beta2) * g * g)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    denom = (v.sqrt() / bc2.sqrt()).add_(eps)
    p.sub_((lr / bc1) * m / denom)


# ----------------------------------------------------------------------------------------------------------------
# Communication helpers (NCCL has AVG and reduce-scatter; gloo gets all-reduce + slice)


class _Pending:
    def __init__(self, work: Any = None, finish: Callable[[], None] | None = None):
        self.work, self.finish = work, finish

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.finish is not None:
            self.finish()
            self.finish = None


def _is_nccl() -> bool:
    return dist.get_backend() == "nccl"


def _reduce_scatter_avg(out: torch.Tensor, inp: torch.Tensor, world: int, rank: int) -> _Pending:
    if _is_nccl():
        return _Pending(dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.AVG, async_op=True))
    work = dist.all_reduce(inp, op=dist.ReduceOp.SUM, async_op=True)
    n = out.shape[0]
    return _Pending(work, lambda: out.copy_(inp[rank * n:(rank + 1) * n]).div_(world))


def _all_reduce_avg(t: torch.Tensor, world: int) -> _Pending:
    if _is_nccl():
        return _Pending(dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True))
    return _Pending(dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True), lambda: t.div_(world))


def _all_gather(out: torch.Tensor, inp: torch.Tensor, world: int) -> _Pending:
    if _is_nccl():
        return _Pending(dist.all_gather_into_tensor(out, inp, async_op=True))
    return _Pending(dist.all_gather(list(out.chunk(world)), inp, async_op=True))


def _raise_recompile_limit(n: int = 64) -> None:
    """One compiled graph per distinct tensor shape: more than dynamo's default limit of 8 for some models."""
    import torch._dynamo

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(n, getattr(torch._dynamo.config, key)))


# ----------------------------------------------------------------------------------------------------------------
# The optimizer


@dataclass
class _Bucket:
    """What one communication + update unit holds: a stack of same-shape Muon matrices, or one AdamW tensor."""

    kind: str                      # "muon" | "adamw"
    group: dict[str, Any]
    params: list[torch.nn.Parameter]
    names: list[str]
    per_rank: int = 0              # muon: matrices per rank; adamw: rows per rank (0 = replicated)
    rows: tuple[int, int] = (0, 0)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    buffer: torch.Tensor | None = None
    local_grad: torch.Tensor | None = None
    pending: _Pending | None = None
    ready: int = 0


class MuonAdamW:
    """One optimizer over groups of kind "muon" (2-D matrices) and "adamw" (the rest).

    Each group dict: params, names (same order), kind, lr, weight_decay, and for muon: momentum, beta2 (NorMuon,
    None to disable); for adamw: betas, eps. `initial_lr` is recorded so schedules can set lr = initial_lr * lrm.
    The interface is torch.optim's (param_groups, step, zero_grad, state_dict, load_state_dict); it is not a
    torch.optim.Optimizer subclass because nothing here needs that machinery (and its constructor imports the
    whole compiler stack, seconds per process).
    """

    def __init__(self, groups: list[dict[str, Any]], compile_step: bool = False,
                 ortho_dtype: torch.dtype | None = None, overlap: bool = True):
        self.param_groups: list[dict[str, Any]] = []
        for g in groups:
            g = dict(g)
            g["params"] = list(g["params"])
            g.setdefault("weight_decay", 0.0)
            self.param_groups.append(g)
        seen: set[int] = set()
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) in seen:
                    raise ValueError("a parameter appears in more than one optimizer group")
                seen.add(id(p))
        self.world = get_world_size() if dist.is_initialized() else 1
        self.rank = get_rank() if dist.is_initialized() else 0
        self._step = 0
        self._armed = False
        self._compile = compile_step
        first = self.param_groups[0]["params"][0]
        self.device = first.device
        self.ortho_dtype = ortho_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self._muon_fn = muon_math
        self._adamw_fn = adamw_math
        if compile_step:
            _raise_recompile_limit()
            self._muon_fn = torch.compile(muon_math, dynamic=False, fullgraph=True)
            self._adamw_fn = torch.compile(adamw_math, dynamic=False, fullgraph=True)
        self._hp: dict[str, torch.Tensor] = {}
        self.buckets: list[_Bucket] = []
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
            names = group.get("names") or [f"p{i}" for i in range(len(group["params"]))]
            if len(names) != len(group["params"]):
                raise ValueError("each group needs one name per parameter")
            group["names"] = list(names)
            if group["kind"] == "muon":
                self._build_muon_buckets(group)
            elif group["kind"] == "adamw":
                self._build_adamw_buckets(group)
            else:
                raise ValueError(f"unknown group kind {group['kind']!r}")
        self._hooks = []
        if self.world > 1 and overlap:
            for b in self.buckets:
                for p in b.params:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(b)))

    # -- layout -----------------------------------------------------------------------------------------------

    def _build_muon_buckets(self, group: dict[str, Any]) -> None:
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(group["params"]):
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D matrices; {group['names'][i]} has shape {tuple(p.shape)}")
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for shape, idx in by_shape.items():
            params = [group["params"][i] for i in idx]
            per_rank = math.ceil(len(params) / self.world)
            b = _Bucket("muon", group, params, [group["names"][i] for i in idx], per_rank=per_rank)
            m, n = shape
            b.state["momentum"] = torch.zeros(per_rank, m, n, device=self.device, dtype=torch.float32)
            if group.get("beta2") is not None:
                vshape = (per_rank, m, 1) if m >= n else (per_rank, 1, n)
                b.state["second_moment"] = torch.zeros(vshape, device=self.device, dtype=torch.float32)
            self.buckets.append(b)

    def _build_adamw_buckets(self, group: dict[str, Any]) -> None:
        for p, name in zip(group["params"], group["names"]):
            b = _Bucket("adamw", group, [p], [name])
            sharded = self.world > 1 and p.ndim >= 1 and p.numel() >= SHARD_MIN_NUMEL and p.shape[0] % self.world == 0
            if sharded:
                b.per_rank = p.shape[0] // self.world
                b.rows = (self.rank * b.per_rank, (self.rank + 1) * b.per_rank)
                local = p.detach()[b.rows[0]:b.rows[1]]
            else:
                b.rows = (0, p.shape[0] if p.ndim else 1)
                local = p.detach()
            b.state["exp_avg"] = torch.zeros_like(local, dtype=torch.float32)
            b.state["exp_avg_sq"] = torch.zeros_like(local, dtype=torch.float32)
            self.buckets.append(b)

    def _hparam(self, key: str, value: float) -> torch.Tensor:
        """0-D device tensors for hyperparameters: compiled update functions take them as inputs, so schedule
        changes never recompile; `fill_` is an async kernel, not a host sync."""
        t = self._hp.get(key)
        if t is None:
            t = self._hp[key] = torch.tensor(float(value), dtype=torch.float32, device=self.device)
        else:
            t.fill_(float(value))
        return t

    # -- communication ----------------------------------------------------------------------------------------

    def arm(self, last_micro_step: bool = True) -> None:
        """Call before each backward; True before the last micro-batch's backward lets hooks start reductions."""
        self._armed = last_micro_step

    def _make_hook(self, b: _Bucket) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            if not self._armed:
                return
            b.ready += 1
            if b.ready == len(b.params) and b.pending is None:
                self._launch_reduce(b)
        return hook

    def _launch_reduce(self, b: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        if b.kind == "muon":
            K, R = len(b.params), b.per_rank
            if self.world == 1:
                b.local_grad = torch.stack(grads).float() if K > 1 else grads[0].float().unsqueeze(0)
                return
            if b.buffer is None:
                b.buffer = torch.zeros(R * self.world, *b.params[0].shape, device=self.device, dtype=torch.float32)
            torch._foreach_copy_(list(b.buffer[:K].unbind(0)), grads)
            b.local_grad = torch.empty(R, *b.params[0].shape, device=self.device, dtype=torch.float32)
            b.pending = _reduce_scatter_avg(b.local_grad, b.buffer, self.world, self.rank)
        else:
            g = grads[0]
            if self.world == 1:
                b.local_grad = g
            elif b.per_rank:
                b.buffer = g.float().contiguous() if g.dtype != torch.float32 else g
                b.local_grad = torch.empty_like(b.buffer[: b.per_rank])
                b.pending = _reduce_scatter_avg(b.local_grad, b.buffer, self.world, self.rank)
            else:
                b.local_grad = g
                b.pending = _all_reduce_avg(g, self.world)

    # -- the step ---------------------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self._step += 1
        for b in self.buckets:  # reductions not started by hooks (single process, or not armed)
            if b.pending is None and b.local_grad is None:
                self._launch_reduce(b)
        gathers: list[tuple[_Bucket, torch.Tensor, _Pending | None]] = []
        step_t = self._hparam("step", self._step)
        for b in self.buckets:
            if b.pending is not None:
                b.pending.wait()
            g, group = b.local_grad, b.group
            assert g is not None
            lr = group["lr"]
            if b.kind == "muon":
                m, n = b.params[0].shape
                K, R = len(b.params), b.per_rank
                lo = self.rank * R
                owned = b.params[lo:lo + R] if self.world > 1 else b.params
                if self.world > 1:
                    local_p = torch.zeros(R, m, n, device=self.device, dtype=torch.float32)
                    if owned:
                        torch._foreach_copy_(list(local_p[:len(owned)].unbind(0)), [p.detach() for p in owned])
                else:
                    local_p = torch.stack([p.detach() for p in owned]).float()
                shape_lr = lr * math.sqrt(max(1.0, m / n))
                self._muon_fn(local_p, g, b.state["momentum"], b.state.get("second_moment"),
                              self._hparam(f"lr{id(b)}", shape_lr), self._hparam(f"wd{id(b)}", group["weight_decay"]),
                              self._hparam(f"mom{id(b)}", group["momentum"]), float(group.get("beta2") or 0.0),
                              self.ortho_dtype, bool(group.get("equilibrate", False)),
                              bool(group.get("rescale", False)))
                if self.world > 1:
                    full = b.buffer
                    assert full is not None
                    gathers.append((b, full, _all_gather(full, local_p, self.world)))
                else:
                    torch._foreach_copy_([p.data for p in b.params], list(local_p.unbind(0)))
            else:
                p = b.params[0]
                beta1, beta2 = group["betas"]
                local_p = p.data[b.rows[0]:b.rows[1]] if b.per_rank else p.data
                # AdamW is elementwise: compiled, it runs on flattened tensors of a dynamic length, one graph for
                # every parameter (and one for single numbers) instead of one per shape: four at d12, 3.7 s of a
                # cold H100 start (TORCH_TRACE, docs/LOG.md). view, not reshape: the update is in place.
                flat = [t.view(-1) for t in (local_p, b.state["exp_avg"], b.state["exp_avg_sq"])]
                flat.insert(1, g.to(local_p.dtype).reshape(-1))
                if self._compile and flat[0].numel() > 1:
                    for t in flat:
                        torch._dynamo.mark_dynamic(t, 0)
                self._adamw_fn(*flat, step_t,
                               self._hparam(f"lr{id(b)}", lr), self._hparam(f"b1{id(b)}", beta1),
                               self._hparam(f"b2{id(b)}", beta2), self._hparam(f"eps{id(b)}", group["eps"]),
                               self._hparam(f"wd{id(b)}", group["weight_decay"]))
                if b.per_rank:
                    gathers.append((b, p.data, _all_gather(p.data, local_p.clone(), self.world)))
            b.local_grad, b.ready = None, 0
            b.pending = None
        for b, full, pend in gathers:
            assert pend is not None
            pend.wait()
            if b.kind == "muon":
                K = len(b.params)
                torch._foreach_copy_([p.data for p in b.params], list(full[:K].unbind(0)))
        self._armed = False

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's state, keyed by parameter name (so it can be resharded for another world size)."""
        params: dict[str, dict[str, Any]] = {}
        for b in self.buckets:
            if b.kind == "muon":
                lo = self.rank * b.per_rank if self.world > 1 else 0
                for i in range(b.per_rank if self.world > 1 else len(b.params)):
                    j = lo + i
                    if j >= len(b.params):
                        break
                    entry = {"kind": "muon", "momentum": b.state["momentum"][i].clone()}
                    if "second_moment" in b.state:
                        entry["second_moment"] = b.state["second_moment"][i].clone()
                    params[b.names[j]] = entry
            else:
                params[b.names[0]] = {"kind": "adamw", "rows": tuple(b.rows), "exp_avg": b.state["exp_avg"].clone(),
                                      "exp_avg_sq": b.state["exp_avg_sq"].clone()}
        hparams = [{k: v for k, v in g.items() if k not in ("params",)} for g in self.param_groups]
        return {"format": "picochat.MuonAdamW/1", "world_size": self.world, "rank": self.rank, "step": self._step,
                "groups": hparams, "params": params}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Load this rank's shard from one state dict (same world size) or the list of every old rank's dicts."""
        states = state if isinstance(state, list) else [state]
        for s in states:
            if s.get("format") != "picochat.MuonAdamW/1":
                raise UserError("optimizer checkpoint: unknown format (written by another optimizer?); "
                                "start this stage over with --resume wipe")
        steps = {s["step"] for s in states}
        if len(steps) != 1:
            raise UserError(f"optimizer checkpoint: ranks disagree on the step count ({sorted(steps)}); the "
                            f"checkpoint is inconsistent")
        old_world = states[0]["world_size"]
        pieces: dict[str, list[dict[str, Any]]] = {}
        for s in states:
            for name, entry in s["params"].items():
                pieces.setdefault(name, []).append(entry)

        def missing(name: str) -> UserError:
            return UserError(
                f"optimizer checkpoint: no state for {name!r} among the {len(states)} rank file(s) given (written "
                f"with world size {old_world}, now {self.world}); pass every optim_rank*.pt file to reshard")

        for b in self.buckets:
            if b.kind == "muon":
                lo = self.rank * b.per_rank if self.world > 1 else 0
                count = b.per_rank if self.world > 1 else len(b.params)
                for i in range(count):
                    j = lo + i
                    if j >= len(b.params):
                        break
                    got = pieces.get(b.names[j])
                    if not got or got[0]["kind"] != "muon":
                        raise missing(b.names[j])
                    b.state["momentum"][i].copy_(got[0]["momentum"])
                    if "second_moment" in b.state:
                        if "second_moment" not in got[0]:
                            raise missing(b.names[j] + " (NorMuon second moment)")
                        b.state["second_moment"][i].copy_(got[0]["second_moment"])
            else:
                name = b.names[0]
                got = pieces.get(name)
                if not got or got[0]["kind"] != "adamw":
                    raise missing(name)
                for key in ("exp_avg", "exp_avg_sq"):
                    b.state[key].copy_(_rows_from_pieces(got, key, b.rows, name, missing))
        self._step = steps.pop()


def _rows_from_pieces(pieces: list[dict[str, Any]], key: str, rows: tuple[int, int], name: str,
                      missing: Callable[[str], UserError]) -> torch.Tensor:
    """Rows [lo, hi) of a dim-0 sharded state tensor, assembled from pieces that each hold a row range."""
    lo, hi = rows
    out, pos = [], lo
    while pos < hi:
        cand = [p for p in pieces if p["rows"][0] <= pos < p["rows"][1]]
        if not cand:
            raise missing(f"{name} rows {pos}..{hi}")
        p = cand[0]
        a, b = p["rows"]
        take_hi = min(b, hi)
        t = p[key]
        out.append(t[pos - a:take_hi - a] if t.ndim else t)
        pos = take_hi
    return out[0] if len(out) == 1 else torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# Parameter groups of the GPT


def gpt_param_groups(model: torch.nn.Module, *, matrix_lr: float, embedding_lr: float, value_embed_lr: float,
                     unembedding_lr: float, resid_lr: float, x0_lr: float, lr_scale: float = 1.0,
                     width_scale: float = 1.0, muon_weight_decay: float = 0.0, normuon_beta2: float | None = 0.9,
                     muon_eq: bool = False, muon_plus: bool = True, smear_lr: float | None = None
                     ) -> list[dict[str, Any]]:
    """Group the GPT's parameters (as nanochat/gpt.py setup_optimizer): Muon for block matrices; AdamW per kind with its own betas.

    lr_scale is sqrt(B / 2^19) (all groups but smear/backout); width_scale is (d_model / 768)^-0.5 (embeddings and
    lm_head). smear_lr (default scaling.SMEAR_LR) is fixed: nanochat does not batch-scale that group.
    Any parameter not recognised here is an error, so a new model feature cannot silently go unoptimized.
    """
    muon, wte, ve, head, resid, x0, smear = [], [], [], [], [], [], []
    for name, p in model.named_parameters():
        name = name.removeprefix("_orig_mod.")
        if name.startswith("blocks.") and p.ndim == 2:
            muon.append((name, p))
        elif name == "wte.weight":
            wte.append((name, p))
        elif name.startswith("value_embeds."):
            ve.append((name, p))
        elif name == "lm_head.weight":
            head.append((name, p))
        elif name == "resid_lambdas":
            resid.append((name, p))
        elif name == "x0_lambdas":
            x0.append((name, p))
        elif name in ("smear_gate.weight", "smear_lambda", "backout_lambda"):
            smear.append((name, p))
        else:
            raise ValueError(f"gpt_param_groups: no optimizer group for parameter {name!r} {tuple(p.shape)}")

    def adamw(items, lr, betas, wd):
        return dict(kind="adamw", params=[p for _, p in items], names=[n for n, _ in items], lr=lr, betas=betas,
                    eps=1e-10, weight_decay=wd)

    groups = [dict(kind="muon", params=[p for _, p in muon], names=[n for n, _ in muon], lr=matrix_lr * lr_scale,
                   momentum=0.95, beta2=normuon_beta2, weight_decay=muon_weight_decay,
                   equilibrate=muon_eq, rescale=muon_plus),
              adamw(wte, embedding_lr * width_scale * lr_scale, (0.8, 0.995), 0.001),
              adamw(head, unembedding_lr * width_scale * lr_scale, (0.8, 0.96), 0.01),
              adamw(resid, resid_lr * lr_scale, (0.8, 0.95), 0.05),
              adamw(x0, x0_lr * lr_scale, (0.96, 0.95), 0.0)]
    if ve:
        groups.append(adamw(ve, value_embed_lr * width_scale * lr_scale, (0.8, 0.995), 0.01))
    if smear:
        groups.append(adamw(smear, SMEAR_LR if smear_lr is None else smear_lr, (0.8, 0.95), 0.0))
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, compile_step: bool = False, **kw: Any) -> MuonAdamW:
    return MuonAdamW(gpt_param_groups(model, **kw), compile_step=compile_step)


def set_schedule(opt: MuonAdamW, lrm: float, momentum: float | None = None, wd_mult: float | None = None) -> None:
    """Apply schedule values: lr = initial_lr * lrm for every group; Muon momentum and (scheduled) Muon WD."""
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * lrm
        if g["kind"] == "muon":
            if momentum is not None:
                g["momentum"] = momentum
            if wd_mult is not None:
                g.setdefault("initial_weight_decay", g["weight_decay"])
                g["weight_decay"] = g["initial_weight_decay"] * wd_mult
