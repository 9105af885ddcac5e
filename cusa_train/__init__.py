"""cusa_train: plug-and-play CSA/USA soft-label training that reads the cusa feature store."""
