"""Filter plugins the tests load by ``module:Class``, as third-party filters are loaded."""
