"""Memory options and the planner: ``build`` (settings -> model, optimizer, loss), ``precision``
(bfloat16 state, stochastic rounding), ``accumulate``, ``freeze``, ``planner`` (what fits) and
``probe`` (measured peaks)."""
