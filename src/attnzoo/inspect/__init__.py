"""Inspecting attention inside models: capture maps, attach mechanisms to existing networks."""

from attnzoo.inspect.attach import Attached, attach, residual_branch_ends, symbolic_trace
from attnzoo.inspect.capture import CapturedMaps, attention_modules, capture

__all__ = [
    "Attached",
    "CapturedMaps",
    "attach",
    "attention_modules",
    "capture",
    "residual_branch_ends",
    "symbolic_trace",
]
