"""`mbrl-bilevel sweep`: grids of any command, run locally or on Ray, skipped when finished,
resumed when interrupted."""
