"""Partitions of the trainable parameters into S groups (Wolinski's I_{S:P}).

A partition is stored the way the ``summary`` capability takes it (see
:class:`curvkit.estimators.base.Summary` and :func:`~curvkit.estimators.base.partition_masks`):
one integer tensor of group ids per trainable parameter, either 0-dim (the whole tensor
belongs to that group) or shaped like the parameter (element-wise ids). Group ids run
over 0..S-1, every group is non-empty.

Builders (all take the ``(name, parameter)`` pairs of :func:`curvkit.params.trainable`):

=================  ==========================================================  ==========
kind               groups                                                      S
=================  ==========================================================  ==========
``canonical``      one per parameter tensor (weights and biases of each layer)  #tensors
``weights_biases`` all biases (name ends in ``bias``) / all other tensors       ≤ 2
``blocks``         consecutive blocks of ``k`` layers (modules owning params)   ⌈L/k⌉
``patterns``       user groups of regexes over parameter names                  #groups
``trivial``        everything in one group                                       1
``discrete``       one group per scalar parameter                                P
=================  ==========================================================  ==========
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvkit.params import owners

KINDS = ("canonical", "weights_biases", "blocks", "patterns", "trivial", "discrete")


@dataclass
class ParameterPartition:
    """Group ids per parameter (``ids[i]``: 0-dim or shaped like parameter i) and group names.

    ``param_groups[i]`` describes where parameter i went: its group name, or
    ``"element-wise"`` when its entries are spread over several groups.
    """

    ids: list[Tensor]
    names: list[str]
    param_groups: list[str]

    @property
    def groups(self) -> int:
        """S, the number of groups."""
        return len(self.names)

    def sizes(self, params: Sequence[Tensor]) -> list[int]:
        """Number of scalar parameters in each group."""
        counts = torch.zeros(self.groups, dtype=torch.long)
        for ids, p in zip(self.ids, params):
            if ids.dim() == 0:
                counts[int(ids)] += p.numel()
            else:
                counts += torch.bincount(ids.reshape(-1), minlength=self.groups)
        return [int(c) for c in counts]


def _scalar(i: int) -> Tensor:
    return torch.tensor(i, dtype=torch.long)


def _from_labels(labels: Sequence[str]) -> ParameterPartition:
    """Whole-tensor partition from one group label per parameter (groups in first-seen order)."""
    order: dict[str, int] = {}
    for label in labels:
        order.setdefault(label, len(order))
    return ParameterPartition([_scalar(order[label]) for label in labels], list(order),
                              list(labels))


def canonical(named: Sequence[tuple[str, Tensor]]) -> ParameterPartition:
    """One group per parameter tensor, named as the parameter."""
    return _from_labels([n for n, _ in named])


def trivial(named: Sequence[tuple[str, Tensor]]) -> ParameterPartition:
    """S = 1: the step becomes Cauchy's steepest descent (Wolinski, App. C)."""
    return _from_labels(["all"] * len(named))


def weights_biases(named: Sequence[tuple[str, Tensor]]) -> ParameterPartition:
    """Two groups: every tensor whose name ends in ``bias`` / every other tensor."""
    return _from_labels(["biases" if n.rsplit(".", 1)[-1] == "bias" else "weights"
                         for n, _ in named])


def blocks(named: Sequence[tuple[str, Tensor]], model: nn.Module, size: int) -> ParameterPartition:
    """Consecutive blocks of ``size`` layers; a layer is the module owning a parameter."""
    if size < 1:
        raise ValueError(f"block_size: must be >= 1, got {size}")
    own = owners(model)
    layers: list[str] = []
    layer_of = []
    for n, _ in named:
        mod = own[n][0] if n in own else n
        if mod not in layers:
            layers.append(mod)
        layer_of.append(layers.index(mod))
    label = {}
    for b in range(0, len(layers), size):
        chunk = layers[b:b + size]
        name = "+".join(m or "<root>" for m in chunk)
        for j in range(b, b + len(chunk)):
            label[j] = name
    return _from_labels([label[j] for j in layer_of])


