"""Optimizer: AdamW path vs torch.optim.AdamW, Muon orthogonality, 2 gloo processes == 1 process, resharding."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from picochat.config import UserError
from picochat.model import GPTConfig, build_model
from picochat.optim import MuonAdamW, build_optimizer, polar_express, set_schedule


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
LRS = dict(matrix_lr=0.02, embedding_lr=0.3, value_embed_lr=0.15, unembedding_lr=0.008, resid_lr=0.005, x0_lr=0.5,
           muon_weight_decay=0.1)


def test_adamw_path_matches_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(40, 30))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MuonAdamW([dict(kind="adamw", params=[a], names=["a"], lr=1e-2, betas=(0.8, 0.95), eps=1e-8,
                           weight_decay=0.1)])
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(20):
        for p, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            loss = ((p - 1.0) ** 2).sum() + torch.sin(p * (step + 1)).sum()
            loss.backward()
            opt.step()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (48, 48)])
def test_polar_express_is_near_orthogonal(shape):
    torch.manual_seed(0)
    g = torch.randn(3, *shape)
    u = polar_express(g)
    s = torch.linalg.svdvals(u)
    if shape[0] != shape[1]:  # random square matrices have tiny singular values that 5 steps can't lift fully
        assert s.min() > 0.7
    assert s.max() < 1.25
    # direction preserved: <u, g> > 0 and u ~ polar factor of g
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(u.flatten(1), (U @ Vh).flatten(1))
    assert (cos > 0.95).all(), cos


def test_muon_step_changes_matrices_by_lr_sized_orthogonal_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128) * 0.02)
    before = p.detach().clone()
    opt = MuonAdamW([dict(kind="muon", params=[p], names=["w"], lr=0.01, momentum=0.0, beta2=None,
                          weight_decay=0.0)])
    p.grad = torch.randn_like(p)
    opt.step()
    delta = (before - p.detach()) / 0.01
    s = torch.linalg.svdvals(delta)
    assert 0.7 < s.min() and s.max() < 1.25


def _train(model, opt, batches, accum):
    losses = []
    for step, xs in enumerate(batches):
        set_schedule(opt, lrm=1.0 - 0.1 * step, momentum=0.9, wd_mult=1.0 - 0.2 * step)
        for i, x in enumerate(xs):
            opt.arm(i == len(xs) - 1)
            loss = model(x[:, :-1], x[:, 1:]) / accum
            loss.backward()
            losses.append(loss.item())
        opt.step()
        model.zero_grad(set_to_none=True)
    return losses


def _data(steps=3, rows=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (rows, TINY.sequence_len + 1), generator=g) for _ in range(steps)]


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(TINY)
    opt = build_optimizer(model, **LRS)
    per = 4 // world
    batches = [[x[rank * per:(rank + 1) * per]] for x in _data()]
    _train(model, opt, batches, accum=1)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_with_accumulation(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY)
    opt = build_optimizer(model, **LRS)
    batches = [[x[:2], x[2:]] for x in _data()]
    _train(model, opt, batches, accum=2)
    single = model.state_dict()
    single_opt = opt.state_dict()

    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in (0, 1))
    for k, v in single.items():
        assert torch.allclose(v, r0["model"][k], rtol=1e-4, atol=1e-5), k
        assert torch.equal(r0["model"][k], r1["model"][k]), k  # ranks stay in lockstep

    # the 2-rank optimizer shards reshard into the 1-process layout (and the state matches)
    torch.manual_seed(0)
    fresh = build_model(TINY)
    opt1 = build_optimizer(fresh, **LRS)
    opt1.load_state_dict([r0["optim"], r1["optim"]])
    ours = opt1.state_dict()["params"]
    for name, entry in single_opt["params"].items():
        for key, val in entry.items():
            if isinstance(val, torch.Tensor):
                assert torch.allclose(val, ours[name][key], rtol=1e-3, atol=1e-6), (name, key)
    # only one rank's file is not enough for a 1-process layout: a clear error, not a silent partial load
    with pytest.raises(UserError, match="world size 2"):
        build_optimizer(fresh, **LRS).load_state_dict(r0["optim"])


@pytest.mark.parametrize("lr_scale", [1.0, 4.0])
def test_smear_and_backout_params_get_fixed_lr_adamw_group(lr_scale):
    from picochat.optim import gpt_param_groups
    from picochat.scaling import SMEAR_LR

    cfg = GPTConfig(**{**TINY.__dict__, "smear": True, "backout": True})
    model = build_model(cfg)
    groups = gpt_param_groups(model, **LRS, lr_scale=lr_scale, width_scale=0.5)
    smear = [g for g in groups if "smear_lambda" in g["names"]]
    assert len(smear) == 1
    g = smear[0]
    assert sorted(g["names"]) == ["backout_lambda", "smear_gate.weight", "smear_lambda"]
    assert g["kind"] == "adamw" and g["lr"] == SMEAR_LR == 0.2  # neither batch- nor width-scaled
    assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 and g["weight_decay"] == 0.0
    muon = next(g for g in groups if g["kind"] == "muon")
    assert not any("smear" in n or "backout" in n for n in muon["names"])
    assert muon["lr"] == pytest.approx(LRS["matrix_lr"] * lr_scale)  # the others still scale
    # every parameter in exactly one group; and the plain model has no smear group at all
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert not any("smear_lambda" in g["names"] for g in gpt_param_groups(build_model(TINY), **LRS))
    # one real step moves the new scalars (smear lambda starts at 0 and must leave it)
    opt = build_optimizer(model, **LRS, lr_scale=lr_scale)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.sequence_len + 1))
    model(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    assert model.smear_lambda.item() != 0.0 and model.backout_lambda.item() != pytest.approx(0.2)


def test_unknown_parameter_still_an_error():
    from picochat.optim import gpt_param_groups

    model = build_model(TINY)
    model.mystery = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="mystery"):
        gpt_param_groups(model, **LRS)


def test_compiled_adamw_is_one_graph_for_every_shape_and_equals_eager():
    """AdamW is elementwise, so the compiled step runs it on flattened tensors with a dynamic length: one graph
    for parameters of any shape and size, one more for single numbers (it was one per shape: four at d12, 3.7 s
    of a cold H100 start), with the eager step's numbers."""
    pytest.importorskip("torch._inductor")
    from picochat import warmup

    def params():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((6, 4), (5,), (), (3, 7), (1,), (9,))]

    results = []
    for compiled in (False, True):
        ps = params()
        opt = MuonAdamW([{"kind": "adamw", "params": ps, "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10,
                          "weight_decay": 0.1}], compile_step=compiled)
        torch._dynamo.reset()
        with warmup.CompileWatch() as watch:
            for step in range(3):
                for i, p in enumerate(ps):
                    p.grad = torch.full_like(p, 0.1 * (i + 1) * (step + 1))
                opt.step()
        results.append([p.detach().clone() for p in ps])
        if compiled:
            assert watch.graphs == 2, watch.graphs  # any length > 1, and length 1
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
