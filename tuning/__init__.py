"""The tuning vocabulary that kernels/, mcu/ and autotune/ share: the search-space contract
(``space``), the best-config cache (``tuned``) and what the device is (``platform``). jax only."""
