"""One test per private torch/hypothesis internal in pytest_gpumem._compat: each fails loudly, naming the
internal and the torch version, when a release moves or changes it."""
from __future__ import annotations

import inspect
import warnings

import hypothesis
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.utils.checkpoint import checkpoint

from pytest_gpumem import _compat

TORCH = f"torch {torch.__version__}"


def _moved(internal: str) -> str:
    return f"{internal} moved or changed in {TORCH}: update pytest_gpumem/_compat/"


def test_dispatch_mode_and_pytree_are_importable():
    assert hasattr(_compat.TorchDispatchMode, "__torch_dispatch__"), _moved("torch.utils._python_dispatch.TorchDispatchMode")
    leaves, spec = _compat.tree_flatten({"a": (1, 2), "b": [3]})
    assert sorted(leaves) == [1, 2, 3] and _compat.tree_unflatten(leaves, spec) == {"a": (1, 2), "b": [3]}, \
        _moved("torch.utils._pytree")
    assert _compat.tree_map(lambda x: x * 2, [1, (2,)]) == [2, (4,)], _moved("torch.utils._pytree.tree_map")


def test_storage_key_is_shared_by_views_and_distinct_between_storages():
    a = torch.empty(4, 4, device="meta")
    b = torch.empty(4, 4, device="meta")
    assert _compat.storage_key(a) == _compat.storage_key(a[1:]) == _compat.storage_key(a.t()), \
        _moved("UntypedStorage._cdata")
    assert _compat.storage_key(a) != _compat.storage_key(b), _moved("UntypedStorage._cdata")


def test_is_view():
    x = torch.ones(3, 3)
    assert _compat.is_view(x[0]) and not _compat.is_view(x), _moved("Tensor._is_view")


def test_sequence_nr_orders_autograd_nodes():
    x = torch.ones(2, requires_grad=True)
    first = x * 2
    second = first + 1
    assert _compat.sequence_nr(second.grad_fn) > _compat.sequence_nr(first.grad_fn), _moved("Node._sequence_nr")


def test_running_backward_is_true_only_inside_the_engine():
    seen = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(_compat.running_backward()))
    assert not _compat.running_backward(), _moved("torch._C._current_graph_task_id")
    y.sum().backward()
    assert seen == [True], _moved("torch._C._current_graph_task_id")


def test_module_registries_are_the_dicts_the_module_reads():
    lin = torch.nn.Linear(2, 2)
    params, buffers = _compat.module_registries(lin)
    replacement = torch.nn.Parameter(torch.zeros(2, 2))
    params["weight"] = replacement
    assert lin.weight is replacement, _moved("nn.Module._parameters")
    bn = torch.nn.BatchNorm1d(2)
    assert "running_mean" in _compat.module_registries(bn)[1], _moved("nn.Module._buffers")


def test_module_dict_keys():
    lin = torch.nn.Sequential(torch.nn.Linear(2, 2))
    state = vars(lin[0])
    for key in _compat.MODULE_TENSOR_DICTS:
        assert isinstance(state.get(key), dict), _moved(f"nn.Module.__dict__[{key!r}]")
    assert state["_parameters"]["weight"] is lin[0].weight, _moved("nn.Module.__dict__['_parameters']")
    assert vars(lin)[_compat.MODULE_CHILDREN_DICT]["0"] is lin[0], _moved("nn.Module.__dict__['_modules']")


def test_forward_hook_counts():
    lin = torch.nn.Linear(2, 2)
    assert _compat.forward_hook_counts(lin) == (0, 0)
    lin.register_forward_hook(lambda *a: None)
    lin.register_forward_pre_hook(lambda *a: None)
    lin.register_forward_pre_hook(lambda *a: None)
    assert _compat.forward_hook_counts(lin) == (1, 2), _moved("nn.Module._forward_hooks/_forward_pre_hooks")


def test_op_returns_nothing_reads_the_schema():
    assert _compat.op_returns_nothing(torch.ops.aten._foreach_add_.Scalar), _moved("OpOverload._schema")
    assert not _compat.op_returns_nothing(torch.ops.aten.add.Tensor), _moved("OpOverload._schema")


def test_foreach_sqrt_op():
    out = _compat.foreach_sqrt_op()([torch.full((2,), 4.0)])
    assert torch.equal(out[0], torch.full((2,), 2.0)), _moved("aten._foreach_sqrt.default")


