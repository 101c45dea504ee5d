"""Sources (plan, cast, rename, lazy iteration), send_model from a single-process
trainer, and the module loader: thread tier (sharded trainers: test_sharded.py)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from tests.harness import bytes_equal, digest, free_port, gloo_trainer, gloo_worker, run_threads
from torchxfer import (
    ModuleLoader,
    NCCLWeightTransferEngine,
    NCCLWeightTransferUpdateInfo,
    TransferError,
    destroy_side_group,
    iter_named_tensors,
    send_model,
    update_info_for,
)

TIMEOUT = 5.0


class Tiny(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("steps", torch.tensor([seed], dtype=torch.int64))
        self.register_buffer("cache", torch.zeros(3), persistent=False)  # never sent


class Served(nn.Module):
    """The server's copy: bf16 weights under other names."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 16, dtype=torch.bfloat16)
        self.proj = nn.Linear(16, 16, dtype=torch.bfloat16)
        self.norm = nn.LayerNorm(16, dtype=torch.bfloat16)
        self.register_buffer("steps", torch.zeros(1, dtype=torch.int64))


RENAME = {"embed.weight": "tok.weight"}


def _poison(module: nn.Module) -> None:
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            t.fill_(float("nan") if t.is_floating_point() else -1)


# -- planning and iteration -------------------------------------------------------------------


def test_iter_named_tensors_casts_renames_dedups_and_drops():
    model = Tiny(1)

    def drop_norm(name: str) -> str | None:
        return None if name.startswith("norm.") else name

    items = iter_named_tensors(model, dtype=torch.bfloat16, name_map=drop_norm)
    assert len(items) == 4  # known before anything is materialized
    out = list(items)
    names = [n for n, _ in out]
    assert names == ["steps", "embed.weight", "proj.weight", "proj.bias"]  # head.weight is embed.weight: sent once
    by = dict(out)
    assert by["proj.weight"].dtype == torch.bfloat16 and by["steps"].dtype == torch.int64  # only floats are cast
    assert bytes_equal(by["proj.weight"], model.proj.weight.detach().bfloat16())
    assert not by["proj.weight"].requires_grad
    info = update_info_for(model, dtype=torch.bfloat16, name_map=drop_norm)
    assert info.names == names and info.dtype_names == ["int64"] + ["bfloat16"] * 3
    assert info.shapes == [[1], [50, 16], [16, 16], [16]]
    # dtype by name; include_buffers; an uncast tensor is the model's own memory, not a copy.
    plain = dict(iter_named_tensors(model, dtype="float32", include_buffers=False))
    assert "steps" not in plain and plain["proj.weight"].data_ptr() == model.proj.weight.data_ptr()


def test_sources_state_dicts_and_pairs_send_what_they_are_given():
    model = Tiny(2)
    sd = model.state_dict()  # detached copies: tied names are separate entries here, and all are sent
    assert [n for n, _ in iter_named_tensors(sd)] == list(sd)
    pairs = list(model.named_parameters())
    assert [n for n, _ in iter_named_tensors(pairs)] == [n for n, _ in pairs]
    assert [n for n, _ in iter_named_tensors(iter(pairs))] == [n for n, _ in pairs]  # listed once, by reference


def test_iteration_is_lazy():
    state = {"a": torch.ones(4), "b": torch.ones(4)}
    items = iter_named_tensors(state, dtype=torch.float16)
    first = next(items)
    state["b"].fill_(3.0)  # changed after the plan but before it is pulled: the pull sees it
    second = next(items)
    assert first[1].tolist() == [1.0] * 4 and second[1].tolist() == [3.0] * 4
    with pytest.raises(StopIteration):
        next(items)


