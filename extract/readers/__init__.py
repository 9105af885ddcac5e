"""Dataset readers: they yield samples that carry stable sample ids."""