def test_cudnn_attention_on_meta_accepts_grouped_query_shapes():
    # 4 query heads over 2 key/value heads: the output has the query's shape (B, Hq, L, E) = (2, 4, 5, 8)
    q = torch.empty(2, 4, 5, 8, device="meta", dtype=torch.bfloat16)
    k = v = torch.empty(2, 2, 5, 8, device="meta", dtype=torch.bfloat16)
    out = _compat.cuda_cudnn_attention(q, k, v, None, compute_log_sumexp=True, dropout_p=0.0, is_causal=True,
                                       scale=None)
    assert out.shape == (2, 4, 5, 8), _moved("aten._scaled_dot_product_cudnn_attention")


def test_onednn_lstm_layer_on_meta_returns_output_states_and_a_workspace():
    # T=5, B=2, I=3, H=4: output (T, B, H), hy and cy (B, H), then the uint8 workspace (empty on meta)
    x = torch.empty(5, 2, 3, device="meta")
    w = (torch.empty(16, 3, device="meta"), torch.empty(16, 4, device="meta"), torch.empty(16, device="meta"),
         torch.empty(16, device="meta"))
    h = torch.empty(2, 4, device="meta")
    out, hy, cy, ws = _compat.onednn_lstm_layer(x, w, h, h, reverse=False, num_layers=1, has_biases=True,
                                                bidirectional=False, batch_first=False, train=True)
    assert (out.shape, hy.shape, cy.shape, ws.dtype) == ((5, 2, 4), (2, 4), (2, 4), torch.uint8), \
        _moved("aten.mkldnn_rnn_layer")


def test_mkldnn_bf16_support_is_a_bool():
    assert isinstance(_compat.mkldnn_bf16_supported(), bool), _moved("torch.ops.mkldnn._is_mkldnn_bf16_supported")


def test_sdp_backend_switches_follow_sdpa_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        assert _compat.sdp_backends_enabled() == {"flash": True, "cudnn": False, "efficient": False, "math": False}, \
            _moved("torch.backends.cuda.*_sdp_enabled")
    assert all(_compat.sdp_backends_enabled().values())


def test_attention_kernels_on_meta_return_the_output_shape():
    # (B, H, L, E) = (2, 3, 5, 8): every kernel's output is B*H*L*E like q
    q = k = v = torch.empty(2, 3, 5, 8, device="meta", dtype=torch.float16)
    assert _compat.cpu_flash_attention(q.float(), k.float(), v.float(), is_causal=False, attn_mask=None,
                                       scale=None).shape == (2, 3, 5, 8), \
        _moved("aten._scaled_dot_product_flash_attention_for_cpu")
    assert _compat.cuda_flash_attention(q, k, v, dropout_p=0.0, is_causal=True, scale=None).shape == (2, 3, 5, 8), \
        _moved("aten._scaled_dot_product_flash_attention")
    out = _compat.cuda_efficient_attention(q, k, v, None, compute_log_sumexp=True, dropout_p=0.0, is_causal=False,
                                           scale=None)
    assert out.shape == (2, 3, 5, 8), _moved("aten._scaled_dot_product_efficient_attention")


def test_top_pack_hook_sees_the_innermost_saved_tensors_hooks():
    def pack(t):
        return t

    assert _compat.top_pack_hook() is None, _moved("torch._C._autograd._top_saved_tensors_default_hooks")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        assert _compat.top_pack_hook() is pack, _moved("torch._C._autograd._top_saved_tensors_default_hooks")


def test_checkpoint_pack_hook_is_recognised_inside_checkpoint_only():
    seen = []

    def body(x):
        pack = _compat.top_pack_hook()
        seen.append(pack is not None and _compat.is_checkpoint_pack_hook(pack))
        return x.sin()

    x = torch.ones(3, requires_grad=True)
    checkpoint(body, x, use_reentrant=False)
    assert seen == [True], _moved("torch.utils.checkpoint._checkpoint_hook's pack_hook")
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert not _compat.is_checkpoint_pack_hook(_compat.top_pack_hook())


def test_function_copies_without_torch_function_checks():
    assert _compat.checks_torch_function(F.multi_head_attention_forward), \
        _moved("torch.nn.functional's has_torch_function checks")
    assert not _compat.checks_torch_function(torch.relu)
    clone = _compat.without_torch_function_checks(F.layer_norm)
    assert clone is _compat.without_torch_function_checks(F.layer_norm)  # made once per function
    for name in _compat.HAS_TORCH_FUNCTION_NAMES:
        assert clone.__globals__[name]() is False
    x = torch.randn(2, 4)
    assert torch.equal(clone(x, (4,)), F.layer_norm(x, (4,))), _moved("F.layer_norm's code object")


