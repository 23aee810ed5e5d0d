"""Backend plug-ins: one module per backend, each defining ``BACKEND`` (an ``mmedge.backends.Backend``); listed in
``mmedge.runtimes.registry``. A plug-in module imports without its engine."""
