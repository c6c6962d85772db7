"""Turn a plain ``torch.nn`` model into a circuit.

``convert(model, rule, example_input=...)`` traces the model with ``torch.fx`` and maps its
graph onto populations, plastic synapses and identity pathways:

* every ``nn.Conv2d`` / ``nn.Linear`` becomes a synapse under ``rule`` (same stride, padding,
  groups and bias);
* a batch norm and an activation (ReLU, sigmoid, tanh) that follow a synapse fold into its post
  population (``norm="batch"``, ``activation=...``);
* a residual sum of two activities becomes a population fed by identity pathways (a following
  activation becomes that population's);
* ``nn.AdaptiveAvgPool2d(1)`` becomes a pooled population (``pool="global_avg"``); a flatten
  after it, or before a linear layer, needs nothing;
* ``nn.MaxPool2d`` (or ``F.max_pool2d``) becomes a max-pooling population (``pool="max"``, same
  kernel, stride and padding): the pooling of the drives it reads when nothing else has been
  folded into them, else a population of its own fed by an identity pathway (torchvision's
  stem, which pools after its ReLU). A batch norm or activation after it folds in.

Anything else (dropout, concatenation, dilated convolutions or max-pools, ``ceil_mode``, …) is
refused with a ``ConversionError`` naming the module or graph node.
``copy_weights(model, circuit)`` copies the forward weights, biases and batch-norm parameters
and statistics, so that a trained model can go on learning under another rule;
``export_weights(circuit, model)`` copies them back, so that a trained circuit can be evaluated
or deployed as a plain model. Both walk ``circuit.converted_from`` (model module path → circuit
state prefix), which ``convert`` and ``build_resnet`` (with torchvision's names) set.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from neurosim.common.errors import UserError
from neurosim.core.circuit import Circuit
from neurosim.core.kinds import Conv2d, Dense
from neurosim.rules.base import PlasticityRule

__all__ = ["convert", "copy_weights", "export_weights", "ConversionError"]


class ConversionError(UserError, ValueError):
    """A model, or a part of it, that a circuit cannot express."""


_ACT_MODULES = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                  torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_FLATTEN_METHODS = ("flatten", "view", "reshape")
# Positional arguments after the input, as each form of 2-D max pooling takes them.
_MAX_POOL_FUNCTIONS = {
    F.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    F.max_pool2d_with_indices: ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    torch.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
}


@dataclass
class _Pop:
    """A population that exists in the circuit; ``shape`` is the model's per-sample shape there."""

    name: str
    shape: tuple


@dataclass
class _Pending:
    """A population not yet made: its drives, and what has been folded into it so far."""

    drives: list  # ("syn", pre population name, module path) or ("id", pre population name)
    shape: tuple  # the model's per-sample shape of the value
    norm: str | None = None  # module path of the batch norm
    activation: str = "identity"
    pool: dict | None = None  # the population's pooling settings (pool=..., pool_kernel=...)
    names: list = field(default_factory=list)  # graph nodes folded in


@dataclass
class _BatchSize:
    """``x.size(0)``: only good as the first argument of a flattening view."""