def test_autocast_lists_were_checked_on_this_torch():
    (lo_major, lo_minor), (hi_major, hi_minor) = _compat.AUTOCAST_LISTS_CHECKED
    assert (lo_major, lo_minor) <= _compat.TORCH_VERSION <= (hi_major, hi_minor), (
        f"the emulation's autocast op lists were checked on torch {lo_major}.{lo_minor}..{hi_major}.{hi_minor}, not "
        f"{TORCH}: compare aten/src/ATen/autocast_mode.cpp with _emulation/autocast.py, then extend "
        "_compat.AUTOCAST_LISTS_CHECKED")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compat.warn_if_unchecked("x", _compat.AUTOCAST_LISTS_CHECKED)
    with pytest.warns(_compat.UncheckedTorchWarning, match="checked on torch 1.0 .. 1.1"):
        assert not _compat.warn_if_unchecked("x", ((1, 0), (1, 1)))


def test_python_op_namespaces_hold_the_autocast_callables():
    namespaces = _compat.python_op_namespaces()
    assert any(getattr(ns, "linear", None) is not None for ns in namespaces[2:3]), _moved("torch._C._nn.linear")
    assert hasattr(namespaces[4], "matmul"), _moved("torch._C.TensorBase")


def test_amp_availability_check_is_called_through_the_module():
    owner, name = _compat.amp_availability_patch_target()
    calls = []
    original = getattr(owner, name)
    setattr(owner, name, lambda: calls.append(1) or False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scaler = torch.amp.GradScaler("cuda")
    finally:
        setattr(owner, name, original)
    assert calls and scaler.is_enabled(), _moved("torch.cuda.amp.common.amp_definitely_not_available")


def test_grad_scaler_private_attributes():
    owner, name = _compat.grad_scaler_step_patch_target()
    scaler = torch.amp.GradScaler("cpu")
    lin = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler.scale(lin(torch.ones(1, 2)).sum()).backward()
    for attr in _compat.GRAD_SCALER_ATTRIBUTES:
        assert hasattr(scaler, attr), _moved(f"torch.amp.GradScaler.{attr}")
    calls = []
    original = getattr(owner, name)
    setattr(owner, name, lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    try:
        scaler.step(opt)
    finally:
        setattr(owner, name, original)
    assert calls == [1], _moved("torch.amp.GradScaler._maybe_opt_step (no longer called by step)")
    assert scaler._get_growth_tracker() == 0, _moved("torch.amp.GradScaler._get_growth_tracker")


def test_memory_history_functions_take_the_arguments_we_pass():
    record = torch.cuda.memory._record_memory_history
    params = inspect.signature(record).parameters
    assert {"enabled", "max_entries"} <= set(params), _moved("torch.cuda.memory._record_memory_history")
    assert "filename" in inspect.signature(torch.cuda.memory._dump_snapshot).parameters, \
        _moved("torch.cuda.memory._dump_snapshot")


def test_allocator_trace_functions_take_our_arguments_and_answer_plain_dicts():
    """benchmarks/record_cuda_corpus.py records the CUDA corpus through these two (issue 10)."""
    params = inspect.signature(torch.cuda.memory._record_memory_history).parameters
    assert {"enabled", "context", "stacks", "max_entries"} <= set(params), \
        _moved("torch.cuda.memory._record_memory_history")
    snapshot = _compat.allocator_snapshot()            # answers without a GPU too (empty lists)
    assert {"segments", "device_traces", "allocator_settings"} <= set(snapshot), _moved("torch.cuda.memory._snapshot")
    assert "PYTORCH_CUDA_ALLOC_CONF" in snapshot["allocator_settings"], _moved("torch.cuda.memory._snapshot")


def test_hypothesis_digest_changes_the_database_key():
    from hypothesis.internal.reflection import function_digest

    @given(st.integers())
    def prop(x):
        pass

    before = function_digest(prop.hypothesis.inner_test)
    _compat.set_hypothesis_digest(prop, b"one")
    one = function_digest(prop.hypothesis.inner_test)
    _compat.set_hypothesis_digest(prop, b"two")
    assert before != one != function_digest(prop.hypothesis.inner_test), (
        f"hypothesis {hypothesis.__version__} no longer reads _hypothesis_internal_add_digest: "
        "update pytest_gpumem/_compat/")


def test_a_missing_internal_is_named_with_the_torch_version():
    err = _compat.TorchInternalMissing("torch._C._autograd._gone")
    assert "torch._C._autograd._gone" in str(err) and torch.__version__ in str(err)
    with pytest.raises(_compat.TorchInternalMissing, match="_nope"):
        _compat._require(torch._C, "_nope", "torch._C")


def test_function_mode_stack_lists_the_active_modes():
    from torch.overrides import TorchFunctionMode

    assert _compat.function_mode_stack() == []
    with TorchFunctionMode() as mode:
        assert _compat.function_mode_stack() == [mode]


def test_compiled_original_unwraps_torch_compile_without_compiling():
    model = torch.nn.Linear(2, 2)
    assert _compat.compiled_original(torch.compile(model)) is model
    assert _compat.compiled_original(model) is None


def test_sparse_parts_are_the_indices_and_values_of_an_uncoalesced_tensor():
    t = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2]]), torch.ones(3, 4), (5, 4))
    indices, values = _compat.sparse_parts(t)
    assert indices.shape == (1, 3) and values.shape == (3, 4)