def test_plan_errors_name_every_problem_before_anything_moves():
    model = Tiny(3)
    with pytest.raises(ValueError, match=r"does not have: \['embd.weight'\]"):  # a typo in a dict is caught
        iter_named_tensors(model, name_map={"embd.weight": "tok.weight"})
    with pytest.raises(ValueError, match=r"\['proj.weight', 'proj.bias'\] would all be sent as 'p'"):
        update_info_for(model, name_map=lambda n: "p" if n.startswith("proj.") else n)
    with pytest.raises(ValueError, match="would all be sent as 'proj.bias'"):
        iter_named_tensors(model, name_map={"proj.weight": "proj.bias"})
    with pytest.raises(ValueError, match="expected a string or None"):
        iter_named_tensors(model, name_map=lambda n: 3)
    with pytest.raises(ValueError, match="floating-point dtype"):
        iter_named_tensors(model, dtype=torch.int8)
    with pytest.raises(ValueError, match="not a supported torch dtype"):
        iter_named_tensors(model, dtype="nn")
    with pytest.raises(ValueError, match="dict, a callable or None"):
        iter_named_tensors(model, name_map=["a"])
    with pytest.raises(ValueError, match="nn.Module, a state dict or"):
        iter_named_tensors(3)
    with pytest.raises(ValueError, match="expected \\(name, tensor\\) pairs"):
        iter_named_tensors([1, 2])
    bad = {"ok": torch.ones(2), "meta": torch.empty(2, device="meta"), "obj": 3, "sparse": torch.eye(2).to_sparse()}
    with pytest.raises(ValueError) as err:
        iter_named_tensors(bad)
    text = str(err.value)
    assert text.startswith("cannot send 3 tensor(s)") and "'meta'" in text and "'obj'" in text and "'sparse'" in text


# -- send_model from a single-process trainer ----------------------------------------------------


def _trainer(port: int, world: int) -> object:
    return gloo_trainer(port, world, timeout=TIMEOUT)


def _worker(port: int, rank: int, world: int) -> NCCLWeightTransferEngine:
    return gloo_worker(rank, port, world, timeout=TIMEOUT)


MODES = [({"packed_buffer_size_bytes": 1024}, {}), ({"packed": False}, {"checksum": True})]


@pytest.mark.parametrize(("mode", "extra"), MODES)
def test_send_model_into_a_renamed_bf16_module_bit_exact_in_place(mode, extra):
    port = free_port()
    model = Tiny(3)
    info = update_info_for(model, dtype=torch.bfloat16, name_map=RENAME, **mode)

    def body(rank: int) -> object:
        if rank == 0:
            group = _trainer(port, 3)
            stats = send_model(model, group, dtype=torch.bfloat16, name_map=RENAME, **mode, **extra)
            destroy_side_group(group)
            return stats.num_tensors
        served = Served()
        _poison(served)
        ptrs = {n: t.data_ptr() for n, t in served.state_dict().items()}
        engine = _worker(port, rank, 3)
        loader = ModuleLoader(served)
        loader.check(info)
        with loader.update():  # strict: every tensor of Served arrived
            engine.receive_weights(info, loader)  # the header matches update_info_for exactly
        engine.shutdown()
        assert {n: t.data_ptr() for n, t in served.state_dict().items()} == ptrs  # in place
        return served

    outcomes = run_threads(body, 3, deadline_s=60)
    assert outcomes[0].value == 6
    for out in outcomes[1:]:
        served = out.value
        assert bytes_equal(served.tok.weight, model.embed.weight.detach().bfloat16())
        assert bytes_equal(served.proj.weight, model.proj.weight.detach().bfloat16())
        assert bytes_equal(served.proj.bias, model.proj.bias.detach().bfloat16())
        assert bytes_equal(served.norm.weight, model.norm.weight.detach().bfloat16())
        assert bytes_equal(served.norm.bias, model.norm.bias.detach().bfloat16())
        assert bytes_equal(served.steps, model.steps)


def test_send_model_tied_weights_reach_a_tied_module_once():
    port = free_port()
    model = Tiny(5)

    def body(rank: int) -> object:
        if rank == 0:
            group = _trainer(port, 2)
            names = [n for n, _ in iter_named_tensors(model)]
            send_model(model, group, version=42)
            destroy_side_group(group)
            return names
        target = Tiny(6)
        engine = _worker(port, rank, 2)
        loader = ModuleLoader(target)
        with loader.update():  # head.weight counts as arrived through embed.weight
            engine.receive_weights(None, loader)
        engine.shutdown()
        return engine.weights_version, {n: digest(t) for n, t in target.state_dict().items()}

    outcomes = run_threads(body, 2, deadline_s=60)
    assert "head.weight" not in outcomes[0].value
    assert outcomes[1].value == (42, {n: digest(t) for n, t in model.state_dict().items()})


