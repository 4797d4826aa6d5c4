"""Training: stage semantics, the Trainer subclass, the ``llavakit train`` entry point."""