def test_checkpoint_infers_its_device_type_through_the_module():
    owner, name = _compat.checkpoint_device_type_patch_target()
    calls = []
    original = getattr(owner, name)
    setattr(owner, name, lambda *args: calls.append(1) or original(*args))
    try:
        checkpoint(torch.sin, torch.ones(2, requires_grad=True), use_reentrant=False).sum().backward()
    finally:
        setattr(owner, name, original)
    assert calls, _moved("torch.utils.checkpoint._infer_device_type (called through the module)")


def test_checkpoint_hands_the_function_it_recomputes_to_the_patched_callables():
    calls = []
    for owner, name in _compat.checkpoint_recompute_patch_targets():
        stored = vars(owner)[name]
        original = getattr(owner, name)

        def spy(first_arg_holder, fn, *args, _original=original, **kwargs):
            def counted(*a, **k):
                calls.append(name)
                return fn(*a, **k)
            return _original(first_arg_holder, counted, *args, **kwargs)

        setattr(owner, name, staticmethod(spy) if isinstance(stored, staticmethod) else spy)
        try:
            for reentrant in (False, True):
                x = torch.ones(2, requires_grad=True)
                checkpoint(torch.sin, x, use_reentrant=reentrant).sum().backward()
        finally:
            setattr(owner, name, stored)
    # non-reentrant: the frame's recompute_fn runs in backward; reentrant: run_function runs in forward and backward
    assert calls.count("__init__") >= 1 and calls.count("forward") == 2, \
        _moved("torch.utils.checkpoint._CheckpointFrame.__init__ / CheckpointFunction.forward")


def test_the_fused_device_check_asks_the_patched_function():
    owner, name = _compat.fused_devices_patch_target()
    original = getattr(owner, name)
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(RuntimeError, match="fused=True"):
        owner._device_dtype_check_for_fused(p)
    setattr(owner, name, lambda: [*original(), "meta"])
    try:
        owner._device_dtype_check_for_fused(p)  # meta is accepted once the function answers it
    finally:
        setattr(owner, name, original)


def test_fake_process_group_runs_collectives_on_meta_tensors():
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=_compat.fake_store(), rank=0, world_size=4)
    try:
        shard = torch.empty(3, device="meta")
        gathered = torch.empty(12, device="meta")  # 4 ranks x 3
        dist.all_gather_into_tensor(gathered, shard)
        dist.all_reduce(shard)
        assert dist.get_world_size() == 4, _moved("the fake process-group backend")
    finally:
        dist.destroy_process_group()


def test_fsdp2_and_ddp_meta_patch_targets_exist_with_the_names_we_replace():
    for owner, attr, replacement in [*_compat.fsdp2_meta_patches(), *_compat.ddp_meta_patches()]:
        assert callable(getattr(owner, attr)), _moved(f"{getattr(owner, '__name__', owner)}.{attr}")
        assert callable(replacement)
    patched = {(getattr(o, "__name__", ""), a) for o, a, _ in _compat.fsdp2_meta_patches()}
    # the device comes from the mesh in two modules, the stream handle is imported into four, meta is refused once
    assert sum(a == "_get_device_from_mesh" for _, a in patched) == 2, _moved("FSDP2 _get_device_from_mesh")
    assert sum(a == "_get_device_handle" for _, a in patched) == 4, _moved("FSDP2 _get_device_handle imports")


def test_storage_resize_can_be_wrapped_and_untyped_storages_resize_in_place():
    owner, name = _compat.storage_resize_patch_target()
    assert owner is torch.UntypedStorage and callable(getattr(owner, name)), _moved("torch.UntypedStorage.resize_")
    t = torch.ones(8)
    getattr(owner, name)(t.untyped_storage(), 0)  # what FSDP2 does to free an unsharded parameter
    assert t.untyped_storage().nbytes() == 0, _moved("UntypedStorage.resize_ (in place)")


