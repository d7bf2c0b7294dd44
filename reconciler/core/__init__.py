"""The planner's core: the profile's and snapshot's models, and the pure functions that plan from them.

Its small immutable values (an eviction choice, a placement, a route, a claim, a GPU's holder…), like
the loaders' positions and :class:`~reconciler.errors.Diagnostic`, are named tuples
(``typing.NamedTuple``) rather than frozen dataclasses, and the planner's mutable working state
(``PlanState``, ``Moves``, ``GpuView``: they start empty and are only changed, never compared or copied)
is plain classes: Python 3.11 compiles every method a dataclass generates from source text at each
start (``__init__``, ``__repr__``, ``__eq__``, and a frozen one's ``__hash__``, ``__setattr__`` and
``__delattr__``), while a named tuple's and a class's come compiled — 57 M instructions of a tiny
``reconciler plan`` for the 21 on its path (issue 10). The named tuples keep the fields, repr, equality,
ordering where it was asked for, hashing and immutability; what differs is that a named tuple is a tuple
(it unpacks, indexes and equals a plain tuple of the same values), so no code that receives one tests for
``tuple``.
"""
