"""Swapping module forwards for the duration of a map pass, restored whatever happens.

The saliency machinery changes how some modules behave only while a map is computed (the
activations' backward rules, the route of the depthwise convolutions). Both do it the same way:
an instance attribute `forward` that shadows the class's, and a shared switch that the graph
nodes created meanwhile read, so that they behave exactly once the pass is over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


class Switch:
    """On while the map is computed; turned off on exit, for every node created meanwhile."""

    def __init__(self) -> None:
        self.on = True


@contextmanager
def swapped_forwards(
    model: nn.Module, make_forward: Callable[[nn.Module, Switch], Callable | None]
) -> Iterator[Switch]:
    """Give each module of `model` the forward `make_forward(module, switch)` returns (None
    leaves it alone) while the context is open; restore the originals on exit, also after an
    error, and turn the switch off."""
    switch = Switch()
    swapped = []
    try:
        for module in model.modules():
            forward = make_forward(module, switch)
            if forward is not None:
                # A module may carry its own instance forward already; put back exactly that.
                swapped.append((module, module.__dict__.get("forward")))
                module.forward = forward
        yield switch
    finally:
        switch.on = False
        for module, own_forward in swapped:
            if own_forward is None:
                del module.forward
            else:
                module.forward = own_forward