def test_send_model_argument_errors():
    model = Tiny(7)
    with pytest.raises(ValueError, match="no trainer group"):
        send_model(model, None)  # no default group here: this process would be the only trainer
    with pytest.raises(ValueError):
        send_model(model, object())  # not a side group
    with pytest.raises(ValueError, match="timeout_s"):
        send_model(model, None, timeout_s=0)
    with pytest.raises(ValueError, match="packed_num_buffers"):
        send_model(model, None, packed_num_buffers=0)


def test_loader_error_reaches_every_rank_as_transfer_error_and_the_group_stays_usable():
    port = free_port()
    model = Tiny(4)

    def body(rank: int) -> object:
        if rank == 0:
            group = _trainer(port, 2)
            try:
                with pytest.raises(TransferError, match="cannot load"):
                    send_model(model, group)  # float32 into a bf16 module
                return send_model(model, group, dtype=torch.bfloat16, name_map=RENAME).num_tensors
            finally:
                destroy_side_group(group)
        engine = _worker(port, rank, 2)
        loader = ModuleLoader(Served(), strict=False)
        with pytest.raises(TransferError, match="'tok.weight'|'proj.weight'"):
            with loader.update():
                engine.receive_weights(None, loader)
        with loader.update():
            engine.receive_weights(None, loader)
        engine.shutdown()
        return engine.weights_version

    outcomes = run_threads(body, 2, deadline_s=60)
    assert outcomes[0].value == 6 and outcomes[1].value == 1


# -- the module loader --------------------------------------------------------------------------


def test_loader_names_every_problem_and_loads_nothing_from_a_bad_batch():
    served = Served()
    _poison(served)
    loader = ModuleLoader(served)
    bad = [
        ("tok.weight", torch.zeros(50, 16)),  # float32, module is bf16: no silent cast
        ("proj.weight", torch.zeros(4, 4, dtype=torch.bfloat16)),  # shape
        ("proj.bias", torch.zeros(4, 4, dtype=torch.bfloat16)),  # same numel, other shape: still an error
        ("norm.weight", torch.zeros(16, dtype=torch.float16)),  # same size, other dtype: still an error
        ("nope", torch.zeros(1)),  # unexpected
        ("steps", torch.ones(1, dtype=torch.int64)),  # fine, but the batch fails whole
    ]
    with pytest.raises(ValueError) as err:
        loader(bad)
    text = str(err.value)
    assert text.startswith("cannot load 5 tensor(s)")
    for part in ("'tok.weight': dtype float32, the module has bfloat16", "'proj.weight': shape [4, 4]",
                 "'proj.bias': shape [4, 4], the module has [16]", "'norm.weight': dtype float16",
                 "unexpected 'nope'"):  # fmt: skip
        assert part in text, part
    assert served.steps.item() == -1 and loader.loaded == set()
    same = torch.full((16,), 2.0, dtype=torch.bfloat16)
    loader([("proj.bias", same)])
    with pytest.raises(ValueError, match="'proj.bias' arrived twice in one update"):
        loader([("proj.bias", same)])
    with pytest.raises(ValueError, match="did not arrive") as err:
        loader.finish()
    assert "'tok.weight'" in str(err.value) and "'proj.bias'" not in str(err.value)
    loader([("proj.bias", same)])  # finish() reset the update
    loose = ModuleLoader(served, strict=False)
    loose([("nope", torch.zeros(1)), ("proj.bias", same * 2)])
    loose.finish()  # missing allowed
    assert served.proj.bias.float().tolist() == [4.0] * 16
    with pytest.raises(ValueError, match="'proj.bias': shape"):
        loose([("proj.bias", torch.zeros(3, dtype=torch.bfloat16))])  # wrong shapes fail even when not strict


