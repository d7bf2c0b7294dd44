"""The planner's core: the profile's and snapshot's models, and the pure functions that plan from them.

Its small immutable values (an eviction choice, a placement, a route, a claim, a verdict…), like the
loaders' positions and :class:`~reconciler.errors.Diagnostic`, are named tuples (``typing.NamedTuple``) rather than
frozen dataclasses: Python 3.11 compiles every method a dataclass generates from source text at each
start (a frozen one's ``__init__``, ``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__`` and
``__delattr__``), while a named tuple's come compiled — 46 M instructions of a tiny ``reconciler plan``
for the 17 on its path (issue 10). The fields, repr, equality, ordering where it was asked for, hashing
and immutability are the same; what differs is that a named tuple is a tuple (it unpacks, indexes and
equals a plain tuple of the same values), so no code that receives one tests for ``tuple``. Mutable
working state (``PlanState``, ``Moves``, ``GpuView``) stays in dataclasses.
"""
