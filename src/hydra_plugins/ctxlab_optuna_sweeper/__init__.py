"""ctxlab's Hydra sweeper on current Optuna: ``ctxlab hydra/sweeper=optuna ... -m`` (config in
``cfg/hydra/sweeper/optuna.yaml``). Hydra finds it by scanning the ``hydra_plugins`` namespace."""