def test_loader_tied_names_update_context_and_check():
    target = Tiny(8)
    loader = ModuleLoader(target)
    assert "head.weight" in loader.targets and "cache" not in loader.targets  # non-persistent: never sent
    with pytest.raises(ValueError, match=r"'embed.weight' \(or its tied names \['head.weight'\]\)"):
        loader.finish()
    loader([("head.weight", torch.ones(50, 16))])  # through the other name
    assert torch.equal(target.embed.weight, torch.ones(50, 16))
    assert "embed.weight" not in loader.missing()
    with pytest.raises(RuntimeError):
        with loader.update():
            loader([("proj.bias", torch.ones(16))])
            raise RuntimeError("the transfer failed")
    assert loader.loaded == set()  # a failed update is forgotten
    info = update_info_for(Tiny(9))
    loader.check(info)
    bad = NCCLWeightTransferUpdateInfo(["embed.weight", "zzz", "proj.bias"], ["bfloat16", "float32", "float32"],
                                       [[50, 16], [1], [3]])  # fmt: skip
    with pytest.raises(ValueError) as err:
        loader.check(bad)
    text = str(err.value)
    for part in ("'embed.weight': dtype bfloat16", "unexpected 'zzz'", "'proj.bias': shape [3]",
                 "missing 'proj.weight'", "missing 'steps'"):  # fmt: skip
        assert part in text, part
    no_buffers = ModuleLoader(target, include_buffers=False)
    assert "steps" not in no_buffers.targets
    with pytest.raises(ValueError, match="nn.Module"):
        ModuleLoader(object())


def test_loader_checks_a_batch_it_has_seen_before_as_strictly_as_a_new_one():
    """The second update of a layout takes the cached path: the same errors, bit-exact loads."""
    served = Served()
    loader = ModuleLoader(served)
    ones = torch.ones(16, dtype=torch.bfloat16)
    batch = [("proj.bias", ones), ("norm.weight", ones * 3)]
    for value in (1.0, 2.0):
        with loader.update():
            loader(iter([("proj.bias", ones * value), ("norm.weight", ones * 3)]))  # any iterable
            loader([(n, t.detach().clone()) for n, t in served.state_dict().items()
                    if n not in ("proj.bias", "norm.weight")])  # fmt: skip
        assert served.proj.bias.float().tolist() == [value] * 16
    loader(batch)
    with pytest.raises(ValueError, match="'proj.bias' arrived twice in one update") as err:
        loader(batch)
    assert "loader.finish()" in str(err.value)  # the likely cause: an update that was never ended
    loader.reset()
    with pytest.raises(ValueError, match=r"'proj.bias': shape \[4, 4\]"):
        loader([("proj.bias", torch.zeros(4, 4, dtype=torch.bfloat16)), ("norm.weight", ones)])
    with pytest.raises(ValueError, match="'norm.weight': dtype float32, the module has bfloat16"):
        loader([("proj.bias", ones), ("norm.weight", torch.ones(16))])
    assert loader.loaded == set() and served.proj.bias.float().tolist() == [1.0] * 16  # nothing loaded
    loader([("proj.bias", ones * 5), ("norm.weight", ones)])
    assert served.proj.bias.float().tolist() == [5.0] * 16


def test_a_module_planned_again_reuses_its_plan_until_anything_it_depends_on_changes():
    """The steady state plans a module once; a new tensor object, new metadata behind the same
    object, a changed name map or dtype makes a new plan that describes what is there now."""
    from torchxfer.sources import plan

    net = Tiny(1)
    first = plan(net, None, None, True)
    cached = plan(net, None, None, True)
    assert cached is not first and cached == first and cached.planned is first.planned  # cached
    names = [e.name for e in first]
    assert names == ["steps", "embed.weight", "proj.weight", "proj.bias", "norm.weight", "norm.bias"]

    with torch.no_grad():  # new metadata behind the same parameter object
        net.proj.weight.data = torch.zeros(16, 3)
    again = plan(net, None, None, True)
    assert again.planned is not first.planned and again[2].shape == (16, 3) and again[2].tensor is net.proj.weight
    assert again.planned.quick is not None  # the one-call metadata check is what the steady state uses
    with torch.no_grad():  # the same shape in another dtype: not the cached plan
        net.proj.weight.data = torch.zeros(16, 3, dtype=torch.float64)
    recast = plan(net, None, None, True)
    assert recast.planned is not again.planned and recast[2].dtype == torch.float64
    with torch.no_grad():
        net.proj.weight.data = torch.zeros(16, 3)
    again = plan(net, None, None, True)
    assert again[2].dtype == torch.float32

    net.proj.bias = nn.Parameter(torch.ones(16, dtype=torch.float64))  # a new object
    third = plan(net, None, None, True)
    assert third.planned is not again.planned and third[3].tensor is net.proj.bias
    assert third[3].dtype == torch.float64 and plan(net, None, None, True).planned is third.planned

    mapping = {"steps": None}
    renamed = plan(net, "bfloat16", mapping, True)
    assert [e.name for e in renamed] == names[1:] and {e.dtype for e in renamed} == {torch.bfloat16}
    assert plan(net, torch.bfloat16, mapping, True).planned is renamed.planned  # a dtype's name or itself
    mapping["proj.bias"] = "bias"  # the same dict, changed
    changed = plan(net, torch.bfloat16, mapping, True)
    assert changed.planned is not renamed.planned and changed[2].name == "bias"
    # Without buffers the map still names a tensor of the module (one map serves both ways).
    assert "steps" not in [e.source_name for e in plan(net, torch.bfloat16, mapping, False)]
    assert [e.name for e in plan(net, None, lambda n: n.upper(), True)] == [n.upper() for n in names]
    assert plan(net, None, None, True).planned is not third.planned  # the cache holds the last plan only
    # The cache holds no tensor: a replaced parameter is freed.
    old = weakref.ref(net.norm.weight)
    net.norm.weight = nn.Parameter(torch.ones(16))
    del cached, first, again, recast, third, renamed, changed
    gc.collect()
    assert old() is None