def discrete(named: Sequence[tuple[str, Tensor]], max_groups: int) -> ParameterPartition:
    """S = P: one group per scalar; the step becomes Newton's (Wolinski, App. C)."""
    total = sum(p.numel() for _, p in named)
    if total > max_groups:
        raise ValueError(f"partition: 'discrete' has S = P = {total} groups, more than "
                         f"max_groups = {max_groups} (the summary costs S Hessian-vector "
                         f"products and an S×S matrix); use it for tiny models only")
    ids, names, start = [], [], 0
    for n, p in named:
        k = p.numel()
        ids.append(torch.arange(start, start + k, dtype=torch.long).reshape(p.shape))
        names.extend(f"{n}[{j}]" for j in range(k))
        start += k
    return ParameterPartition(ids, names, ["element-wise"] * len(named))


def compile_groups(groups: Sequence[str | Sequence[str]] | Mapping[str, str | Sequence[str]]
                   ) -> list[tuple[str, list[re.Pattern]]]:
    """``(group name, compiled regexes)`` pairs; invalid or empty groups raise ValueError."""
    if isinstance(groups, Mapping):
        items = [(str(k), v) for k, v in groups.items()]
    else:
        items = [(g if isinstance(g, str) else "|".join(g), g) for g in groups]
    compiled: list[tuple[str, list[re.Pattern]]] = []
    for name, pats in items:
        pats = [pats] if isinstance(pats, str) else list(pats)
        if not pats:
            raise ValueError(f"groups: group {name!r} has no pattern")
        try:
            compiled.append((name, [re.compile(p) for p in pats]))
        except re.error as err:
            raise ValueError(f"groups: group {name!r}: invalid regular expression: {err}") \
                from err
    return compiled


def patterns(named: Sequence[tuple[str, Tensor]],
             groups: Sequence[str | Sequence[str]] | Mapping[str, str | Sequence[str]],
             unmatched: str = "error") -> ParameterPartition:
    """User groups of regular expressions, matched with ``re.search`` on full parameter names.

    ``groups``: a list (group i = a regex or a list of regexes, named by its patterns) or
    a mapping name → regex(es). A parameter goes to the first group with a matching
    pattern. Parameters no pattern matches: ``unmatched = "error"`` raises, ``"rest"``
    puts them in one extra group ``rest``, ``"own"`` gives each its own group.
    """
    compiled = compile_groups(groups)
    labels, missing = [], []
    for n, _ in named:
        hit = next((name for name, pats in compiled if any(p.search(n) for p in pats)), None)
        if hit is None:
            missing.append(n)
            hit = "rest" if unmatched == "rest" else n
        labels.append(hit)
    if missing and unmatched == "error":
        raise ValueError(f"groups: no pattern matches parameter(s) {', '.join(missing)}; "
                         f"add a pattern or set unmatched = 'rest' or 'own'")
    empty = [name for name, _ in compiled if name not in labels]
    if empty:
        raise ValueError(f"groups: group(s) {', '.join(map(repr, empty))} match no trainable "
                         f"parameter (parameters: {', '.join(n for n, _ in named)})")
    return _from_labels(labels)


def build(kind: str, model: nn.Module, named: Sequence[tuple[str, Tensor]], *,
          groups: Sequence | Mapping | None = None, unmatched: str = "error",
          block_size: int = 1, max_groups: int = 4096) -> ParameterPartition:
    """The partition ``kind`` (one of :data:`KINDS`) of the parameters ``named``."""
    if kind == "canonical":
        part = canonical(named)
    elif kind == "trivial":
        part = trivial(named)
    elif kind == "weights_biases":
        part = weights_biases(named)
    elif kind == "blocks":
        part = blocks(named, model, block_size)
    elif kind == "discrete":
        part = discrete(named, max_groups)
    elif kind == "patterns":
        if groups is None:
            raise ValueError("groups: required with partition = 'patterns'")
        part = patterns(named, groups, unmatched)
    else:
        raise ValueError(f"partition: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if part.groups > max_groups:
        raise ValueError(f"partition: {kind!r} gives S = {part.groups} groups, more than "
                         f"max_groups = {max_groups}")
    return part
