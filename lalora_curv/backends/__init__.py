"""Statistics backends: our hooks (default), curvlinops and BackPACK adapters."""
