"""Graph rewrites on torch models that quantization relies on.

Quantization wraps ``nn.Conv2d`` and ``nn.Linear`` modules by their exact names, and
quantizes the weights the deployed model will use, i.e. with BatchNorm folded in.
These rewrites make both hold for traced ``nn.Module`` models and for ``torch.export``
programs alike (whose layers are aten calls on parameters, not modules).
"""

from __future__ import annotations

import copy
import logging
import types

import torch
from torch import fx, nn

log = logging.getLogger(__name__)

_aten = torch.ops.aten


def eval_mode(module: nn.Module) -> nn.Module:
    """``module.eval()`` that also works on exported programs' modules (which refuse ``eval()``)."""
    for sub in module.modules():
        sub.training = False
    return module


def _replace_container(root: nn.Module, path: str, module: nn.Module) -> bool:
    """Put ``module`` at ``path`` if the holder there has no children (only the tensors)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    holder = getattr(parent, leaf, None)
    if not isinstance(holder, nn.Module) or any(True for _ in holder.children()):
        return False
    setattr(parent, leaf, module)
    return True


def modules_from_exported(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """Turn an exported program's conv2d, linear and batch_norm calls into modules at their original paths."""
    gm = program.module()
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        args = list(node.args)
        if node.target is _aten.conv2d.default and isinstance(args[1], fx.Node) and args[1].op == "get_attr":
            weight_node = args[1]
            bias_node = args[2] if len(args) > 2 else None
            weight = gm.get_parameter(weight_node.target)
            stride, padding, dilation, groups = (args + [None] * 7)[3:7]
            groups = groups or 1
            module = nn.Conv2d(
                weight.shape[1] * groups,
                weight.shape[0],
                tuple(weight.shape[2:]),
                stride=tuple(stride or (1, 1)),
                padding=tuple(padding or (0, 0)),
                dilation=tuple(dilation or (1, 1)),
                groups=groups,
                bias=bias_node is not None,
            )
        elif node.target is _aten.linear.default and isinstance(args[1], fx.Node) and args[1].op == "get_attr":
            weight_node = args[1]
            bias_node = args[2] if len(args) > 2 else None
            weight = gm.get_parameter(weight_node.target)
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias_node is not None)
        elif node.target is _aten.batch_norm.default and all(
            isinstance(a, fx.Node) and a.op == "get_attr" for a in args[1:5]
        ):
            weight_node = args[1]
            weight = gm.get_parameter(weight_node.target)
            module = nn.BatchNorm2d(weight.shape[0], eps=float(args[7]))
            bias_node = args[2]
            module.running_mean.copy_(gm.get_buffer(args[3].target))
            module.running_var.copy_(gm.get_buffer(args[4].target))
        else:
            continue
        path = weight_node.target.rpartition(".")[0]
        if not path or (bias_node is not None and bias_node.target.rpartition(".")[0] != path):
            continue
        eval_mode(module)
        module.weight = gm.get_parameter(weight_node.target)
        if bias_node is not None:
            module.bias = gm.get_parameter(bias_node.target)
        if not _replace_container(gm, path, module):
            continue
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(path, (args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    _allow_eval(gm)
    return gm


def _allow_eval(gm: fx.GraphModule) -> None:
    """Let ``eval()`` work on an exported program's module, as on any model a user passes.

    ``ExportedProgram.module()`` makes ``train()`` and ``eval()`` raise, because the graph's
    ops were fixed when it was exported. Once its BatchNorms are modules again, evaluation
    mode means what it means elsewhere; training mode still cannot be honoured, so it raises.
    """

    def train(self, mode: bool = True):
        if mode:
            raise NotImplementedError("an exported program's module runs as exported: it has no training mode")
        return eval_mode(self)

    gm.train = types.MethodType(train, gm)
    gm.__dict__.pop("eval", None)  # nn.Module.eval calls train(False)


class _LayerTracer(fx.Tracer):
    """Keeps every Conv2d/Linear (subclasses too, e.g. same-padding convs) a module call, so wrappers run."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) or super().is_leaf_module(
            module, qualified_name
        )


def trace(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, _LayerTracer().trace(model), model.__class__.__name__)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d that directly follows a Conv2d into the conv's weight and bias.

    Returns a copy. A plain module keeps its own classes and forward code (each folded
    BatchNorm becomes an ``nn.Identity``), so its blocks can still be run one at a time;
    the pairs are found by tracing with torch.fx. An exported program's module (already a
    graph) is rewritten as a graph. A model that cannot be traced is returned unchanged
    (its BatchNorms then stay float ops).
    """
    model = copy.deepcopy(model)
    if isinstance(model, fx.GraphModule):
        return _fold_in_graph(model)
    try:
        gm = trace(model)
    except Exception as exc:  # noqa: BLE001 - tracing fails in many ways on dynamic code
        log.warning("BatchNorm left unfolded: model cannot be traced by torch.fx (%s)", str(exc).splitlines()[0])
        return model
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in gm.graph.nodes:
        pair = _conv_bn_pair(node, modules)
        if pair is None or calls[node.target] != 1 or calls[pair[0]] != 1:
            continue
        _fold_pair(modules[pair[0]], modules[pair[1]])
        _replace_container_module(model, pair[1], nn.Identity())
        folded += 1
    log.debug("folded %d BatchNorm layers", folded)
    return model


def _conv_bn_pair(node, modules) -> tuple[str, str] | None:
    """(conv, batchnorm) targets when ``node`` calls a BatchNorm2d whose only input is a Conv2d used nowhere else."""
    if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
        return None
    source = node.args[0]
    if not (
        isinstance(source, fx.Node)
        and source.op == "call_module"
        and isinstance(modules.get(source.target), nn.Conv2d)
        and len(source.users) == 1
    ):
        return None
    return source.target, node.target


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
        beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
        factor = gamma * inv_std
        conv.weight.copy_(conv.weight * factor.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)


def _replace_container_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _fold_in_graph(gm: fx.GraphModule) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        pair = _conv_bn_pair(node, modules)
        if pair is None:
            continue
        _fold_pair(modules[pair[0]], modules[pair[1]])
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    log.debug("folded %d BatchNorm layers", folded)
    return gm


def execution_order(model: nn.Module, names: list[str], example: torch.Tensor) -> list[str]:
    """``names`` (submodule paths) in the order a forward pass on ``example`` first calls them; uncalled ones last."""
    order: list[str] = []

    def record(name):
        def hook(_module, _args):
            if name not in order:
                order.append(name)

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return order + [name for name in names if name not in order]
