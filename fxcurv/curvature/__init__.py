"""Building the curvature program: seeding at the loss, propagating through ops, accumulating per
parameter (:mod:`.seed`, :mod:`.propagate`, :mod:`.accumulate`), with the typed messages of
:mod:`.messages` and the node writer of :mod:`.emit`. The pass that runs them in order is
:mod:`fxcurv.passes.insert_curvature`; what each quantity does with the messages is in
:mod:`fxcurv.quantities`.
"""
