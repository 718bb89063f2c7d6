"""Built-in observers, one module each; they are looked up by name through `attntrace.registry`."""
