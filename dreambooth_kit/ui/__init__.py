"""The web UI (``dreambooth-kit ui``): a Gradio app over the public API, for the whole workflow in a
browser: the photos checked one by one, a training started in a process of its own (it outlives the
browser and the UI server) with its live progress, the metrics of a run, seeded images and the
exports with download links. ``handlers`` holds the plain-Python handlers (tested without a
browser), ``jobs`` the training processes, ``progress`` what a run's files say about it, ``paths``
the folders a user may name; only ``app`` imports gradio, and only the ``ui`` command imports
``app``, so the rest of the toolkit never needs the ``ui`` extra."""