def test_module_loader_copies_large_targets_one_by_one_and_the_rest_fused(monkeypatch):
    """Large CUDA targets are copied one by one (a device memcpy beats the fused copy there), the rest
    in one fused copy; every target gets its own source bit for bit, whatever the split."""
    from torchxfer import loading

    gen = torch.Generator().manual_seed(3)
    dst = [torch.zeros(n) for n in (5, 700, 3, 1000, 1)]
    src = [torch.randn(d.numel(), generator=gen) for d in dst]
    fused: list[int] = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda d, s: (fused.append(len(d)), real(d, s)))
    loading._copy(dst, src, [1, 3])
    assert fused == [3]
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    loading._copy(dst, [s * 2 for s in src], [0, 1, 2, 3, 4])  # all alone: no fused copy
    assert fused == [3] and all(torch.equal(d, s * 2) for d, s in zip(dst, src))
    # Only CUDA targets of ALONE_BYTES or more are picked.
    assert loading._alone([torch.zeros(loading.ALONE_BYTES // 4)]) == []
    if torch.cuda.is_available():
        big = torch.zeros(loading.ALONE_BYTES // 4, device="cuda")
        assert loading._alone([torch.zeros(4, device="cuda"), big]) == [1]


def test_a_name_map_may_name_an_excluded_buffer_or_a_tied_alias():
    """One name_map serves with include_buffers True and False: a buffer left out, or the second
    name of a tied weight (sent once, under its first name), is a name of the module, not a typo."""
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 5, bias=False))
    model[2].weight = model[0].weight  # tied
    name_map = {"1.running_var": "bn.var", "2.weight": "head.weight", "0.weight": "tok.weight"}
    with_buffers = update_info_for(model, name_map=name_map)
    without = update_info_for(model, name_map=name_map, include_buffers=False)
    assert with_buffers.names == ["tok.weight", "1.weight", "1.bias", "1.running_mean", "bn.var", "1.num_batches_tracked"]
    assert without.names == ["tok.weight", "1.weight", "1.bias"]
    with pytest.raises(ValueError, match=r"does not have: \['2.bias'\]"):
        update_info_for(model, name_map={"2.bias": "x"}, include_buffers=False)


def test_module_loader_checks_its_targets_again_when_the_module_changed_them():
    """A batch the loader has seen, after the module was cast in place (the same Parameters, new
    data): the dtype ValueError, never a silent cast; and after new storage of another shape."""
    from torchxfer import ModuleLoader

    module = torch.nn.Linear(4, 3)
    batch = [("weight", torch.randn(3, 4)), ("bias", torch.randn(3))]
    loader = ModuleLoader(module)
    for _ in range(2):  # the second takes the fast path
        with loader.update():
            loader(batch)
    assert torch.equal(module.weight.detach(), batch[0][1])
    module.half()
    with pytest.raises(ValueError, match="'weight': dtype float32, the module has float16"):
        with loader.update():
            loader(batch)
    module.float()
    with loader.update():
        loader(batch)
    with torch.no_grad():
        module.bias.data = torch.zeros(6)
    with pytest.raises(ValueError, match="bias"):
        with loader.update():
            loader(batch)