class _Converter:
    def __init__(self, model: nn.Module, rule: PlasticityRule, example_input: torch.Tensor, seed: int):
        self.model = model
        self.modules = dict(model.named_modules())
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as e:  # control flow on values, unsupported Python, …
            raise ConversionError(f"cannot trace {type(model).__name__} with torch.fx: {e}") from e
        training = {m: m.training for m in model.modules()}
        try:
            self.gm.eval()
            with torch.no_grad():
                ShapeProp(self.gm).propagate(example_input)
        except Exception as e:
            raise ConversionError(f"running {type(model).__name__} on the example input "
                                  f"{tuple(example_input.shape)} failed: {e}") from e
        finally:
            for m, t in training.items():
                m.train(t)
        self.circuit = Circuit(rule=rule, seed=seed)
        self.mapping: dict[str, str] = {}  # model module path -> circuit state prefix
        self.used: set[str] = set()
        self.values: dict[fx.Node, object] = {}

    # -- helpers -------------------------------------------------------------------------------
    def shape(self, node: fx.Node) -> tuple:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise ConversionError(f"node {node.name!r} does not produce a single tensor")
        return tuple(meta.shape[1:])

    def value(self, node, user: fx.Node):
        if not isinstance(node, fx.Node) or node not in self.values:
            raise ConversionError(f"node {user.name!r} ({_what(user)}) takes {node!r}, which is not an "
                                  f"activity of the model")
        v = self.values[node]
        if isinstance(v, _Flat) and not (user.op == "call_module" and type(self.modules[user.target]) is nn.Linear):
            raise ConversionError(f"node {user.name!r} ({_what(user)}) reads a flattened (C, H, W) activity; only "
                                  f"a linear layer may (it flattens by itself)")
        return v

    def materialize(self, v) -> _Pop:
        """The population holding value ``v``, making it if ``v`` is pending."""
        if isinstance(v, _Pop):
            return v
        if isinstance(v, _BatchSize):
            raise ConversionError("a batch size is used as an activity")
        c = self.circuit
        name = v.names[-1]
        shape = v.shape
        if self.is_global(v):
            shape = (shape[0],)  # the population keeps (C,), the model (C, 1, 1)
        pop = c.population(name, shape, activation=v.activation, norm="batch" if v.norm else None,
                           **(v.pool or {}))
        if v.norm is not None:
            bn = self.modules[v.norm]
            pop.norm.eps, pop.norm.momentum = bn.eps, bn.momentum
            self.mapping[v.norm] = f"populations.{name}.norm"
        for drive in v.drives:
            if drive[0] == "id":
                c.identity(drive[1], name)
                continue
            _, pre, path = drive
            m = self.modules[path]
            syn_name = path.replace(".", "_") or "module"
            bias = m.bias is not None
            if isinstance(m, nn.Conv2d):
                kind = Conv2d(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.groups)
            else:
                kind = Dense(m.in_features, m.out_features)
            c.connect(pre, name, kind, bias=bias, name=syn_name)
            self.mapping[path] = f"synapses.{syn_name}"
        return _Pop(name, v.shape)

    def pending_for(self, node: fx.Node, user: fx.Node, *, fresh: bool = False) -> _Pending:
        """The input of ``user`` as a pending population it may fold into (single use), or a new
        pending population fed by an identity pathway from it."""
        v = self.value(node, user)
        if isinstance(v, _Pending) and not fresh:
            return v
        pop = self.materialize(v)
        return _Pending([("id", pop.name)], pop.shape)

    def is_global(self, v) -> bool:
        """Whether a value is globally average-pooled (model shape ``(C, 1, 1)``, population ``(C,)``)."""
        if isinstance(v, _Pending):
            return v.pool is not None and v.pool["pool"] == "global_avg"
        return isinstance(v, _Pop) and self.circuit.populations[v.name].pool == "global_avg"

    def take_module(self, path: str, node: fx.Node) -> nn.Module:
        if path in self.used:
            raise ConversionError(f"module {path!r} ({type(self.modules[path]).__name__}) is used twice: "
                                  f"a synapse or batch norm of a circuit cannot share its weights")
        self.used.add(path)
        return self.modules[path]

    # -- the node kinds ------------------------------------------------------------------------
    def synapse(self, node: fx.Node, path: str, src: fx.Node):
        m = self.take_module(path, node)
        v = self.value(src, node)
        if isinstance(m, nn.Conv2d):
            _check_conv(path, m)
            if len(v.shape) != 3:
                raise ConversionError(f"convolution {path!r} needs a (C, H, W) input, not {v.shape}")
        pre = v.name if isinstance(v, _Flat) else self.materialize(v).name
        return _Pending([("syn", pre, path)], self.shape(node), names=[node.name])

    def batchnorm(self, node: fx.Node, path: str, src: fx.Node):
        m = self.take_module(path, node)
        if not m.affine or not m.track_running_stats:
            raise ConversionError(f"batch norm {path!r} needs affine=True and track_running_stats=True "
                                  f"(a population's batch norm has both)")
        v = self.value(src, node)
        fold = isinstance(v, _Pending) and v.norm is None and v.activation == "identity"
        p = self.pending_for(src, node, fresh=not fold)
        want = 3 if (len(p.shape) == 3 and not self.is_global(p)) else 1
        if (isinstance(m, nn.BatchNorm2d) and want != 3) or (isinstance(m, nn.BatchNorm1d) and want != 1):
            raise ConversionError(f"batch norm {path!r} ({type(m).__name__}) on an activity of shape {p.shape} "
                                  f"is not supported")
        p.norm = path
        p.names.append(node.name)
        return p

    def activation(self, node: fx.Node, kind: str, src: fx.Node, inplace: bool):
        if inplace and len(src.users) > 1:
            raise ConversionError(f"in-place {kind} {node.name!r} ({_what(node)}) changes an activity that is "
                                  f"also read elsewhere; a circuit cannot express that")
        v = self.value(src, node)
        fold = isinstance(v, _Pending) and v.activation == "identity"
        p = self.pending_for(src, node, fresh=not fold)
        p.activation = kind
        p.names.append(node.name)
        return p

    def add(self, node: fx.Node):
        if node.target is torch.add and node.kwargs.get("alpha", 1) != 1:
            raise ConversionError(f"node {node.name!r}: torch.add with alpha is not supported")
        args = list(node.args) + [node.kwargs[k] for k in ("input", "other") if k in node.kwargs]
        if len(args) != 2 or not all(isinstance(a, fx.Node) and a in self.values for a in args):
            raise ConversionError(f"node {node.name!r} ({_what(node)}) adds something other than two "
                                  f"activities (a constant or parameter); only residual sums are supported")
        if args[0] is args[1]:
            raise ConversionError(f"node {node.name!r} adds an activity to itself; not supported")
        if node.target is operator.iadd and len(args[0].users) > 1:
            raise ConversionError(f"in-place add {node.name!r} changes an activity that is also read elsewhere")
        shapes = [self.value(a, node).shape for a in args]
        if shapes[0] != shapes[1]:
            raise ConversionError(f"node {node.name!r} adds activities of shapes {shapes[0]} and {shapes[1]}: "
                                  f"broadcasting is not supported")
        drives = []
        for a in args:
            v = self.value(a, node)
            if isinstance(v, _Pending) and v.norm is None and v.activation == "identity" and v.pool is None:
                drives += v.drives  # bare drives sum in the new population directly
            else:
                drives.append(("id", self.materialize(v).name))
        return _Pending(drives, shapes[0], names=[node.name])

    def pool(self, node: fx.Node, src: fx.Node):
        v = self.value(src, node)
        if len(v.shape) != 3 or self.is_global(v):
            raise ConversionError(f"global average pooling {node.name!r} needs a (C, H, W) activity, not {v.shape}")
        return self._pooled(node, src, dict(pool="global_avg"), (v.shape[0], 1, 1))

    def max_pool(self, node: fx.Node, what: str, src: fx.Node, kernel, stride, padding, dilation,
                 ceil_mode, return_indices):
        """A max-pool with ``F.max_pool2d``'s arguments; ``what`` names it in messages."""
        k, s, p, d = (_square(x) for x in (kernel, kernel if stride in (None, (), []) else stride, padding, dilation))
        problems = []
        if k is None or s is None or p is None:
            problems.append(f"kernel {kernel!r}, stride {stride!r}, padding {padding!r} (only square windows "
                            f"with equal strides and padding are supported)")
        if d != 1:
            problems.append(f"dilation {dilation!r} (a population's window is not dilated)")
        if ceil_mode:
            problems.append("ceil_mode=True (a population's window count rounds down)")
        if return_indices:
            problems.append("return_indices=True (a population's activity is one tensor)")
        if problems:
            raise ConversionError(f"cannot convert {what}: {'; '.join(problems)}")
        v = self.value(src, node)
        if len(v.shape) != 3 or self.is_global(v):
            raise ConversionError(f"max pooling {what} needs a (C, H, W) activity, not {v.shape}")
        return self._pooled(node, src, dict(pool="max", pool_kernel=k, pool_stride=s, pool_padding=p),
                            self.shape(node))

    def _pooled(self, node: fx.Node, src: fx.Node, pool: dict, shape: tuple) -> _Pending:
        # A population pools its summed drives first: pooling folds into bare drives only.
        v = self.value(src, node)
        fold = isinstance(v, _Pending) and v.norm is None and v.activation == "identity" and v.pool is None
        p = self.pending_for(src, node, fresh=not fold)
        p.pool = pool
        p.shape = shape
        p.names.append(node.name)
        return p

    def flatten(self, node: fx.Node, src: fx.Node):
        v = self.value(src, node)
        if self.is_global(v) and (isinstance(v, _Pending) or len(v.shape) == 3):
            if isinstance(v, _Pending):
                v.shape = (v.shape[0],)
                v.names.append(node.name)
                return v
            return _Pop(v.name, (v.shape[0],))
        # Anything else flattened is only good for a dense synapse, which flattens by itself.
        pop = self.materialize(v)
        return _Flat(pop.name, self.shape(node), pop.shape)

    # -- the walk ------------------------------------------------------------------------------
    def run(self) -> Circuit:
        out = None
        for node in self.gm.graph.nodes:
            v = self.visit(node)
            if node.op == "output":
                out = v
                continue
            if isinstance(v, _Pending) and len(node.users) > 1:
                v = self.materialize(v)  # read by several nodes: nothing may fold into it
            self.values[node] = v
        if out is None or isinstance(out, _Flat):
            raise ConversionError("the model returns a flattened activity; a circuit's output population "
                                  "keeps its shape")
        pop = self.materialize(out)
        if pop.name == self.circuit.input_name:
            raise ConversionError("the model returns its input unchanged; nothing to convert")
        if self.circuit.populations[pop.name].pool == "global_avg" and pop.shape != (pop.shape[0],):
            raise ConversionError("the model returns a pooled activity of shape (C, 1, 1); flatten it "
                                  "(the circuit's output would be (C,))")
        c = self.circuit
        c.output_name = pop.name
        c._relower()
        c._plan()  # refuses a circuit that is not complete
        c.converted_from = dict(self.mapping)
        return c

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            if self.circuit.input_name is not None:
                raise ConversionError(f"the model takes more than one input ({node.name!r}); a circuit has one")
            self.circuit.input(node.name, self.shape(node))
            return _Pop(node.name, self.shape(node))
        if node.op == "output":
            res = node.args[0]
            if not isinstance(res, fx.Node):
                raise ConversionError("the model returns more than one tensor; a circuit has one output")
            v = self.value(res, node)
            return v
        if node.op == "get_attr":
            raise ConversionError(f"node {node.name!r} reads parameter or buffer {node.target!r} directly; "
                                  f"only parameters of nn.Conv2d/nn.Linear/batch norm modules are supported")
        if node.op == "call_module":
            return self.module(node)
        if node.op == "call_function":
            return self.function(node)
        if node.op == "call_method":
            return self.method(node)
        raise ConversionError(f"node {node.name!r}: unsupported graph operation {node.op!r}")

    def module(self, node: fx.Node):
        path, m = node.target, self.modules[node.target]
        src = node.args[0] if node.args else None
        if isinstance(m, (nn.Conv2d, nn.Linear)) and type(m) in (nn.Conv2d, nn.Linear):
            return self.synapse(node, path, src)
        if type(m) in (nn.BatchNorm2d, nn.BatchNorm1d):
            return self.batchnorm(node, path, src)
        if type(m) in _ACT_MODULES:
            return self.activation(node, _ACT_MODULES[type(m)], src, getattr(m, "inplace", False))
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size
            if size not in (1, (1, 1)):
                raise ConversionError(f"module {path!r} (AdaptiveAvgPool2d({size})): only global average "
                                      f"pooling (output size 1) is supported")
            return self.pool(node, src)
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ConversionError(f"module {path!r} (Flatten({m.start_dim}, {m.end_dim})): only "
                                      f"Flatten(1, -1) is supported")
            return self.flatten(node, src)
        if type(m) is nn.MaxPool2d:
            return self.max_pool(node, f"module {path!r} (MaxPool2d)", src, m.kernel_size, m.stride, m.padding,
                                 m.dilation, m.ceil_mode, m.return_indices)
        if isinstance(m, nn.Identity):
            return self.value(src, node)
        why = {
            nn.Dropout: "dropout is not supported (a population has no dropout)",
        }
        reason = next((r for t, r in why.items() if isinstance(m, t)), "this module type has no circuit counterpart")
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            reason = "subclasses of nn.Conv2d/nn.Linear are not supported"
        raise ConversionError(f"cannot convert module {path!r} ({type(m).__name__}): {reason}")

    def function(self, node: fx.Node):
        f = node.target
        src = node.args[0] if node.args else None
        if f in _ACT_FUNCTIONS:
            inplace = f in (torch.relu_, F.relu_) or bool(node.kwargs.get("inplace", False)) or (
                f is F.relu and len(node.args) > 1 and bool(node.args[1]))
            return self.activation(node, _ACT_FUNCTIONS[f], src, inplace)
        if f in _ADD_FUNCTIONS:
            return self.add(node)
        if f is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if start != 1 or end != -1:
                raise ConversionError(f"node {node.name!r}: only torch.flatten(x, 1) is supported")
            return self.flatten(node, src)
        if f is F.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            if size not in (1, (1, 1)):
                raise ConversionError(f"node {node.name!r}: only global average pooling (output size 1) is supported")
            return self.pool(node, src)
        if f in _MAX_POOL_FUNCTIONS:
            names = _MAX_POOL_FUNCTIONS[f]
            given = dict(zip(names, node.args[1:]), **node.kwargs)
            defaults = dict(kernel_size=None, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=False)
            a = {k: given.get(k, dv) for k, dv in defaults.items()}
            return self.max_pool(node, f"node {node.name!r} (function {getattr(f, '__name__', f)})", src,
                                 a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"],
                                 a["return_indices"])
        if f is operator.getitem:
            raise ConversionError(f"node {node.name!r}: indexing ({node.args[0]}[{node.args[1]!r}]) is not supported")
        name = getattr(f, "__name__", repr(f))
        reason = {"cat": "concatenation is not supported (a population sums its drives)",
                  "dropout": "dropout is not supported (a population has no dropout)"}
        raise ConversionError(f"cannot convert node {node.name!r} (function {name}): "
                              f"{reason.get(name, 'this function has no circuit counterpart')}")

    def method(self, node: fx.Node):
        name = node.target
        src = node.args[0]
        if name in _ACT_METHODS:
            return self.activation(node, _ACT_METHODS[name], src, name.endswith("_"))
        if name == "size" and len(node.args) == 2 and node.args[1] == 0 and not node.kwargs:
            self.value(src, node)
            return _BatchSize()
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if start == 1 and end == -1:
                return self.flatten(node, src)
        elif name in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
            first = node.args[1]
            if isinstance(first, fx.Node) and isinstance(self.values.get(first), _BatchSize):
                return self.flatten(node, src)
        if name in ("flatten", "view", "reshape"):
            raise ConversionError(f"cannot convert node {node.name!r} (.{name}{tuple(node.args[1:])}): only "
                                  f"flattening to (batch, -1) is supported")
        if name == "add" or name == "add_":
            return self.add(node)
        raise ConversionError(f"cannot convert node {node.name!r} (method .{name}): this operation has no "
                              f"circuit counterpart")


