"""Where experts live and when they move: one shared model runtime and one module per engine."""
