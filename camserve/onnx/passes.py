"""FX graph passes on traced ATen graphs: rewrite in-place operations out of place
(:func:`functionalize_inplace`), turn tensor constants into inputs (:func:`lift_constants`) and
element counts into products of sizes (:func:`numel_from_sizes`).

Example::

    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> def f(x):
    ...     y = x * 2
    ...     y.relu_()
    ...     return y + 1
    >>> gm = functionalize_inplace(make_fx(f)(torch.randn(3)))
    >>> [n.target for n in gm.graph.nodes if n.op == "call_function"]
    [<OpOverload(op='aten.mul', overload='Tensor')>, <OpOverload(op='aten.relu', overload='default')>, <OpOverload(op='aten.add', overload='Tensor')>]
"""
from __future__ import annotations

import operator
from typing import Mapping

import torch

aten = torch.ops.aten

__all__ = ["functionalize_inplace", "lift_constants", "numel_from_sizes"]


def _returns_alias(node: torch.fx.Node) -> bool:
    """Whether ``node``'s output may alias one of its inputs (a view), or is unknown."""
    if node.op != "call_function":
        return True
    if node.target is operator.getitem:
        return _returns_alias(node.args[0])  # type: ignore[arg-type]
    if not isinstance(node.target, torch._ops.OpOverload):
        return True
    return any(r.alias_info is not None for r in node.target._schema.returns)


_SCATTER_OF_VIEW = {
    "aten::slice.Tensor": aten.slice_scatter.default,  # slice(x, dim, start, end, step)
    "aten::select.int": aten.select_scatter.default,   # select(x, dim, index)
}


def _view_chain(node: torch.fx.Node) -> tuple[list[torch.fx.Node], torch.fx.Node]:
    """``node`` as slices/selects of a base tensor: (views, innermost first; base)."""
    chain: list[torch.fx.Node] = []
    cur = node
    while (cur.op == "call_function" and isinstance(cur.target, torch._ops.OpOverload)
           and cur.target._schema.name + "." + cur.target._overloadname in _SCATTER_OF_VIEW):
        chain.append(cur)
        cur = cur.args[0]  # type: ignore[assignment]
    return chain, cur


def _used_after(node: torch.fx.Node, position: int, order: Mapping[torch.fx.Node, int]) -> bool:
    return any(order.get(u, -1) > position for u in node.users)


