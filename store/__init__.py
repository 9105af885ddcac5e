"""The feature store: Zarr v3 groups of teacher features keyed by sample id."""
