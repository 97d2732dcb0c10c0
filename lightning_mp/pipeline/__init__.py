"""Running the split model: stage surgery and stand-ins, micro-batches, the executor of a schedule, the runner of
one step, deferred weight gradients, gradient hand-over and synchronisation, rebalancing, and set-up measurement.

May import ``runtime``, ``plan``, ``tensor`` and ``observe``."""