def test_dtensor_local_is_none_for_plain_tensors():
    # DTensors themselves (FSDP2's shards) are checked in a gloo process: tests/test_parallel_gloo.py (compat)
    assert _compat.dtensor_local(torch.ones(2)) is None
    assert _compat.dtensor_local(torch.nn.Parameter(torch.ones(2))) is None


def test_fsdp2_prefetch_goes_through_a_static_method_we_can_wrap():
    owner, name = _compat.fsdp_prefetch_patch_target()
    assert isinstance(owner.__dict__[name], staticmethod), _moved("FSDPParamGroup._prefetch_unshard (a staticmethod)")
    assert list(inspect.signature(getattr(owner, name)).parameters) == ["target_fsdp_param_group", "pass_type"], \
        _moved("FSDPParamGroup._prefetch_unshard(target_fsdp_param_group, pass_type)")


def test_the_nn_loss_ops_are_what_the_f_losses_call():
    ops = _compat.nn_loss_ops()
    assert [op.__name__ for op in ops] == ["mse_loss", "smooth_l1_loss", "soft_margin_loss", "binary_cross_entropy"], \
        _moved("torch._C._nn.{mse_loss, smooth_l1_loss, soft_margin_loss, binary_cross_entropy}")
    x = torch.ones(3)
    assert ops[0](x, x, 1).item() == 0.0, _moved("torch._C._nn.mse_loss(input, target, reduction)")  # 1: mean


def test_the_collectives_gloo_ranks_settle_are_where_their_callers_look_them_up():
    import torch.distributed as dist

    owner, names = _compat.gloo_collective_patch_targets()
    assert owner is dist
    for name in names:
        if name in _compat.WAITS_IN_CPP:  # DDP's constructor calls these, and they wait in C++
            assert callable(getattr(dist, name)), _moved(f"torch.distributed.{name}")
        else:  # FSDP2 and ZeroRedundancyOptimizer pass async_op= and keep the Work
            assert "async_op" in inspect.signature(getattr(dist, name)).parameters, \
                _moved(f"torch.distributed.{name}(..., async_op=)")
    # each caller reaches them as dist.<name> at call time, so wrapping them on torch.distributed reaches it
    import torch.distributed.optim.zero_redundancy_optimizer as zero
    import torch.distributed.utils as dist_utils
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    fsdp2 = inspect.getsource(_fsdp_collectives)
    assert any(f"dist.{n}(" in fsdp2 for n in names if "gather" in n), _moved("FSDP2's all-gather call")
    assert any(f"dist.{n}(" in fsdp2 for n in names if "scatter" in n), _moved("FSDP2's reduce-scatter call")
    ddp = inspect.getsource(dist_utils)  # DDP's constructor: the shape check, then the module-state broadcast
    assert "dist._verify_params_across_processes(" in ddp, _moved("DDP's dist._verify_params_across_processes call")
    assert "dist._broadcast_coalesced(" in ddp, _moved("DDP's dist._broadcast_coalesced call")
    assert "dist.broadcast(" in inspect.getsource(zero), _moved("ZeroRedundancyOptimizer's dist.broadcast call")


def test_a_completed_work_is_a_finished_c10d_work():
    import torch.distributed as dist

    work = _compat.completed_work()
    assert isinstance(work, dist.distributed_c10d.Work), _moved("_create_work_from_future")  # FSDP2 checks this
    assert work.is_completed() and work.wait()


def test_a_collective_inside_a_coalescing_manager_hands_back_a_deferred_work():
    import torch.distributed as dist

    dist.init_process_group("fake", store=_compat.fake_store(), rank=0, world_size=4)
    try:
        with dist._coalescing_manager(async_ops=True) as coalesced:
            work = dist.all_gather_into_tensor(torch.empty(4), torch.ones(1), async_op=True)
            assert _compat.is_deferred_work(work), _moved("distributed_c10d._IllegalWork")
        coalesced.wait()
    finally:
        dist.destroy_process_group()
    assert not _compat.is_deferred_work(_compat.completed_work())


def test_tensor_use_count_counts_the_cpp_owners_of_a_tensor():
    t = torch.ones(3)
    alone = _compat.tensor_use_count(t)
    product = torch.ones(3, requires_grad=True) * t  # autograd saves t in C++, as a collective's Work holds it
    assert _compat.tensor_use_count(t) == alone + 1, _moved("Tensor._use_count()")
    del product
    assert _compat.tensor_use_count(t) == alone
