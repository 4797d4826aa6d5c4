"""Training: stage semantics, the Trainer subclass, the ``llavakit train`` entry point.

``llavakit.train.run(config)`` trains from a :class:`llavakit.config.RunConfig` (typed; build it with
``RunConfig.from_options(...)``, ``RunConfig.from_argv([...])``, or from its three argument dataclasses).
"""


def run(config):
    """See :func:`llavakit.train.entry.run`."""
    from llavakit.train.entry import run as _run

    return _run(config)