def functionalize_inplace(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite in-place ATen operations out of place, in place on ``gm``.

    * ``y = op_(x)`` (``relu_``, ``add_``, ...) becomes ``y' = op(x)``, and every later use of
      ``x`` reads ``y'``;
    * ``copy_(x[a:b, c], v)`` — a write through slices/selects of a fresh tensor, as in
      ``mask[h0:h1, w0:w1] = k`` (Swin's attention mask) — becomes
      ``x' = slice_scatter(x, select_scatter(x[a:b], v, ...), ...)``, and later uses of ``x``
      read ``x'``.

    Sound only when nothing else sees the written storage, so it raises ValueError when the
    written tensor is a graph input, a constant, another kind of view, or has a view that is read
    after the write; exporters that need a functional graph can fall back to their own
    functionalisation then.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if not schema.is_mutable:
            continue
        written = [i for i, a in enumerate(schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write]
        if written != [0] or not isinstance(node.args[0], torch.fx.Node):
            raise ValueError(f"cannot functionalize {node.format_node()}: it writes to "
                             f"arguments {written}")
        pos = order[node]
        dst: torch.fx.Node = node.args[0]
        chain, base = _view_chain(dst)
        if _returns_alias(base):
            raise ValueError(f"cannot functionalize {node.format_node()}: it writes to a graph "
                             f"input, a constant or a view")
        for n in [base, *chain]:  # a view taken before the write and read after it would change
            for user in n.users:
                if (user is not node and user not in chain and user.op == "call_function"
                        and _returns_alias(user) and order.get(user, -1) < pos
                        and _used_after(user, pos, order)):
                    raise ValueError(f"cannot functionalize {node.format_node()}: the tensor it "
                                     f"writes to has a view that is read after the write")
        if any(_used_after(v, pos, order) for v in chain):
            raise ValueError(f"cannot functionalize {node.format_node()}: the view it writes "
                             f"through is read again after the write")
        anchor = node
        if node.target is aten.copy_.default:
            src: torch.fx.Node = node.args[1]  # type: ignore[assignment]
            sv, dv = src.meta.get("val"), dst.meta.get("val")
            if sv is None or dv is None or sv.shape != dv.shape or sv.dtype != dv.dtype:
                raise ValueError(f"cannot functionalize {node.format_node()}: copy with a "
                                 f"broadcast or a cast")
            new = src
        else:
            name = schema.name.split("::", 1)[1][:-1]
            try:
                outplace = getattr(getattr(aten, name), node.target._overloadname)
            except AttributeError:
                raise ValueError(f"cannot functionalize {node.format_node()}: no out-of-place "
                                 f"aten.{name}") from None
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(outplace, node.args, node.kwargs)
            new.meta = dict(node.meta)
            anchor = new
        value = new  # what the in-place op returns: the written tensor's new value
        for view in chain:  # innermost first: scatter the new value into each parent
            parent = view.args[0]
            op = _SCATTER_OF_VIEW[view.target._schema.name + "." + view.target._overloadname]  # type: ignore[union-attr]
            with gm.graph.inserting_after(anchor):
                new = gm.graph.call_function(op, (parent, new, *view.args[1:]), dict(view.kwargs))
            new.meta = {"val": parent.meta.get("val")}  # type: ignore[union-attr]
            anchor = new
        for user in list(base.users):
            if user is not node and order.get(user, -1) > pos:
                user.replace_input_with(base, new)
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def lift_constants(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Turn every tensor constant (``get_attr`` node) of ``gm`` into a placeholder after the user
    inputs, in place; return ``{placeholder name: tensor}`` (the weights, to store as
    initializers)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise ValueError("invalid value for gm: the graph has no inputs")
    last = placeholders[-1]
    consts: dict[str, torch.Tensor] = {}
    lifted: dict[str, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        key = str(node.target)
        value = getattr(gm, key)
        if not isinstance(value, torch.Tensor):
            continue
        ph = lifted.get(key)
        if ph is None:
            with gm.graph.inserting_after(last):
                ph = gm.graph.placeholder(key.replace(".", "_"))
            ph.meta["val"] = value
            consts[ph.name] = value.detach()
            lifted[key] = last = ph
        node.replace_all_uses_with(ph)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return consts


def numel_from_sizes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace every ``aten.sym_numel(t)`` by the product of ``t``'s sizes, in place on ``gm``:
    ``aten.sym_size.int`` for a symbolic dimension, the number for a static one — operations the
    ONNX translation knows. (A reshape to ``-1`` of a tensor with a symbolic batch size, such as
    Hugging Face Swin's attention mask expanded over the batch, traces to ``sym_numel``.)

    Example::

        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> gm = make_fx(lambda x: x.expand(2, -1, -1).reshape(-1, 4), tracing_mode="symbolic")(
        ...     torch.randn(1, 3, 4))
        >>> _ = numel_from_sizes(gm)
        >>> any(n.target is aten.sym_numel.default for n in gm.graph.nodes)
        False
        >>> gm(torch.randn(1, 5, 4)).shape
        torch.Size([10, 4])
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.sym_numel.default:
            continue
        src: torch.fx.Node = node.args[0]  # type: ignore[assignment]
        val = src.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"cannot rewrite {node.format_node()}: the shape of its input is unknown")
        static, product = 1, None
        with gm.graph.inserting_before(node):
            for dim, size in enumerate(val.shape):
                if isinstance(size, int):
                    static *= size
                    continue
                size_node = gm.graph.call_function(aten.sym_size.int, (src, dim))
                size_node.meta["val"] = size
                if product is None:
                    product = size_node
                else:
                    prev = product
                    product = gm.graph.call_function(operator.mul, (prev, size_node))
                    product.meta["val"] = prev.meta["val"] * size
            if product is not None and static != 1:
                prev = product
                product = gm.graph.call_function(operator.mul, (prev, static))
                product.meta["val"] = prev.meta["val"] * static
        if product is None:  # every dimension static: the count itself
            for user in list(node.users):
                user.args = torch.fx.node.map_arg(user.args, lambda a: static if a is node else a)
                user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: static if a is node else a)
        else:
            node.replace_all_uses_with(product)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