@dataclass
class _Flat:
    """A (C, H, W) population seen flattened: only a dense synapse may read it."""

    name: str
    shape: tuple
    pop_shape: tuple


def _what(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _square(value) -> int | None:
    """An int, or a pair of equal ints, as one int; None for anything else."""
    if isinstance(value, (tuple, list)):
        if len(value) not in (1, 2) or any(x != value[0] for x in value):
            return None
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_conv(path: str, m: nn.Conv2d) -> None:
    problems = []
    if m.kernel_size[0] != m.kernel_size[1]:
        problems.append(f"non-square kernel {m.kernel_size}")
    if m.stride[0] != m.stride[1]:
        problems.append(f"unequal strides {m.stride}")
    if isinstance(m.padding, str) or m.padding[0] != m.padding[1]:
        problems.append(f"padding {m.padding!r} (only equal integer padding is supported)")
    if tuple(m.dilation) != (1, 1):
        problems.append(f"dilation {m.dilation}")
    if m.padding_mode != "zeros":
        problems.append(f"padding_mode {m.padding_mode!r} (only 'zeros')")
    if problems:
        raise ConversionError(f"cannot convert convolution {path!r}: {', '.join(problems)}")


def convert(model: nn.Module, rule: PlasticityRule, example_input: torch.Tensor | None = None,
            copy_weights: bool = False, seed: int = 0) -> Circuit:
    """The circuit that computes what ``model`` computes, every ``nn.Conv2d``/``nn.Linear`` a
    plastic synapse under ``rule``.

    ``example_input`` (one batch, e.g. ``torch.zeros(1, 3, 32, 32)``) is run once, in eval mode
    and without gradients, to learn every population's shape. With ``copy_weights`` the model's
    weights, biases and batch-norm state are copied in (see ``copy_weights``) and the circuit is
    moved to the dtype and device of the model's parameters; otherwise synapses are drawn afresh
    from ``seed``. Raises ``ConversionError`` (a ``ValueError`` and a ``UserError``) naming the
    first module or graph node that a circuit cannot express.
    """
    if example_input is None:
        raise ConversionError("convert needs example_input= (one batch of the model's input, e.g. "
                              "torch.zeros(1, 3, 32, 32)) to learn the populations' shapes")
    circuit = _Converter(model, rule, example_input, seed).run()
    if copy_weights:
        p = next(model.parameters(), None)
        if p is not None:
            circuit.to(device=p.device, dtype=p.dtype)
        globals()["copy_weights"](model, circuit)
    return circuit


def _pairs(model: nn.Module, circuit: Circuit) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(model tensor, circuit tensor)`` for every tensor with state, paired along
    ``circuit.converted_from`` (model module path → circuit state prefix). Raises
    ``ConversionError`` naming the first module or tensor that has no counterpart of the same
    shape: every tensor of the model's ``state_dict`` and every forward tensor of the circuit's
    (feedback weights, which a plain model has none of, excepted) must be paired."""
    mapping = getattr(circuit, "converted_from", None)
    if mapping is None:
        raise ConversionError("the circuit has no module mapping (converted_from) to copy along: make it with "
                              "neurosim.models.convert or build_resnet")
    theirs = dict(circuit.state_dict(keep_vars=True))
    modules = dict(model.named_modules())
    pairs, mine_done, theirs_done = [], set(), set()
    for path, prefix in mapping.items():
        if path not in modules:
            raise ConversionError(f"model has no module {path!r} (circuit {prefix}); not the model the circuit "
                                  f"was made from")
        for key, t in modules[path].state_dict(keep_vars=True).items():
            name, other = f"{path}.{key}" if path else key, f"{prefix}.{key}"
            dst = theirs.get(other)
            if dst is None:
                raise ConversionError(f"model {name} has no counterpart {other} in the circuit; not the model the "
                                      f"circuit was made from")
            if t.shape != dst.shape:
                raise ConversionError(f"model {name} {tuple(t.shape)} does not match circuit {other} "
                                      f"{tuple(dst.shape)}; not the model the circuit was made from (same depth, "
                                      f"width and classes?)")
            pairs.append((t, dst))
            mine_done.add(name)
            theirs_done.add(other)
    left = [k for k in model.state_dict(keep_vars=True) if k not in mine_done]
    if left:
        raise ConversionError(f"model {left[0]} has no counterpart in the circuit ({len(left)} model tensors "
                              f"left unpaired); not the model the circuit was made from")
    left = [k for k in theirs if k not in theirs_done and not k.endswith(".feedback")]
    if left:
        raise ConversionError(f"circuit {left[0]} has no counterpart in the model ({len(left)} circuit tensors "
                              f"left unpaired); not the model the circuit was made from")
    return pairs


@torch.no_grad()
def copy_weights(model: nn.Module, circuit: Circuit) -> Circuit:
    """Copy ``model``'s conv/linear weights and biases and its batch norms' affine parameters and
    running statistics into ``circuit``, one that ``convert`` made of it or a ``build_resnet``
    circuit and a torchvision ResNet of the same layout (``torchvision.models.resnet18()`` into
    ``build_resnet("resnet18_imagenet", rule)``), along ``circuit.converted_from``. Feedback
    weights drawn independently of ``W`` are left as they are; feedback state a rule derives from
    ``W`` (uSF's scale) is derived again from the copied weights
    (``PlasticityRule.weight_replaced``). Raises ``ConversionError`` naming the first tensor that
    does not match, before copying anything. Returns ``circuit``."""
    for mine, theirs in _pairs(model, circuit):
        theirs.copy_(mine)
    for syn in circuit.synapses.values():
        syn.rule.weight_replaced(syn.weight.detach(), syn.feedback)
    return circuit


@torch.no_grad()
def export_weights(circuit: Circuit, model: nn.Module) -> nn.Module:
    """The reverse of ``copy_weights``: copy a (trained) circuit's forward weights, biases and
    batch-norm parameters and running statistics into ``model``, a plain PyTorch model of the
    same layout — the one ``convert`` made the circuit of, or for a ``build_resnet`` circuit a
    torchvision ResNet (``export_weights(circuit, torchvision.models.resnet18())`` for
    ``resnet18_imagenet``) — e.g. to evaluate or deploy it with ordinary PyTorch code. Feedback
    weights have no counterpart in the model and are left out. Raises ``ConversionError`` naming
    the first tensor that does not match, before copying anything. Returns ``model``."""
    for mine, theirs in _pairs(model, circuit):
        mine.copy_(theirs)
    return model
