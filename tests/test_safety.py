"""Never crash: an inconsistent graph (a CSRGraph edited in place or behind its version counter, raw arrays that
disagree) raises in every op, forward and backward, instead of reading out of bounds."""
import contextlib

import pytest
import torch

from revgnn_ext import ops, reference

from conftest import csr_graph, raises

N, E = 40, 300  # csr_graph()'s


# Edits that make a graph inconsistent: (tensor name, index, value). The op checks the row pointer's ends; the
# kernel a middle row pointer and the indices as it follows them.
CORRUPTIONS = {
    "rowptr_end": ("rowptr", -1, lambda: E + 5),
    "rowptr_start": ("rowptr", 0, lambda: 1),
    "rowptr_middle_huge": ("rowptr", 4, lambda: 10**6),
    "rowptr_middle_negative": ("rowptr", 4, lambda: -3),
    "rowptr_decreasing": ("rowptr", 4, lambda: E),  # above rowptr[5] (whose row then runs backwards)
    "col_huge": ("col", 7, lambda: 10**6),
    "col_negative": ("col", 0, lambda: -1),
    "col_t_huge": ("col_t", 3, lambda: N + 2),
    "perm_t_huge": ("perm_t", 5, lambda: E + 1),
    "perm_t_negative": ("perm_t", 0, lambda: -7),
    "rowptr_t_middle": ("rowptr_t", 3, lambda: 10**6),
}


def _raw_arrays(g, corruption=None):
    """rowptr, col, rowptr_t, col_t, perm_t of g (copies), one of them corrupted."""
    rowptr_t, col_t, perm_t = g.transposed()
    arrays = {"rowptr": g.rowptr, "col": g.col, "rowptr_t": rowptr_t, "col_t": col_t, "perm_t": perm_t}
    arrays = {k: v.clone() for k, v in arrays.items()}
    if corruption is not None:
        name, index, value = CORRUPTIONS[corruption]
        arrays[name][index] = value()
    return arrays


def _raw_calls(a):
    """Every op called raw on the arrays a: (name, arrays it reads, thunk); a valid max selection for backward."""
    x = torch.randn(N, 6, dtype=torch.float64)
    w = torch.rand(E, dtype=torch.float64)
    g_out = torch.randn(N, 6, dtype=torch.float64)
    graph = (a["rowptr"], a["col"], a["rowptr_t"], a["col_t"], a["perm_t"])
    r = torch.ops.revgnn_ext
    ok = _raw_arrays(_GOOD)
    arg = r.spmm(ok["rowptr"], ok["col"], None, None, None, w, x, "max")[1]
    gen_kw = (x, None, None, None, torch.tensor([1.3], dtype=torch.float64), None, "softmax", 1e-7)
    gen_out, gen_state = r.gen_aggregate(*(ok[k] for k in ("rowptr", "col")), None, None, None, *gen_kw)
    forward = {"rowptr", "col"}
    backward = {"rowptr", "rowptr_t", "col_t", "perm_t"}
    return [
        ("spmm", forward, lambda: r.spmm(*graph, w, x, "mean")),
        ("spmm_max", forward, lambda: r.spmm(*graph, w, x, "max")),
        ("spmm_accumulate_", forward, lambda: r.spmm_accumulate_(torch.zeros(N, 6, dtype=torch.float64),
                                                                  a["rowptr"], a["col"], w, x, "sum", 1.0)),
        ("spmm_backward_x", backward, lambda: r.spmm_backward_x(*graph, w, g_out, arg, "mean")),
        ("spmm_backward_x_max", backward - {"rowptr"}, lambda: r.spmm_backward_x(*graph, w, g_out, arg, "max")),
        ("spmm_backward_weight", forward, lambda: r.spmm_backward_weight(*graph, x, g_out, arg, "mean")),
        ("gen_aggregate", forward, lambda: r.gen_aggregate(*graph, *gen_kw)),
        ("gen_aggregate_backward", forward | backward,
         lambda: r.gen_aggregate_backward(*graph, *gen_kw[:6], gen_out, gen_state, g_out, *gen_kw[6:], [True] * 6)),
    ]


_GOOD = csr_graph()


@pytest.mark.parametrize("corruption", [None, *CORRUPTIONS])
def test_raw_ops_raise_on_inconsistent_arrays(corruption):
    """Each op that reads the corrupted array raises; on consistent arrays, none does."""
    calls = [call for _, reads, call in _raw_calls(_raw_arrays(_GOOD, corruption))
             if corruption is None or CORRUPTIONS[corruption][0] in reads]
    assert calls
    for call in calls:
        with raises(ValueError, "revgnn_ext") if corruption else contextlib.nullcontext():
            call()


def _public_calls(g):
    """Every op through the public API, with its backward: each a thunk."""
    x = torch.randn(N, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(E, dtype=torch.float64, requires_grad=True)
    attr = torch.randn(E, 3, dtype=torch.float64, requires_grad=True)
    lin = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    calls = [lambda r=r: ops.spmm(g, x, w, r).sum().backward() for r in reference.REDUCES]
    calls += [lambda a=a: ops.gen_aggregate(g, x, attr, lin, aggr=a).sum().backward() for a in reference.GEN_AGGRS]
    calls.append(lambda: ops.spmm(g, x.detach(), w.detach(), out=torch.zeros(N, 6, dtype=torch.float64)))
    return calls


@pytest.mark.parametrize("corruption", [c for c in CORRUPTIONS if CORRUPTIONS[c][0] in ("rowptr", "col")])
def test_graph_edited_in_place_raises_in_every_op(corruption):
    g = csr_graph()
    name, index, value = CORRUPTIONS[corruption]
    getattr(g, name)[index] = value()
    for call in _public_calls(g):
        with raises(RuntimeError, "CSRGraph"):
            call()


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_graph_edited_behind_its_version_counter_raises_in_every_op(corruption):
    g = csr_graph()  # .data shares the values, not the version counter: the kernels' checks catch the edit
    name, index, value = CORRUPTIONS[corruption]
    tensors = {"rowptr": g.rowptr, "col": g.col, **dict(zip(("rowptr_t", "col_t", "perm_t"), g.transposed()))}
    tensors[name].data[index] = value()
    raised = 0
    for call in _public_calls(g):
        try:
            call()
        except ValueError as e:
            assert "revgnn_ext" in str(e) and "CSRGraph" in str(e)
            raised += 1
    # Every op reads rowptr and col; the backward ops read the transposed CSR.
    assert raised == len(_public_calls(g)) - (1 if name.endswith("_t") else 0)


def test_attributes_are_read_only_and_a_valid_in_place_edit_is_refused_too():
    g = csr_graph()
    for name in ("rowptr", "col", "perm", "num_src"):
        with pytest.raises(AttributeError):
            setattr(g, name, getattr(g, name))
    g.transposed()
    g.col[0] = (g.col[0] + 1) % N  # valid, but it would make the cached transpose stale
    with raises(RuntimeError, "revgnn_ext.ops.spmm", "CSRGraph"):
        ops.spmm(g, torch.randn(N, 3))
