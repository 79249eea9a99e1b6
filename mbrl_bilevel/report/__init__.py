"""`mbrl-bilevel report`: tables, learning curves and hparams of finished runs of any kind."""
