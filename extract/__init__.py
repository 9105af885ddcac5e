"""Extraction: dataset readers, teachers and the runners that fill the store."""
