"""The package version, in a module of its own: modules inside the package (inference records it in
every PNG) import it from here, not from ``dreambooth_kit``, whose ``__init__`` imports them; and
pyproject.toml reads it from here, so there is one place to change it."""

__version__ = "0.1.0"
