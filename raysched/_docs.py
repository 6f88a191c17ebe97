"""Docstrings shared by the lazy public API (``raysched.adaptive_remote``) and what it
forwards to (``runtime.decorator.adaptive_remote``); pure: importing it imports no Ray."""

ADAPTIVE_REMOTE_DOC = """Decorate a function to run as a Ray task, or a class as a Ray actor, sized from past runs.

Bare (``@adaptive_remote``) or with settings:

- ``name=``: the profile key (default module.qualname; the task type of an
  imported trace, ``raysched import``, to start from its runs);
- ``tags=`` (strings): features of every call (its runs are sized from runs with
  the same tags);
- ``dependencies=`` (strings: tools, versions, reference data): part of the
  function's identity, as its code is: new ones start a new history;
- ``num_cpus=`` / ``memory=`` (bytes): cold-start fallbacks, used until there is
  history (``memory=0``: no memory label, ``num_cpus=0``: no CPU slot, as in Ray);
- ``priority=`` (an int; higher first): calls wait in raysched's admission queue
  when the cluster is full, instead of going straight to Ray;
- ``max_attempts=`` (tasks): attempts before ``AttemptsExhausted``;
- ``measure_every_call=True`` (tasks): a fully measured row for every call, even
  once its calls prove tiny (see ``policy.thinning``);
- ``rescalable=`` (classes): the monitor may replace the actor by one of another
  size (see ``runtime.actors``);
- any Ray option, passed through to every submission (an option given explicitly
  wins over the prediction).

The result has ``.remote(...)`` (a real ``ray.ObjectRef``), ``.options(...)`` (per
call: ``input_size=`` bytes, ``tags=``, ``priority=``, and Ray options),
``.predict(...)`` (the ``Prediction`` for such a call, without running it),
``.bind(...)`` (Ray DAG nodes) and ``.refresh(train=False)``.
"""
